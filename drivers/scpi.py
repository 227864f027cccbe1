"""What the SCPI instruments' drivers share (the AQ6370 OSA, the PNA/ZNB VNA): IEEE 488.2 binary
blocks (the pure codecs, and reading one by its declared length with the termination character
off — with it on, pyvisa-py ends a low-level read at every 0x0A byte inside the floats, and
pymeasure's ``binary_values`` reads byte by byte until timeout), Nagle off on a raw socket, and
I/O and SCPI errors turned into one error type per driver, naming the command.

`SCPIInstrument` is a pymeasure `Instrument` base: a driver sets ``error_type`` (a `CommandError`),
``error_query`` (its error-queue query) and ``max_errors``. Imports nothing of labpnn except the roles.
"""
from __future__ import annotations

import socket
from contextlib import contextmanager
from typing import Any

import numpy as np
import pyvisa
from pymeasure.instruments import Instrument
from pymeasure.instruments.generic_types import SCPIMixin

from .roles import InstrumentError

__all__ = ["IO_ERRORS", "CommandError", "SCPIInstrument", "ieee_block_header", "parse_ieee_block", "tcp_nodelay"]

IO_ERRORS = (pyvisa.errors.VisaIOError, pyvisa.errors.InvalidSession, OSError)


class CommandError(InstrumentError):
    """An instrument failed a command: ``command`` is what was sent, ``message`` what went wrong."""

    def __init__(self, command: str, message: str):
        super().__init__(f"{command!r}: {message}" if command else message)
        self.command = command
        self.message = message


# -- pure codecs -----------------------------------------------------------------------------------
def ieee_block_header(prefix: bytes) -> tuple[int, int]:
    """(header length, data length) of a definite-length block ``#<n><len>...``.

    ``prefix`` must hold at least the header. Raises ``ValueError`` on anything else
    (including the indefinite form ``#0``).
    """
    if len(prefix) < 2 or prefix[:1] != b"#":
        raise ValueError(f"not an IEEE 488.2 block: starts with {bytes(prefix[:12])!r}")
    digits = prefix[1:2]
    if not digits.isdigit() or digits == b"0":
        raise ValueError(f"not a definite-length block: header digit {digits!r}")
    n = int(digits)
    field = bytes(prefix[2:2 + n])
    if len(field) < n or not field.isdigit():
        raise ValueError(f"bad block length field {field!r} (expected {n} digits)")
    return 2 + n, int(field)


def parse_ieee_block(data: bytes, dtype: Any) -> np.ndarray:
    """Decode ``#<n><len><len bytes>`` (optionally followed by ``\\r\\n``/``\\n``) into an array.

    ``dtype`` is taken as given (``"<f4"`` for the AQ6370's REAL,32, ``"<f8"`` for REAL,64).
    Raises ``ValueError`` if the block is short, has trailing bytes other than a terminator, or
    its length is not a whole number of items. Returns a read-only view on ``data``.
    """
    dtype = np.dtype(dtype)
    start, length = ieee_block_header(data)
    end = start + length
    if len(data) < end:
        raise ValueError(f"block declares {length} bytes but holds {len(data) - start}")
    trailer = bytes(data[end:])
    if trailer.strip(b"\r\n"):
        raise ValueError(f"unexpected bytes after the block: {trailer[:16]!r}")
    if length % dtype.itemsize:
        raise ValueError(f"block length {length} is not a multiple of {dtype.itemsize} ({dtype})")
    return np.frombuffer(data, dtype, length // dtype.itemsize, start)


def tcp_nodelay(res: pyvisa.resources.TCPIPSocket) -> None:
    """Turn Nagle's algorithm off, as NI-VISA does by default (VI_ATTR_TCPIP_NODELAY).

    Without it a command that gets no reply followed by a query waits for the peer's delayed ACK
    (~40 ms on Linux) before the query leaves. pyvisa-py 0.8 refuses the attribute on SOCKET
    resources, so fall back to the session's socket (best effort).
    """
    try:
        res.set_visa_attribute(pyvisa.constants.ResourceAttribute.tcpip_nodelay, pyvisa.constants.VI_TRUE)
        return
    except Exception:  # pyvisa-py: UnknownAttribute / VisaIOError, depending on the version
        pass
    session = getattr(getattr(res, "visalib", None), "sessions", {}).get(res.session)
    sock = getattr(session, "interface", None)
    if isinstance(sock, socket.socket):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


class SCPIInstrument(SCPIMixin, Instrument):
    """A pymeasure instrument whose I/O and SCPI errors become ``error_type`` naming the command."""

    error_type: type[CommandError] = CommandError
    error_query = "SYST:ERR?"
    max_errors = 32
    max_block_bytes = 64 * 2**20
    _last_command = ""

    def __init__(self, adapter, name: str, *, read_termination: str = "\n", write_termination: str = "\n",
                 timeout_s: float = 5.0, **kwargs):
        """Over pyvisa-py by default (``visa_library="@py"``), Nagle off on a raw TCP socket."""
        kwargs.setdefault("visa_library", "@py")
        super().__init__(adapter, name, read_termination=read_termination, write_termination=write_termination,
                         timeout=int(round(timeout_s * 1000)), **kwargs)
        res = getattr(self.adapter, "connection", None)
        if isinstance(res, pyvisa.resources.TCPIPSocket):
            tcp_nodelay(res)

    def write(self, command: str, **kwargs) -> None:
        self._last_command = command
        try:
            super().write(command, **kwargs)
        except IO_ERRORS as exc:
            raise self.error_type(command, f"write failed: {exc}") from exc

    def read(self, **kwargs) -> str:
        try:
            return super().read(**kwargs)
        except IO_ERRORS as exc:
            raise self.error_type(self._last_command, f"no reply: {exc}") from exc

    @property
    def next_error(self) -> tuple[int, str]:
        """Get the next entry of the error queue (`error_query`) as (code, message)."""
        reply = self.ask(self.error_query).strip()
        code, _, message = reply.partition(",")
        try:
            return int(code), message.strip().strip('"')
        except ValueError:
            raise self.error_type(self.error_query, f"unreadable reply {reply!r}") from None

    def check_errors(self) -> list:
        """Read the error queue; raise `error_type` (naming the last command) if it held any error."""
        command = self._last_command
        errors = []
        for _ in range(self.max_errors):
            code, message = self.next_error
            if code == 0:
                break
            errors.append((code, message))
        if errors:
            raise self.error_type(command, "instrument error: " + "; ".join(f"{c}, {m}" for c, m in errors))
        return errors

    # -- binary blocks, read by length
    def _resource(self) -> pyvisa.resources.MessageBasedResource:
        res = getattr(self.adapter, "connection", None)
        if not isinstance(res, pyvisa.resources.MessageBasedResource):
            raise TypeError("binary transfers need a PyVISA message-based resource")
        return res

    @contextmanager
    def _termchar_off(self, res):
        term = res.read_termination
        res.read_termination = None
        try:
            yield
        finally:
            res.read_termination = term

    def query_block(self, command: str, dtype: Any) -> np.ndarray:
        """Send ``command`` and read its ``#<n><len><bytes>`` reply by length, then the terminator.

        The termination character is off while the header and the payload are read (so 0x0A
        bytes in the floats do not end a read) and back on for the terminator.
        """
        self.write(command)
        res = self._resource()
        try:
            with self._termchar_off(res):
                head = res.read_bytes(2)
            if head[:1] != b"#" or not head[1:2].isdigit() or head[1:2] == b"0":
                # an ASCII reply (or the unsupported #0 form): read it to its terminator so the
                # session stays in step, and report it
                rest = res.read_raw() if b"\n" not in head else b""
                raise self.error_type(command, f"expected a definite-length block, got {(head + rest)[:40]!r}")
            with self._termchar_off(res):
                digits = res.read_bytes(int(head[1:2]))
                _, length = ieee_block_header(head + digits)
                if length > self.max_block_bytes:
                    raise self.error_type(command, f"block of {length} bytes is larger than {self.max_block_bytes}")
                payload = res.read_bytes(length, chunk_size=max(length, 1)) if length else b""
            trailer = res.read_raw()  # up to the termination character
        except IO_ERRORS as exc:
            raise self.error_type(command, f"binary block read failed: {exc}") from exc
        except ValueError as exc:
            raise self.error_type(command, str(exc)) from exc
        if trailer.strip(b"\r\n"):
            raise self.error_type(command, f"unexpected bytes after the block: {trailer[:16]!r}")
        try:
            return parse_ieee_block(head + digits + payload, dtype)
        except ValueError as exc:
            raise self.error_type(command, str(exc)) from exc

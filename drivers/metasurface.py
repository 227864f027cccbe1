"""The open-source RIS controller (1-bit metasurface, STM32 behind a USB serial port) over pyserial,
and the metasurface as an `Actuator`.

Wire protocol (ASCII lines ending ``"\\n"``, 115200 8N1)::

    !0x<n_bits/4 hex digits>  -> #OK                      (after shift and latch)
    ?Pattern                  -> #0X<hex>                 (the latched pattern)
    ?SerialNo                 -> #<serial number>
    !Reset                    -> a boot banner, its last line #READY!  (pattern -> all zeros)
    anything else             -> nothing at all (the firmware stays silent: we time out)

Bit order: bit ``i`` is bit ``i`` of the hex string read MSB-first (``"8000..."`` = bit 0 only).

Three layers, smallest first:

- pure codec functions (no I/O): `pattern_to_hex`, `hex_to_pattern`, `quantise_controls`,
  `controls_to_bits`, `bits_to_controls`;
- `RISController`: one serial port (``serial.serial_for_url``: a device path such as
  ``/dev/ttyACM0`` or ``COM6``, or a URL such as ``socket://host:port``); one method per command.
  Stale input is discarded before every command (a late reply to a timed-out command must not be
  taken for the next one's). Silence past ``timeout_s`` raises `RISTimeoutError` naming the
  command; ``retries`` resends it that many times first (every command is idempotent). The pattern
  write and the read-back also come in two steps (``start_*`` sends, ``finish_*`` reads the reply),
  so a caller can do other work while the bytes are on the wire;
- `MetasurfaceActuator`: the `labpnn.drivers.roles.Actuator` role. Controls in [0, 1], one per
  group of ``bits_per_control`` bits (PhyLL's microwave layer: 2 bits per input), each quantised to
  ``2**k`` levels and written as ``k`` bits MSB-first; ``atoms`` lists which controller bits carry
  them (the others hold ``default_pattern``). `apply` writes, reads back and compares, and returns
  the quantised row. The rig waits ``settle_s`` after `apply` before the VNA sweeps: the controller
  answers ``#OK`` when the latches switch, not when the cavity has settled. The same in three steps
  for a rig that overlaps rows (`labpnn.drivers.roles.OverlappedActuator`): `begin_apply` sends the
  pattern and returns the quantised row at once, `end_apply` waits for ``#OK`` (settle counts from
  here) and sends ``?Pattern``, whose reply travels while the cavity settles and the VNA sweeps, and
  `end_verify` compares it (`RISReadbackError`): the wire time of the read-back leaves the row's
  critical path, the check stays.

Imports nothing of labpnn except the roles.
"""
from __future__ import annotations

import os
import select
import threading
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import serial

from .roles import InstrumentError

__all__ = [
    "DEFAULT_BAUD",
    "MetasurfaceActuator",
    "RISController",
    "RISError",
    "RISReadbackError",
    "RISTimeoutError",
    "bits_to_controls",
    "controls_to_bits",
    "hex_to_pattern",
    "pattern_to_hex",
    "quantise_controls",
]

DEFAULT_BAUD = 115200
_POLL_S = 0.02  # pyserial read timeout inside our own deadline loop
_BANNER_END = "#READY!"
_HEX_DIGITS = frozenset("0123456789abcdefABCDEF")


# -- errors ------------------------------------------------------------------------------------
class RISError(InstrumentError):
    """The controller failed a command: ``command`` is what was sent (stripped of its newline)."""

    def __init__(self, message: str, *, command: str = "", port: str = ""):
        super().__init__(message)
        self.command = command
        self.port = port


class RISTimeoutError(RISError):
    """The controller stayed silent (it answers nothing to a command it does not understand)."""


class RISReadbackError(RISError):
    """The pattern read back differs from the pattern written."""


# -- pure codec ----------------------------------------------------------------------------------
def pattern_to_hex(bits: Sequence[int] | np.ndarray) -> str:
    """Upper-case hex of a 0/1 pattern (length a multiple of 4; bit 0 = MSB of the first digit)."""
    arr = np.asarray(bits)
    if arr.ndim != 1 or arr.size == 0 or arr.size % 4:
        raise ValueError(f"a pattern is a 1-D array of a multiple of 4 bits, got shape {arr.shape}")
    if not ((arr == 0) | (arr == 1)).all():
        raise ValueError("a pattern holds only 0 and 1")
    text = np.packbits(arr.astype(np.uint8)).tobytes().hex().upper()  # MSB first, zero-padded to bytes
    return text[: arr.size // 4]


def hex_to_pattern(text: str, n_bits: int | None = None) -> np.ndarray:
    """uint8[4 * len(text)] bits of a hex string (either case); ``ValueError`` on a non-hex digit or,
    when ``n_bits`` is given, a length other than ``n_bits / 4`` digits."""
    if n_bits is not None and len(text) * 4 != n_bits:
        raise ValueError(f"expected {n_bits // 4} hex digits ({n_bits} bits), got {len(text)}: {text[:16]!r}")
    if not text:
        raise ValueError("empty hex string")
    if not _HEX_DIGITS.issuperset(text):  # bytes.fromhex alone would also take spaces
        raise ValueError(f"not a hex string: {text[:80]!r}")
    bits = np.unpackbits(np.frombuffer(bytes.fromhex(text + "0" * (len(text) % 2)), np.uint8))
    return bits[: 4 * len(text)]


def quantise_controls(controls: np.ndarray, bits_per_control: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """(levels int64, applied float32) for controls in [0, 1] on ``2**bits_per_control`` levels:
    ``level = floor(x * (2**k - 1) + 1/2)`` (halves round up: 0.5 is ON at 1 bit),
    ``applied = level / (2**k - 1)``."""
    top = (1 << _bits_per_control(bits_per_control)) - 1
    x = np.asarray(controls, np.float64)
    levels = np.floor(np.clip(x, 0.0, 1.0) * top + 0.5).astype(np.int64)
    return levels, (levels / top).astype(np.float32)


def controls_to_bits(controls: np.ndarray, bits_per_control: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """(bits uint8[n * k], applied float32[n]) for n controls: each level written as k bits MSB-first."""
    k = _bits_per_control(bits_per_control)
    levels, applied = quantise_controls(np.asarray(controls).reshape(-1), k)
    shifts = np.arange(k - 1, -1, -1)
    bits = ((levels[:, None] >> shifts) & 1).astype(np.uint8).reshape(-1)
    return bits, applied


def bits_to_controls(bits: np.ndarray, bits_per_control: int = 1) -> np.ndarray:
    """Inverse of `controls_to_bits`: float32[n] from uint8[n * k]."""
    k = _bits_per_control(bits_per_control)
    arr = np.asarray(bits, np.int64).reshape(-1)
    if arr.size % k:
        raise ValueError(f"{arr.size} bits is not a whole number of {k}-bit controls")
    levels = arr.reshape(-1, k) @ (1 << np.arange(k - 1, -1, -1))
    return (levels / ((1 << k) - 1)).astype(np.float32)


def _bits_per_control(k: Any) -> int:
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 1 <= k <= 16:
        raise ValueError(f"bits_per_control: must be a whole number in 1..16, got {k!r}")
    return int(k)


# -- the controller ------------------------------------------------------------------------------
class RISController:
    """One RIS controller on a serial port. ``open()`` (or the context manager) before use.

    :param port: device path (``/dev/ttyACM0``, ``COM6``, a pty) or a pyserial URL (``socket://h:p``).
    :param n_bits: pattern length (256 on the 16x16 board).
    :param timeout_s: how long to wait for a reply before `RISTimeoutError`.
    :param reset_timeout_s: how long the boot banner after ``!Reset`` may take.
    :param retries: resends after a silent timeout (0 = fail at the first silence).
    """

    def __init__(self, port: str, *, baud: int = DEFAULT_BAUD, n_bits: int = 256, timeout_s: float = 0.5,
                 reset_timeout_s: float = 3.0, retries: int = 0):
        if isinstance(n_bits, bool) or not isinstance(n_bits, (int, np.integer)) or n_bits < 4 or n_bits % 4:
            raise ValueError(f"n_bits: must be a positive multiple of 4, got {n_bits!r}")
        self.port = port
        self.baud = int(baud)
        self.n_bits = int(n_bits)
        self.timeout_s = _positive("timeout_s", timeout_s)
        self.reset_timeout_s = _positive("reset_timeout_s", reset_timeout_s)
        if isinstance(retries, bool) or not isinstance(retries, int) or retries < 0:
            raise ValueError(f"retries: must be a whole number >= 0, got {retries!r}")
        self.retries = retries
        self._serial: serial.SerialBase | None = None
        self._rx = bytearray()
        self._lock = threading.RLock()
        self._open: tuple[str, str, float] | None = None  # (command, expected reply, sent at): awaiting its reply
        self._fd: int | None = None  # the port's file descriptor when it is a POSIX serial port

    # -- lifecycle
    def open(self) -> RISController:
        if self._serial is None:
            try:
                self._serial = serial.serial_for_url(self.port, baudrate=self.baud, bytesize=8, parity="N",
                                                     stopbits=1, timeout=_POLL_S, write_timeout=self.timeout_s)
            except (serial.SerialException, ValueError, OSError) as exc:
                raise RISError(f"cannot open the metasurface controller at {self.port}: {exc}",
                               port=self.port) from exc
            self._fd = _posix_fd(self._serial)
        return self

    def close(self) -> None:
        self._open = None
        self._fd = None
        port, self._serial = self._serial, None
        if port is not None:
            port.close()

    @property
    def is_open(self) -> bool:
        return self._serial is not None

    def __enter__(self) -> RISController:
        return self.open()

    def __exit__(self, *exc) -> None:
        self.close()

    # -- commands
    def set_pattern(self, bits: Sequence[int] | np.ndarray) -> None:
        """Write ``!0x<hex>`` and wait for ``#OK`` (the pattern is then latched)."""
        with self._lock:
            self.start_set_pattern(bits)
            self.finish_set_pattern()

    def pattern(self) -> np.ndarray:
        """The latched pattern, uint8[n_bits], from ``?Pattern``."""
        with self._lock:
            self.start_pattern_query()
            return self.finish_pattern_query()

    # -- the same commands in two steps: send now, read the reply later. Between the two the caller
    # -- is free (the bytes travel on the wire meanwhile). One command at a time, as the firmware
    # -- takes them: sending another while one is open first waits for the open one's reply (up to
    # -- its timeout) and drops it
    def start_set_pattern(self, bits: Sequence[int] | np.ndarray) -> None:
        """Send ``!0x<hex>`` without waiting; `finish_set_pattern` waits for its ``#OK``."""
        arr = np.asarray(bits)
        if arr.shape != (self.n_bits,):
            raise ValueError(f"a pattern has {self.n_bits} bits, got shape {arr.shape}")
        self._begin("!0x" + pattern_to_hex(arr), "#OK")

    def finish_set_pattern(self) -> None:
        """Wait for the ``#OK`` of the pattern sent by `start_set_pattern` (resending it on silence
        ``retries`` times; the timeout runs from when it was sent)."""
        command, reply = self._complete("!0x")
        if reply != "#OK":
            raise RISError(f"metasurface controller at {self.port} answered {reply!r} to {command!r} "
                           "(expected '#OK')", command=command, port=self.port)

    def start_pattern_query(self) -> None:
        """Send ``?Pattern`` without waiting; `finish_pattern_query` reads the reply."""
        self._begin("?Pattern", "#0X")

    def finish_pattern_query(self) -> np.ndarray:
        """The reply to `start_pattern_query`: the latched pattern, uint8[n_bits]."""
        command, reply = self._complete("?Pattern")
        if not reply.upper().startswith("#0X"):
            raise RISError(f"metasurface controller at {self.port} answered {reply!r} to {command!r} "
                           "(expected '#0X<hex>')", command=command, port=self.port)
        try:
            return hex_to_pattern(reply[3:], self.n_bits)
        except ValueError as exc:
            raise RISError(f"metasurface controller at {self.port}: bad ?Pattern reply: {exc}",
                           command=command, port=self.port) from None

    def query(self, command: str) -> str:
        """Send any one-line command; return its one-line reply (`RISTimeoutError` on silence)."""
        if "\n" in command or "\r" in command:
            raise ValueError(f"one line only, got {command!r}")
        return self._transact(command)

    def serial_number(self) -> str:
        """The serial number from ``?SerialNo`` (without the leading ``#``)."""
        command = "?SerialNo"
        reply = self._transact(command)
        if not reply.startswith("#") or len(reply) < 2:
            raise RISError(f"metasurface controller at {self.port} answered {reply!r} to {command!r}",
                           command=command, port=self.port)
        return reply[1:]

    def reset(self) -> list[str]:
        """``!Reset``: wait for the banner up to ``#READY!``; return its lines. The pattern is zeros."""
        command = "!Reset"
        with self._lock:
            self._abandon()
            self._send(command)
            lines: list[str] = []
            deadline = time.monotonic() + self.reset_timeout_s
            while True:
                line = self._read_line(deadline, command, waited_s=self.reset_timeout_s, partial=lines)
                lines.append(line)
                if line == _BANNER_END:
                    return lines

    # -- transport
    def _transact(self, command: str, expect: str | None = None) -> str:
        """Send one command and return its one-line reply (CR/LF stripped), resending on silence."""
        with self._lock:
            self._abandon()
            self._send(command)
            return self._await(command, expect, time.monotonic())

    def _begin(self, command: str, expect: str) -> None:
        """Send ``command`` and leave its exchange open for `_complete`."""
        with self._lock:
            self._abandon()
            self._send(command, drain=False)
            self._open = (command, expect, time.monotonic())

    def _abandon(self) -> None:
        """Before another command goes out: wait for the open exchange's reply and drop it (the
        firmware would take a command sent into an unfinished one as garbage); silence is not an
        error here (the line is drained, as after any timeout)."""
        if self._open is None:
            return
        (command, expect, sent_at), self._open = self._open, None
        try:
            self._await(command, expect, sent_at, resend=False)
        except RISError:
            pass

    def _complete(self, prefix: str) -> tuple[str, str]:
        """(command, reply) of the open exchange, whose command must start with ``prefix``."""
        with self._lock:
            if self._open is None or not self._open[0].startswith(prefix):
                raise RISError(f"metasurface controller at {self.port}: no {prefix!r} command awaits its reply",
                               command=prefix, port=self.port)
            (command, expect, sent_at), self._open = self._open, None
            return command, self._await(command, expect, sent_at)

    def _await(self, command: str, expect: str | None, sent_at: float, *, resend: bool = True) -> str:
        """The reply to ``command`` (sent at ``sent_at``), resending it on silence ``retries`` times
        (unless not ``resend``). With ``expect`` (a reply prefix), lines that cannot answer this
        command -- a late reply to an earlier one that timed out -- are dropped until the deadline."""
        for attempt in range(self.retries + 1 if resend else 1):
            if attempt:
                self._send(command)
                sent_at = time.monotonic()
            try:
                deadline = sent_at + self.timeout_s
                dropped: list[str] = []
                while True:
                    try:
                        line = self._read_line(deadline, command, waited_s=self.timeout_s, attempts=attempt + 1)
                    except RISTimeoutError as exc:
                        if not dropped:
                            raise
                        raise RISTimeoutError(
                            f"metasurface controller at {self.port} answered only {dropped!r}, which does "
                            f"not answer {command!r} (expected {expect}...), within {self.timeout_s:g} s",
                            command=command, port=self.port) from exc
                    if expect is None or line.upper().startswith(expect.upper()):
                        return line
                    dropped.append(line)  # a late reply to an earlier command, not ours
            except RISTimeoutError:
                # a reply that comes after all would be read as the next command's: wait for the
                # line to go quiet and drop what arrived, so the next exchange starts in step
                self._drain(quiet_s=0.05, limit_s=self.timeout_s)
                if attempt == self.retries or not resend:
                    raise
        raise AssertionError("unreachable")

    def _drain(self, *, quiet_s: float, limit_s: float) -> None:
        """Read and drop input until the line has been quiet for ``quiet_s`` (at most ``limit_s``)."""
        port = self._port()
        end, quiet_since = time.monotonic() + limit_s, time.monotonic()
        try:
            while time.monotonic() < end and time.monotonic() - quiet_since < quiet_s:
                if port.in_waiting:
                    port.read(port.in_waiting)
                    quiet_since = time.monotonic()
                else:
                    time.sleep(0.005)
        except (serial.SerialException, OSError):
            pass  # the next command reports the port's state
        self._rx.clear()

    def _port(self) -> serial.SerialBase:
        if self._serial is None:
            raise RISError(f"metasurface controller at {self.port} is not open (call open() or connect())",
                           port=self.port)
        return self._serial

    def _send(self, command: str, *, drain: bool = True) -> None:
        """Write one command line. ``drain=False`` (a two-step exchange) returns once the bytes are
        handed to the OS, without waiting for them to be transmitted (``tcdrain``: on a UART, the
        whole wire time the caller wants to use for other work)."""
        port = self._port()
        try:
            port.reset_input_buffer()  # a late reply to an earlier, timed-out command is not ours
            self._rx.clear()
            port.write(command.encode("ascii") + b"\n")
            if drain:
                port.flush()
        except (serial.SerialException, OSError) as exc:
            raise RISError(f"metasurface controller at {self.port}: writing {command!r} failed: {exc}",
                           command=command, port=self.port) from exc

    def _read_line(self, deadline: float, command: str, *, waited_s: float, attempts: int = 1,
                   partial: list[str] | None = None) -> str:
        port = self._port()
        late = False
        while True:
            newline = self._rx.find(b"\n")
            if newline >= 0:
                raw = bytes(self._rx[:newline])
                del self._rx[: newline + 1]
                return raw.rstrip(b"\r").decode("ascii", errors="replace")
            if time.monotonic() >= deadline:
                if not late:  # a reply that came in time but is read late (a two-step exchange) counts
                    late = True
                    try:
                        waiting = port.in_waiting
                    except (serial.SerialException, OSError):
                        waiting = 0
                    if waiting:
                        self._rx += port.read(waiting)
                        continue
                got = f"; it sent only {bytes(self._rx)[:40]!r}" if self._rx else ""
                lines = f" after {len(partial)} banner line(s)" if partial else ""
                tries = f" ({attempts} attempts)" if attempts > 1 else ""
                raise RISTimeoutError(
                    f"metasurface controller at {self.port} stayed silent for {waited_s:g} s after "
                    f"{command!r}{tries}{lines}{got} (the firmware answers nothing to a command it does "
                    "not understand: check the port, the baud rate and the command)",
                    command=command, port=self.port)
            try:
                if self._fd is not None:  # a POSIX port: whatever has arrived, in one system call
                    ready, _, _ = select.select([self._fd], [], [], min(_POLL_S, max(0.0, deadline - time.monotonic())))
                    chunk = os.read(self._fd, 4096) if ready else b""
                    if ready and not chunk:
                        raise serial.SerialException("the device reports data but returns none (disconnected?)")
                else:
                    chunk = port.read(max(1, port.in_waiting))
            except (serial.SerialException, OSError) as exc:
                raise RISError(f"metasurface controller at {self.port}: reading the reply to {command!r} "
                               f"failed: {exc}", command=command, port=self.port) from exc
            self._rx += chunk


def _posix_fd(port: serial.SerialBase) -> int | None:
    """The file descriptor of a POSIX serial port (a tty, a pty), read directly; None for anything
    else (``socket://`` and other URL handlers, Windows), read through pyserial."""
    if os.name != "posix" or not isinstance(port, serial.Serial) or type(port).__module__ != "serial.serialposix":
        return None
    try:
        return int(port.fileno())
    except (AttributeError, ValueError, OSError, serial.SerialException):
        return None


def _positive(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)) or not value > 0:
        raise ValueError(f"{name}: must be a number > 0, got {value!r}")
    return float(value)


# -- the actuator role ---------------------------------------------------------------------------
_SETTINGS = ("settle_s", "default_pattern", "verify", "timeout_s", "retries")


class MetasurfaceActuator:
    """A metasurface behind an `RISController` as an `Actuator`.

    :param port: the controller's serial port or URL (see `RISController`).
    :param atoms: controller bit indices carrying the controls, ``bits_per_control`` consecutive
        entries per control (MSB first); default: the first ``n_bits`` bits in order.
    :param bits_per_control: k bits per control (``2**k`` levels).
    :param default_pattern: the safe state and the value of every bit not in ``atoms``: a hex string,
        a 0/1 array of ``n_bits``, or None (all zeros).
    :param settle_s: how long the rig waits after `apply` before the VNA sweeps.
    :param verify: read every pattern back and compare (doubles the wire time per row; a rig that
        overlaps rows hides it in the settle and sweep time).
    """

    def __init__(self, port: str, *, name: str = "metasurface", n_bits: int = 256,
                 atoms: Sequence[int] | None = None, bits_per_control: int = 1,
                 default_pattern: str | Sequence[int] | np.ndarray | None = None, settle_s: float = 0.005,
                 verify: bool = True, baud: int = DEFAULT_BAUD, timeout_s: float = 0.5, retries: int = 0,
                 controller: RISController | None = None):
        self.name = name
        self.controller = controller or RISController(port, baud=baud, n_bits=n_bits, timeout_s=timeout_s,
                                                      retries=retries)
        self.n_bits = self.controller.n_bits
        self.bits_per_control = _bits_per_control(bits_per_control)
        atom_list = list(range(self.n_bits)) if atoms is None else [int(a) for a in atoms]
        if not atom_list or len(atom_list) % self.bits_per_control:
            raise ValueError(f"atoms: need a non-empty multiple of bits_per_control={self.bits_per_control} "
                             f"bit indices, got {len(atom_list)}")
        if len(set(atom_list)) != len(atom_list):
            raise ValueError("atoms: a controller bit is listed twice")
        bad = [a for a in atom_list if not 0 <= a < self.n_bits]
        if bad:
            raise ValueError(f"atoms: bit indices must be in 0..{self.n_bits - 1}, got {bad[:5]}")
        self.atoms = np.array(atom_list, np.int64)
        self.n_controls = len(atom_list) // self.bits_per_control
        self.settle_s = 0.0
        self.verify = True
        self._default = np.zeros(self.n_bits, np.uint8)
        self._identity = ""
        self.last_pattern: np.ndarray | None = None  #: the last pattern written (and verified)
        self._writing: np.ndarray | None = None  # sent, its #OK not yet read
        self._verifying: np.ndarray | None = None  # latched, its read-back not yet checked
        self._prepared: tuple[bytes, np.ndarray, np.ndarray] | None = None  # (row, pattern, applied)
        self.configure(settle_s=settle_s, default_pattern=default_pattern, verify=verify)

    # -- Instrument role
    def connect(self) -> None:
        """Open the port and ask for the serial number (proves the controller answers)."""
        self.controller.open()
        self._identity = f"Open Source RIS controller {self.controller.serial_number()}"

    def close(self) -> None:
        self.controller.close()

    def identify(self) -> str:
        """``"Open Source RIS controller <serial number>"``."""
        if not self._identity:
            self._identity = f"Open Source RIS controller {self.controller.serial_number()}"
        return self._identity

    def settings(self) -> dict[str, Any]:
        return {
            "port": self.controller.port,
            "baud": self.controller.baud,
            "n_bits": self.n_bits,
            "n_controls": self.n_controls,
            "bits_per_control": self.bits_per_control,
            "atoms": self.atoms.tolist(),
            "default_pattern": pattern_to_hex(self._default),
            "settle_s": self.settle_s,
            "verify": self.verify,
            "timeout_s": self.controller.timeout_s,
            "retries": self.controller.retries,
        }

    def configure(self, **settings: Any) -> None:
        """Change any of settle_s, default_pattern, verify, timeout_s, retries; all validated together,
        nothing changes on error."""
        for key in settings:
            if key not in _SETTINGS:
                raise ValueError(f"unknown setting {key!r} (have: {', '.join(_SETTINGS)})")
        settle = settings.get("settle_s", self.settle_s)
        if isinstance(settle, bool) or not isinstance(settle, (int, float, np.integer, np.floating)) \
                or not settle >= 0:
            raise ValueError(f"settle_s: must be a number >= 0, got {settle!r}")
        default = self._default
        if "default_pattern" in settings:
            default = self._parse_pattern(settings["default_pattern"])
        verify = settings.get("verify", self.verify)
        if not isinstance(verify, (bool, np.bool_)):
            raise ValueError(f"verify: must be true or false, got {verify!r}")
        timeout = _positive("timeout_s", settings.get("timeout_s", self.controller.timeout_s))
        retries = settings.get("retries", self.controller.retries)
        if isinstance(retries, bool) or not isinstance(retries, int) or retries < 0:
            raise ValueError(f"retries: must be a whole number >= 0, got {retries!r}")
        self.settle_s, self._default, self.verify = float(settle), default, bool(verify)
        self._prepared = None  # encoded with the old default pattern
        self.controller.timeout_s, self.controller.retries = timeout, retries

    def _parse_pattern(self, value: Any) -> np.ndarray:
        if value is None:
            return np.zeros(self.n_bits, np.uint8)
        if isinstance(value, str):
            text = value[2:] if value[:2].lower() == "0x" else value
            try:
                return hex_to_pattern(text, self.n_bits)
            except ValueError as exc:
                raise ValueError(f"default_pattern: {exc}") from None
        arr = np.asarray(value)
        if arr.shape != (self.n_bits,) or not np.isin(arr, (0, 1)).all():
            raise ValueError(f"default_pattern: need {self.n_bits} bits of 0/1 or a hex string, got shape {arr.shape}")
        return arr.astype(np.uint8)

    # -- Actuator role
    def check(self, controls: np.ndarray) -> None:
        """Raise ``ValueError`` unless ``controls`` is float[B, n_controls] (or one row) in [0, 1]."""
        batch = np.asarray(controls)
        if batch.ndim == 1:
            batch = batch[None, :]
        if batch.ndim != 2 or batch.shape[1] != self.n_controls:
            raise ValueError(f"controls must have shape (B, {self.n_controls}), got {np.shape(controls)}")
        if batch.dtype.kind not in "fiu":
            raise ValueError(f"controls must be numbers, got dtype {batch.dtype}")
        bad = ~np.isfinite(batch) | (batch < 0) | (batch > 1)
        if bad.any():
            row, col = (int(i) for i in np.argwhere(bad)[0])
            raise ValueError(f"row {row}, channel {col}: control {batch[row, col]!r} is not a number in [0, 1]")

    def pattern_for(self, controls: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(pattern uint8[n_bits], applied float32[n_controls]) for one row; no I/O."""
        row = np.asarray(controls, np.float32).reshape(-1)
        self.check(row)
        bits, applied = controls_to_bits(row, self.bits_per_control)
        pattern = self._default.copy()
        pattern[self.atoms] = bits
        return pattern, applied

    def apply(self, controls: np.ndarray) -> np.ndarray:
        """Write the pattern for one row, read it back (if ``verify``); return the quantised row."""
        applied = self.begin_apply(controls)
        self.end_apply()
        self.end_verify()
        return applied

    def safe_state(self) -> None:
        """Write the configured default pattern."""
        self.write_pattern(self._default)

    def write_pattern(self, pattern: np.ndarray) -> None:
        """Set a whole controller pattern and (if ``verify``) check the read-back: a mismatch raises
        `RISReadbackError` listing the differing bits."""
        self._begin_write(pattern)
        self.end_apply()
        self.end_verify()

    # -- the same in three steps (`OverlappedActuator`), so a rig can overlap them with the sensor
    def prepare(self, controls: np.ndarray) -> None:
        """Encode a row ahead of its `begin_apply` (a rig calls this while the previous row settles)."""
        row = np.asarray(controls, np.float32).reshape(-1)
        pattern, applied = self.pattern_for(row)
        self._prepared = (row.tobytes(), pattern, applied)

    def begin_apply(self, controls: np.ndarray) -> np.ndarray:
        """Send the pattern for one row without waiting for ``#OK``; return the quantised row.

        The bytes travel on the serial line while the caller does other work (e.g. reads the
        previous row's trace); call `end_apply`, then `end_verify`, before the next `begin_apply`."""
        row = np.asarray(controls, np.float32).reshape(-1)
        prepared, self._prepared = self._prepared, None
        if prepared is not None and prepared[0] == row.tobytes():
            _, pattern, applied = prepared
        else:
            pattern, applied = self.pattern_for(row)
        self._begin_write(pattern)
        return applied

    def end_apply(self) -> float:
        """Wait for the ``#OK`` of the pattern `begin_apply` sent (it is latched: the cavity sees it
        ``settle_s`` later); return when it came (``time.perf_counter()``). With ``verify``, send
        ``?Pattern`` at once; its reply comes back while the cavity settles and the sensor measures,
        and `end_verify` checks it."""
        pattern, self._writing = self._writing, None
        if pattern is None:
            raise RISError(f"{self.name}: end_apply without begin_apply", port=self.controller.port)
        self.controller.finish_set_pattern()
        confirmed = time.perf_counter()
        if self.verify:
            self.controller.start_pattern_query()
            self._verifying = pattern
        else:
            self.last_pattern = pattern
        return confirmed

    def end_verify(self) -> None:
        """Read the pattern back and compare it with the one written (``verify`` only; else nothing):
        a mismatch raises `RISReadbackError` listing the differing bits."""
        pattern, self._verifying = self._verifying, None
        if pattern is None:
            return
        got = self.controller.finish_pattern_query()
        wrong = np.flatnonzero(got != pattern)
        if wrong.size:
            raise RISReadbackError(
                f"{self.name}: the pattern read back differs from the one written in {wrong.size} bit(s) "
                f"(first: {wrong[:8].tolist()}); wrote {pattern_to_hex(pattern)}, read {pattern_to_hex(got)}",
                command="?Pattern", port=self.controller.port)
        self.last_pattern = pattern

    def _begin_write(self, pattern: np.ndarray) -> None:
        self.last_pattern = self._writing = self._verifying = None
        self.controller.start_set_pattern(pattern)
        self._writing = np.asarray(pattern, np.uint8).copy()

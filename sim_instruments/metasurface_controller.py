"""Emulator of the open-source RIS controller (16x16 1-bit metasurface, STM32 behind a USB serial
port) served on a pseudo-terminal, so a real pyserial client opens it exactly like the real port.

Numpy and stdlib only: it must be able to run as a separate process next to a real bench.

Protocol (ASCII lines, ``"\\n"``-terminated; 115200 8N1 on the real board)
-----------------------------------------------------------------------
The firmware upper-cases what it receives, so commands and hex digits are case-insensitive; a
``"\\r"`` before the ``"\\n"`` is ignored.

- ``!0x<H>`` with exactly ``n_bits / 4`` hex digits (64 for 256 bits): shift the pattern into the
  shift registers, latch it, then answer ``#OK``.
- ``?Pattern`` -> ``#0X<H>`` (upper case): the pattern last latched (all zeros after power-on).
- ``?SerialNo`` -> ``#<serial number>``.
- ``!Reset`` -> the boot banner (a few lines ending with ``#READY!``); the pattern becomes zeros.
- Anything else, including a pattern of the wrong length or with a non-hex digit, or a line of
  128 bytes or more (the firmware's receive FIFO): **no reply at all** (as the real firmware,
  which empties its FIFO and stays silent). Clients must time out.

Bit order: bit ``i`` of a pattern is bit ``i`` of the hex string read MSB-first, i.e. bit
``4j + m`` is bit ``3 - m`` of hex digit ``j`` (``"8000..."`` sets bit 0 only). Which meta-atom on
the board a bit drives is the board's business (the real firmware reverses each byte and scans
rows and columns); the cavity model addresses atoms by this bit index.

Timing
------
- Wire time: every byte costs ``10 / baud`` seconds (8N1: start + 8 data + stop bits) in both
  directions. A pty delivers a written line at once, so the emulator waits until the received line
  *would* have ended on a real wire (``first byte seen + len(line) * 10 / baud``) before acting on
  it, and paces each reply against the same clock: in chunks of up to 62 bytes, as the board's
  USB-serial bridge (an FTDI FT231X) hands bytes to the host in USB packets, each chunk when its
  last byte would have arrived (so a reply line is complete exactly when it would be on the wire,
  and never earlier). The bridge's latency timer is not modelled (with FTDI's chip default a short
  reply may wait up to 16 ms: on a real bench check ``/sys/bus/usb-serial/devices/*/latency_timer``).
- ``latch_s``: shifting 256 bits and latching, between the end of the received line and ``#OK``.
- ``settle_s``: the cavity sees a new pattern only ``settle_s`` after the last byte of its ``#OK``
  has been sent (bias network and PIN-diode switching). `pattern_at` answers what the cavity sees
  at a ``time.monotonic()`` instant; a client that sweeps the VNA as soon as it reads ``#OK`` measures
  the old pattern (the settle-time race a rig must wait out).

Fault injection (attributes, settable at any time from tests): ``silent`` (a hung controller: reads
and discards everything, answers nothing, applies nothing), ``corrupt_readback`` (``?Pattern``
answers the latched pattern with bit 0 flipped), ``drop_next`` (the next n complete lines are lost
before the firmware sees them: no reply, no effect).
"""
from __future__ import annotations

import argparse
import bisect
import os
import select
import signal
import sys
import termios
import threading
import time
import tty

import numpy as np

from .serving import fine_sleeps

__all__ = ["MetasurfaceControllerEmulator", "bits_to_hex", "hex_to_bits", "main", "BANNER_LINES"]

#: The boot banner (after ``!Reset``); the serial-number line is filled in per instance.
BANNER_LINES = ("", "Open Source RIS (emulated)", "Firmware version: 1.0", "Serial no.: {serial}",
                "Row count: 16", "Column count: 16", "", "#READY!")

_MAX_LINE = 128  # the firmware's receive FIFO: a longer line is discarded without a reply
_CHUNK = 62  # reply bytes handed over at once: the data of one USB packet of the board's FT231X bridge
_HEX_DIGITS = frozenset("0123456789ABCDEF")


def bits_to_hex(bits: np.ndarray) -> str:
    """Upper-case hex string of a 0/1 array whose length is a multiple of 4 (bit 0 = MSB of digit 0)."""
    bits = np.asarray(bits, np.uint8).reshape(-1, 4)
    nibbles = bits @ np.array([8, 4, 2, 1], np.uint8)
    return "".join("0123456789ABCDEF"[n] for n in nibbles.tolist())


def hex_to_bits(text: str) -> np.ndarray:
    """uint8 bits (4 per hex digit, MSB first) of a hex string; ``ValueError`` on a non-hex digit."""
    values = np.array([int(c, 16) for c in text], np.uint8)
    return ((values[:, None] >> np.array([3, 2, 1, 0], np.uint8)) & 1).reshape(-1).astype(np.uint8)


#: shifting 256 bits into the registers and latching them, between a pattern line's end and its
#: ``#OK`` (the firmware answers "after shift and latch"): part of the time a configuration needs
LATCH_S = 0.0003


class MetasurfaceControllerEmulator:
    """The RIS controller's firmware on a pty. ``start()`` returns self; ``port`` is the device path.

    :param n_bits: pattern length (a multiple of 4; 256 on the 16x16 board).
    :param baud: the serial line's rate; sets the wire time (10 bits per byte).
    :param settle_s: delay from the end of ``#OK`` until the cavity sees the new pattern.
    :param serial_no: answered by ``?SerialNo`` and printed in the banner.
    :param latch_s: shift-and-latch time between the end of the command line and ``#OK``.
    :param boot_s: time from ``!Reset`` to the first banner byte.
    """

    def __init__(self, n_bits: int = 256, *, baud: int = 115200, settle_s: float = 0.002,
                 serial_no: str = "RIS-SIM-0001", latch_s: float = LATCH_S, boot_s: float = 0.01):
        if isinstance(n_bits, bool) or not isinstance(n_bits, (int, np.integer)) or n_bits < 4 or n_bits % 4:
            raise ValueError(f"n_bits: must be a positive multiple of 4, got {n_bits!r}")
        if not baud > 0:
            raise ValueError(f"baud: must be > 0, got {baud!r}")
        for key, value in (("settle_s", settle_s), ("latch_s", latch_s), ("boot_s", boot_s)):
            if not value >= 0:
                raise ValueError(f"{key}: must be >= 0, got {value!r}")
        if not serial_no or any(c in serial_no for c in "\r\n"):
            raise ValueError(f"serial_no: must be one non-empty line, got {serial_no!r}")
        self.n_bits = int(n_bits)
        self.baud = float(baud)
        self.byte_s = 10.0 / self.baud
        self.settle_s = float(settle_s)
        self.latch_s = float(latch_s)
        self.boot_s = float(boot_s)
        self.serial_no = serial_no
        # fault injection
        self.silent = False
        self.corrupt_readback = False
        self.drop_next = 0
        # counters (tests read them)
        self.lines_received = 0
        self.patterns_latched = 0
        self.last_ok_time: float | None = None  #: monotonic time the last ``#OK`` finished sending
        self._latched = np.zeros(self.n_bits, np.uint8)
        # what the cavity sees: (visible from, pattern), times increasing; before the first entry, zeros
        self._history_times: list[float] = []
        self._history_bits: list[np.ndarray] = []
        self._history_limit = 4096
        self._lock = threading.Lock()
        self._master: int | None = None
        self._slave: int | None = None
        self._stop_r: int | None = None
        self._stop_w: int | None = None
        self._thread: threading.Thread | None = None
        self.port = ""

    # -- lifecycle
    def start(self) -> MetasurfaceControllerEmulator:
        if self._thread is not None:
            return self
        master, slave = os.openpty()
        # raw, no echo: the bytes a client writes reach us unchanged and are never sent back
        tty.setraw(slave, termios.TCSANOW)
        attrs = termios.tcgetattr(slave)
        attrs[3] &= ~(termios.ECHO | termios.ECHONL)
        termios.tcsetattr(slave, termios.TCSANOW, attrs)
        # we keep the slave open ourselves, so the master never reads EIO between two clients
        self._master, self._slave = master, slave
        self._stop_r, self._stop_w = os.pipe()
        self.port = os.ttyname(slave)
        self._thread = threading.Thread(target=self._serve, name="ris-controller", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        thread, self._thread = self._thread, None
        if thread is None:
            return
        os.write(self._stop_w, b"x")
        thread.join(timeout=5)
        for fd in (self._master, self._slave, self._stop_r, self._stop_w):
            try:
                os.close(fd)
            except OSError:
                pass
        self._master = self._slave = self._stop_r = self._stop_w = None

    def __enter__(self) -> MetasurfaceControllerEmulator:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- what the cavity sees (thread-safe)
    def pattern_at(self, t: float | None = None) -> np.ndarray:
        """The pattern (uint8[n_bits], a copy) the cavity sees at monotonic time ``t`` (default: now).

        A latched pattern becomes visible ``settle_s`` after its ``#OK`` was sent; times in the
        future answer from the commands received so far."""
        if t is None:
            t = time.monotonic()
        with self._lock:
            i = bisect.bisect_right(self._history_times, t)
            if i == 0:
                return np.zeros(self.n_bits, np.uint8)
            return self._history_bits[i - 1].copy()

    @property
    def latched(self) -> np.ndarray:
        """The pattern in the output latches now (what ``?Pattern`` reports without faults)."""
        with self._lock:
            return self._latched.copy()

    def _make_visible(self, bits: np.ndarray, at: float) -> None:
        with self._lock:
            # a later command can never become visible before an earlier one (times are monotonic)
            self._history_times.append(at)
            self._history_bits.append(bits)
            if len(self._history_times) > self._history_limit:
                del self._history_times[: -self._history_limit // 2]
                del self._history_bits[: -self._history_limit // 2]

    # -- serving
    def _serve(self) -> None:
        fine_sleeps()  # wire, latch and settle times kept to a few us
        line = bytearray()
        # when the byte just taken would have finished arriving on a real wire: the receiver runs
        # on its own (full duplex), so this clock never waits for our replies
        rx_clock = 0.0
        while True:
            try:
                ready, _, _ = select.select([self._master, self._stop_r], [], [])
            except (OSError, ValueError):
                return
            if self._stop_r in ready:
                return
            try:
                chunk = os.read(self._master, 4096)
            except OSError:
                time.sleep(0.01)  # no client side for a moment (should not happen: we hold the slave)
                continue
            rx_clock = max(rx_clock, time.monotonic())
            for byte in chunk:
                rx_clock += self.byte_s
                if self.silent:
                    line.clear()
                elif byte == 0x0A:
                    received = bytes(line)
                    line.clear()
                    if len(received) < _MAX_LINE:  # the firmware's FIFO drops longer lines
                        self._handle(received, rx_clock)
                elif len(line) < _MAX_LINE:
                    line.append(byte)

    def _handle(self, raw: bytes, line_end: float) -> None:
        """Act on one line once it would have arrived whole (``line_end``, monotonic)."""
        text = raw.decode("ascii", errors="replace").rstrip("\r").upper()
        n_hex = self.n_bits // 4
        is_pattern = text.startswith("!0X") and len(text) == 3 + n_hex and set(text[3:]) <= _HEX_DIGITS
        bits = hex_to_bits(text[3:]) if is_pattern else None  # decoded while the line is still arriving
        # a pattern is shifted and latched latch_s after the end of its line (one wake-up for both)
        self._sleep_until(line_end + self.latch_s if is_pattern else line_end)
        self.lines_received += 1
        if self.drop_next > 0:
            self.drop_next -= 1
            return
        if self.silent:
            return
        if is_pattern:
            with self._lock:
                self._latched = bits
            self.patterns_latched += 1
            # visible settle_s after the #OK's last byte can first be out, registered before it goes:
            # a thread starved after sending must not let a sweep see the old pattern
            ok = b"#OK\n"
            self._make_visible(bits, time.monotonic() + len(ok) * self.byte_s + self.settle_s)
            self.last_ok_time = self._send(ok)
        elif text == "?PATTERN":
            bits = self.latched
            if self.corrupt_readback:
                bits[0] ^= 1
            self._send(b"#0X" + bits_to_hex(bits).encode() + b"\n")
        elif text == "?SERIALNO":
            self._send(b"#" + self.serial_no.encode("ascii", errors="replace") + b"\n")
        elif text == "!RESET":
            zeros = np.zeros(self.n_bits, np.uint8)
            with self._lock:
                self._latched = zeros
            self._make_visible(zeros, time.monotonic())  # power-on clears the latches at once
            self._sleep_until(time.monotonic() + self.boot_s)
            banner = "\n".join(BANNER_LINES).format(serial=self.serial_no) + "\n"
            self._send(banner.encode("ascii", errors="replace"))
        # anything else: silence, as the firmware

    def _send(self, data: bytes) -> float:
        """Write ``data`` paced at the baud rate, in chunks of up to `_CHUNK` bytes, each when its
        last byte would have arrived (never earlier); return the monotonic time its last byte is out."""
        start = time.monotonic()
        sent = 0
        while sent < len(data):
            self._sleep_until(start + min(len(data), sent + _CHUNK) * self.byte_s)
            due = min(len(data), max(sent + 1, int((time.monotonic() - start) / self.byte_s)))
            try:
                sent += os.write(self._master, data[sent:due])
            except OSError:
                return time.monotonic()
        return time.monotonic()

    @staticmethod
    def _sleep_until(deadline: float) -> None:
        delay = deadline - time.monotonic()
        if delay > 0:
            time.sleep(delay)


# -- command line ------------------------------------------------------------------------------
def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m labpnn.sim_instruments.metasurface_controller",
        description="Emulated open-source RIS controller on a pseudo-terminal (prints the port path).")
    p.add_argument("--bits", type=int, default=256, help="pattern length in bits (multiple of 4)")
    p.add_argument("--baud", type=int, default=115200, help="serial rate that paces the wire (default 115200)")
    p.add_argument("--settle-ms", type=float, default=2.0, help="delay from #OK until the cavity sees a pattern")
    p.add_argument("--latch-ms", type=float, default=LATCH_S * 1e3, help="shift-and-latch time before #OK")
    p.add_argument("--serial-no", default="RIS-SIM-0001", help="serial number (?SerialNo, banner)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        emulator = MetasurfaceControllerEmulator(args.bits, baud=args.baud, settle_s=args.settle_ms / 1e3,
                                                 latch_s=args.latch_ms / 1e3, serial_no=args.serial_no)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            signal.signal(sig, lambda *_: stop.set())
        except ValueError:  # not the main thread: the caller stops us some other way
            pass
    with emulator:
        print(emulator.port, flush=True)
        stop.wait()
    return 0


if __name__ == "__main__":
    sys.exit(main())

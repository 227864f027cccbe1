"""What the SCPI emulators share (the AQ6370 OSA, the PNA/ZNB VNA): a line of ``;``-separated
commands executed in order with their replies joined by ``;``, an error queue of SCPI codes that
overflows as instruments do, and quote-aware splitting.

An emulator mixes in `ScpiCommands` and provides ``_execute(header, params, prefix) -> (reply or
None, prefix)``, ``_errors`` (a deque) and ``_lock``; ``quotes`` says which quotes protect a ``;``
(the AQ6370's commands quote with ``"`` only). Imports nothing of labpnn.
"""
from __future__ import annotations

#: error-queue length; the last entry becomes "Queue overflow" when it is full
QUEUE_LEN = 32


class ScpiError(Exception):
    """A command failed: ``code`` is the SCPI error number, ``message`` its text."""

    def __init__(self, code: int, message: str):
        super().__init__(message)
        self.code = code
        self.message = message


def undefined() -> ScpiError:
    return ScpiError(-113, "Undefined header")


def split_top(text: str, sep: str, quotes: str = "'\"") -> list[str]:
    """Split on ``sep`` outside quotes (any of ``quotes``); each part stripped."""
    out, buf, quote = [], [], None
    for ch in text:
        if quote is None and ch in quotes:
            quote = ch
        elif ch == quote:
            quote = None
        if ch == sep and quote is None:
            out.append("".join(buf).strip())
            buf = []
        else:
            buf.append(ch)
    out.append("".join(buf).strip())
    return out


class ScpiCommands:
    """Executes command lines against ``self._execute`` (see the module docstring)."""

    quotes = "'\""

    def _push_error(self, code: int, message: str) -> None:
        if len(self._errors) >= QUEUE_LEN:
            self._errors[-1] = (-350, "Queue overflow")
        else:
            self._errors.append((code, message))

    def execute_line(self, line: str) -> bytes | None:
        """Execute one line of (possibly ``;``-separated) commands; returns the reply or None."""
        replies: list[bytes] = []
        prefix: list[str] = []
        for cmd in split_top(line, ";", self.quotes):
            if not cmd:
                continue
            parts = cmd.split(None, 1)
            header, params = parts[0], (parts[1].strip() if len(parts) > 1 else "")
            try:
                reply, prefix = self._execute(header, params, prefix)
            except ScpiError as err:
                with self._lock:
                    self._push_error(err.code, err.message)
                continue
            if reply is not None:
                replies.append(reply)
        if not replies:
            return None
        return b";".join(replies) + b"\n"

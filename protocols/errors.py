"""Error codes of the wire protocol and the exceptions that carry them.

Every error reply names one of these codes (see PROTOCOL.md, "Errors"). The same exception classes
are raised in-process by the rig and by ``RigClient`` when a reply carries the code, so a caller
handles a local and a remote rig alike.
"""
from __future__ import annotations

from enum import Enum


class ErrorCode(str, Enum):
    BAD_FRAMES = "BAD_FRAMES"  # wrong frame count, undecodable JSON, not a request
    BAD_VERSION = "BAD_VERSION"  # version frame unknown / not supported
    BAD_REQUEST = "BAD_REQUEST"  # header fails validation (extra keys, wrong types)
    UNKNOWN_OP = "UNKNOWN_OP"
    BAD_ARRAY = "BAD_ARRAY"  # dtype/shape/byte count of an array frame wrong
    INVALID_CONTROLS = "INVALID_CONTROLS"  # NaN/inf, outside [0, 1], wrong number of channels
    LIMIT = "LIMIT"  # an instrument safety limit refuses the batch
    BAD_SETTING = "BAD_SETTING"  # configure: unknown instrument/setting or invalid value
    TOO_LARGE = "TOO_LARGE"  # payload larger than the server accepts
    NOT_LOCKED = "NOT_LOCKED"  # actuation without holding the lock
    LOCKED = "LOCKED"  # another client holds the lock
    ABORTED = "ABORTED"  # the run was aborted; completed rows are returned
    INSTRUMENT = "INSTRUMENT"  # an instrument failed; completed rows are returned
    TIMEOUT = "TIMEOUT"  # client side: no reply in time
    AUTH = "AUTH"  # client side: CURVE handshake refused
    SHUTDOWN = "SHUTDOWN"  # server is shutting down
    INTERNAL = "INTERNAL"  # a bug in the server; it keeps serving


class LabpnnError(RuntimeError):
    """Base of all protocol-level errors; ``code`` is the wire error code."""

    code: ErrorCode = ErrorCode.INTERNAL

    def __init__(self, message: str, *, details: dict | None = None):
        super().__init__(message)
        self.message = message
        self.details = details or {}


def _error(name: str, code: ErrorCode, doc: str) -> type[LabpnnError]:
    return type(name, (LabpnnError,), {"code": code, "__doc__": doc})


BadFrames = _error("BadFrames", ErrorCode.BAD_FRAMES, "The message could not be parsed as a request.")
BadVersion = _error("BadVersion", ErrorCode.BAD_VERSION, "Protocol version not supported.")
BadRequest = _error("BadRequest", ErrorCode.BAD_REQUEST, "The header failed validation.")
UnknownOp = _error("UnknownOp", ErrorCode.UNKNOWN_OP, "No such operation.")
BadArray = _error("BadArray", ErrorCode.BAD_ARRAY, "An array frame does not match its declaration.")
InvalidControls = _error(
    "InvalidControls", ErrorCode.INVALID_CONTROLS, "Controls not finite, not in [0, 1] or wrong shape."
)
LimitExceeded = _error("LimitExceeded", ErrorCode.LIMIT, "An instrument safety limit refused the batch.")
BadSetting = _error("BadSetting", ErrorCode.BAD_SETTING, "A setting is unknown or invalid.")
TooLarge = _error("TooLarge", ErrorCode.TOO_LARGE, "The payload is larger than the server accepts.")
NotLocked = _error("NotLocked", ErrorCode.NOT_LOCKED, "Actuation requires holding the lock.")
Locked = _error("Locked", ErrorCode.LOCKED, "Another client holds the lock.")
Aborted = _error("Aborted", ErrorCode.ABORTED, "The run was aborted.")
InstrumentFailure = _error("InstrumentFailure", ErrorCode.INSTRUMENT, "An instrument failed.")
RequestTimeout = _error("RequestTimeout", ErrorCode.TIMEOUT, "No reply within the timeout.")
AuthFailed = _error("AuthFailed", ErrorCode.AUTH, "The server refused the security handshake.")
ShuttingDown = _error("ShuttingDown", ErrorCode.SHUTDOWN, "The server is shutting down.")
InternalError = _error("InternalError", ErrorCode.INTERNAL, "Unexpected server error.")

_BY_CODE = {cls.code: cls for cls in LabpnnError.__subclasses__()}


def error_for(code: str | ErrorCode, message: str, details: dict | None = None) -> LabpnnError:
    """The exception instance for a wire error code (unknown codes become `InternalError`)."""
    try:
        cls = _BY_CODE[ErrorCode(code)]
    except ValueError:
        cls = InternalError
    return cls(message, details=details)

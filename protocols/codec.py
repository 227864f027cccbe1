"""Pure encode/decode functions for the wire protocol (PROTOCOL.md §2–§5).

Frames in: ``bytes``, ``memoryview`` or ``zmq.Frame`` (anything with the buffer protocol; a
``zmq.Frame`` is read through its ``.buffer`` without copying). Frames out: a list of ``bytes`` and
buffer objects (numpy arrays) for ``socket.send_multipart(frames, copy=False)`` — pyzmq copies the
small ones and sends the large ones (≥ 64 KiB) without copying.

Only the header is validated by pydantic; arrays are checked with plain arithmetic and wrapped
with ``np.frombuffer`` (no copy: the arrays share the received frames' memory, read-only). Errors are the
protocol exceptions of ``errors``. Nothing here touches a socket.
"""
from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import orjson
from pydantic import ValidationError

from labpnn.protocols.errors import (
    BadArray,
    BadFrames,
    BadRequest,
    BadVersion,
    LabpnnError,
    TooLarge,
    UnknownOp,
)
from labpnn.protocols.messages import (
    DTYPES,
    MAX_ARRAYS,
    MAX_DIMS,
    MAX_HEADER_BYTES,
    OPS,
    REPLY_ADAPTER,
    REQUEST_ADAPTER,
    SUPPORTED_VERSIONS,
    VERSION,
    ArraySpec,
    Progress,
    Reply,
)

_NP_DTYPES = {k: np.dtype(v) for k, v in DTYPES.items()}
_WIRE_NAMES = {(dt.kind, dt.itemsize): k for k, dt in _NP_DTYPES.items()}
_WIRE_OF_DTYPE = {dt: k for k, dt in _NP_DTYPES.items()}  #: exact (little-endian) dtypes only


# -- small helpers ---------------------------------------------------------------------------
def _buffer(frame: Any) -> Any:
    """A buffer over a frame's bytes without copying (zmq.Frame -> its memoryview, read-only:
    decoded arrays are a record of what arrived, and a session need not copy them)."""
    buf = getattr(frame, "buffer", None)
    return frame if buf is None else buf.toreadonly()


def _as_bytes(frame: Any) -> bytes:
    if isinstance(frame, bytes):
        return frame
    raw = getattr(frame, "bytes", None)
    return raw if isinstance(raw, bytes) else bytes(frame)


def _nbytes(frame: Any) -> int:
    if isinstance(frame, (bytes, bytearray)):
        return len(frame)
    return memoryview(_buffer(frame)).nbytes


def _json_default(obj: Any) -> Any:
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, (set, frozenset, tuple)):
        return list(obj)
    if hasattr(obj, "__fspath__"):
        return str(obj)
    raise TypeError(f"{type(obj).__name__} is not JSON serialisable")


_ORJSON_OPTIONS = orjson.OPT_SERIALIZE_NUMPY | orjson.OPT_NON_STR_KEYS


def dumps(obj: Any) -> bytes:
    """Compact JSON, UTF-8; numpy values become plain JSON; NaN/inf become null. (orjson: the
    stdlib encoder cost ~7 us per reply header, a tenth of a loopback round trip.)"""
    try:
        return orjson.dumps(obj, default=_json_default, option=_ORJSON_OPTIONS)
    except orjson.JSONEncodeError:  # e.g. a big-endian array: every array through _json_default
        try:
            return orjson.dumps(obj, default=_json_default, option=orjson.OPT_NON_STR_KEYS)
        except orjson.JSONEncodeError as exc:
            raise TypeError(str(exc)) from None


def array_frames(arrays: Mapping[str, Any] | None) -> tuple[list[dict], list[Any]]:
    """Declarations and frames for named arrays (little-endian, C order)."""
    specs: list[dict] = []
    frames: list[Any] = []
    if not arrays:
        return specs, frames
    for name, value in arrays.items():
        arr = value if type(value) is np.ndarray else np.asarray(value)
        wire = _WIRE_OF_DTYPE.get(arr.dtype)
        if wire is None:  # big-endian data or host, or a dtype the wire does not carry
            wire = _WIRE_NAMES.get((arr.dtype.kind, arr.dtype.itemsize))
            if wire is None:
                raise BadArray(f"array {name!r}: dtype {arr.dtype} cannot be sent (allowed: {', '.join(DTYPES)})")
            arr = arr.astype(_NP_DTYPES[wire])
        if not arr.flags.c_contiguous:
            arr = np.ascontiguousarray(arr)
        specs.append({"name": name, "dtype": wire, "shape": arr.shape})
        frames.append(arr.data if arr.nbytes else b"")
    return specs, frames


def peek_id(frames: Sequence[Any]) -> str | None:
    """Best effort: the request id in a message that failed to decode (None if unreadable)."""
    if len(frames) < 2:
        return None
    try:
        if _nbytes(frames[1]) > MAX_HEADER_BYTES:
            return None
        header = json.loads(_as_bytes(frames[1]))
    except (ValueError, TypeError, UnicodeDecodeError):
        return None
    rid = header.get("id") if isinstance(header, dict) else None
    return rid if isinstance(rid, str) and 1 <= len(rid) <= 64 else None


def _validation_message(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors()[:5]:
        loc = ".".join(str(p) for p in err["loc"]) or "(header)"
        parts.append(f"{loc}: {err['msg']}")
    more = len(exc.errors()) - 5
    return "; ".join(parts) + (f"; and {more} more" if more > 0 else "")


def _classify(exc: ValidationError, header: Any) -> LabpnnError:
    errors = exc.errors()
    kinds = {e["type"] for e in errors}
    if "json_invalid" in kinds:
        return BadFrames(f"header is not valid JSON: {errors[0]['msg']}")
    if errors and errors[0]["loc"] == () and errors[0]["type"] in ("model_type", "model_attributes_type",
                                                                   "dict_type", "union_tag_not_found"):
        if errors[0]["type"] == "union_tag_not_found":
            return BadRequest("header has no 'op'", details={"field": "op"})
        return BadFrames("header must be a JSON object")
    if "union_tag_invalid" in kinds:
        op = None
        try:
            op = json.loads(_as_bytes(header)).get("op")
        except Exception:
            pass
        if not isinstance(op, str):
            return BadRequest(f"'op' must be a string, got {type(op).__name__}", details={"field": "op"})
        return UnknownOp(f"unknown op {op[:64]!r} (have: {', '.join(OPS)})", details={"op": op[:64]})
    return BadRequest(f"invalid request header: {_validation_message(exc)}",
                      details={"fields": [".".join(str(p) for p in e["loc"]) for e in errors[:10]]})


def check_arrays(specs: Sequence[ArraySpec | dict], max_bytes: int | None = None) -> list[tuple[str, np.dtype,
                                                                                                tuple, int]]:
    """Check declarations before touching frames: dtype allowed, dims >= 0, names unique, total
    size within ``max_bytes``. Returns (name, dtype, shape, nbytes) per array."""
    out = []
    total = 0
    for spec in specs:
        if type(spec) is dict:
            name, dtype, shape = spec["name"], spec["dtype"], spec["shape"]
        else:
            name, dtype, shape = spec.name, spec.dtype, spec.shape
        dt = _NP_DTYPES.get(dtype)
        if dt is None:
            raise BadArray(f"array {name!r}: dtype {dtype!r} not allowed (allowed: {', '.join(DTYPES)})",
                           details={"array": name, "dtype": dtype})
        if len(shape) > MAX_DIMS:
            raise BadArray(f"array {name!r}: at most {MAX_DIMS} dimensions", details={"array": name})
        count = 1
        for dim in shape:
            if dim < 0:
                raise BadArray(f"array {name!r}: negative dimension in shape {list(shape)}",
                               details={"array": name, "shape": list(shape)})
            count *= dim
        nbytes = count * dt.itemsize
        total += nbytes
        if max_bytes is not None and total > max_bytes:
            raise TooLarge(
                f"declared arrays total at least {total} bytes, more than the limit of {max_bytes} bytes",
                details={"bytes": total, "max_message_bytes": max_bytes})
        out.append((name, dt, tuple(shape), nbytes))
    if len(out) > 1 and len({item[0] for item in out}) != len(out):
        raise BadArray("an array name is declared twice", details={"arrays": [item[0] for item in out]})
    return out


def decode_arrays(specs: Sequence[ArraySpec | dict], frames: Sequence[Any],
                  max_bytes: int | None = None) -> dict[str, np.ndarray]:
    """Arrays over the frames' memory (no copy), after `check_arrays`; frame lengths must match."""
    if not specs and not frames:
        return {}
    if len(specs) > MAX_ARRAYS:
        raise BadFrames(f"at most {MAX_ARRAYS} arrays per message, {len(specs)} declared")
    if len(frames) != len(specs):
        raise BadFrames(f"header declares {len(specs)} array(s) but {len(frames)} array frame(s) follow",
                        details={"declared": len(specs), "frames": len(frames)})
    arrays: dict[str, np.ndarray] = {}
    for (name, dt, shape, nbytes), frame in zip(check_arrays(specs, max_bytes), frames, strict=True):
        got = frame.nbytes if type(frame) is memoryview else len(frame)
        if got != nbytes:
            raise BadArray(
                f"array {name!r}: frame has {got} bytes, shape {list(shape)} x {dt.itemsize} needs {nbytes}",
                details={"array": name, "bytes": got, "expected_bytes": nbytes})
        if nbytes == 0:
            arrays[name] = np.zeros(shape, dt)
        else:
            arrays[name] = np.frombuffer(_buffer(frame), dtype=dt).reshape(shape)
    return arrays


# -- requests --------------------------------------------------------------------------------
def encode_request(op: str, args: Mapping[str, Any] | None = None,
                   arrays: Mapping[str, Any] | None = None, *, id: str, token: str) -> list[Any]:
    """Frames of a request: ``[VERSION, header, arrays...]`` (no routing id, no delimiter)."""
    specs, frames = array_frames(arrays)
    header = {"id": id, "op": op, "token": token, "args": dict(args or {}), "arrays": specs}
    return [VERSION, dumps(header), *frames]


def decode_request(frames: Sequence[Any], *, max_bytes: int | None = None) -> tuple[Any, dict[str, np.ndarray]]:
    """``[VERSION, header, arrays...]`` -> (request model, {name: array}). Raises BadFrames,
    BadVersion, BadRequest, UnknownOp, BadArray, TooLarge."""
    if len(frames) < 2:
        raise BadFrames(f"a request has at least 2 frames (version, header), got {len(frames)}",
                        details={"frames": len(frames)})
    version = _as_bytes(frames[0]) if _nbytes(frames[0]) <= 64 else b"?"
    if version != VERSION:
        raise BadVersion(f"unsupported protocol version {version[:16]!r}; this server speaks "
                         f"{VERSION.decode()}", details={"supported": list(SUPPORTED_VERSIONS)})
    header = frames[1]
    size = _nbytes(header)
    if size > MAX_HEADER_BYTES:
        raise TooLarge(f"header has {size} bytes, more than the limit of {MAX_HEADER_BYTES}",
                       details={"bytes": size, "max_header_bytes": MAX_HEADER_BYTES})
    raw = _as_bytes(header)
    try:
        request = REQUEST_ADAPTER.validate_json(raw)
    except ValidationError as exc:
        raise _classify(exc, raw) from None
    return request, decode_arrays(request.arrays, frames[2:], max_bytes)


# -- replies ---------------------------------------------------------------------------------
def error_info(exc: LabpnnError) -> dict[str, Any]:
    return {"code": exc.code.value if hasattr(exc.code, "value") else str(exc.code),
            "message": str(exc.message if hasattr(exc, "message") else exc),
            "details": dict(getattr(exc, "details", None) or {})}


def encode_reply(id: str | None, *, ok: bool = True, result: Mapping[str, Any] | None = None,
                 error: LabpnnError | Mapping[str, Any] | None = None,
                 arrays: Mapping[str, Any] | None = None) -> list[Any]:
    """Frames of a reply: ``[VERSION, header, arrays...]``. ``error`` makes ``ok`` false."""
    specs, frames = array_frames(arrays)
    if error is not None:
        ok = False
        error = error_info(error) if isinstance(error, LabpnnError) else dict(error)
    header = {"kind": "reply", "id": id, "ok": ok, "result": None if result is None else dict(result),
              "error": error, "arrays": specs}
    return [VERSION, dumps(header), *frames]


def encode_error(id: str | None, exc: LabpnnError) -> list[Any]:
    return encode_reply(id, error=exc)


def encode_progress(id: str, *, state: str, done: int | None = None, total: int | None = None,
                    queue_position: int = 0) -> list[bytes]:
    header = {"kind": "progress", "id": id,
              "progress": {"state": state, "done": done, "total": total, "queue_position": queue_position}}
    return [VERSION, dumps(header)]


def decode_reply(frames: Sequence[Any]) -> tuple[Reply | Progress, dict[str, np.ndarray]]:
    """``[VERSION, header, arrays...]`` -> (Reply or Progress, {name: array}). Raises BadFrames or
    BadVersion for a malformed reply."""
    if len(frames) < 2:
        raise BadFrames(f"a reply has at least 2 frames, got {len(frames)}")
    version = _as_bytes(frames[0]) if _nbytes(frames[0]) <= 64 else b"?"
    if version != VERSION:
        raise BadVersion(f"reply in unsupported protocol version {version[:16]!r}",
                         details={"supported": list(SUPPORTED_VERSIONS)})
    try:
        message = REPLY_ADAPTER.validate_json(_as_bytes(frames[1]))
    except ValidationError as exc:
        raise BadFrames(f"malformed reply header: {_validation_message(exc)}") from None
    specs = message.arrays if isinstance(message, Reply) else []
    return message, decode_arrays(specs, frames[2:])


def reply_error(reply: Reply) -> LabpnnError | None:
    """The exception a failed reply stands for (None when ``ok``)."""
    from labpnn.protocols.errors import error_for

    if reply.ok:
        return None
    err = reply.error
    if err is None:
        return error_for("INTERNAL", "reply has ok=false but no error")
    if isinstance(err, dict):
        return error_for(err.get("code", "INTERNAL"), err.get("message", ""), err.get("details"))
    return error_for(err.code, err.message, err.details)

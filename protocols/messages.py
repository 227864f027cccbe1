"""Message models of the wire protocol (PROTOCOL.md), pydantic v2, ``extra="forbid"``.

Only headers are modelled here; arrays travel as raw frames (see ``codec``). A request is one of
the ``*Request`` models, discriminated on ``op``; each has its own ``args`` model.
"""
from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter

VERSION = b"LPNN1"
SUPPORTED_VERSIONS = ("LPNN1",)
MAX_HEADER_BYTES = 1 << 20
MAX_ARRAYS = 16
MAX_DIMS = 8

#: dtype name on the wire -> numpy dtype string (always little-endian)
DTYPES: dict[str, str] = {
    "float32": "<f4", "float64": "<f8",
    "int8": "i1", "int16": "<i2", "int32": "<i4", "int64": "<i8",
    "uint8": "u1", "uint16": "<u2", "uint32": "<u4", "uint64": "<u8",
}

#: ops whose replies are cached under (identity, id) so that a retry never acts twice
CACHED_OPS = frozenset({"run", "configure", "lock", "unlock", "abort"})
#: ops that need the lock
LOCKED_OPS = frozenset({"run", "configure", "abort"})


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


Id = Annotated[str, Field(min_length=1, max_length=64)]
Token = Annotated[str, Field(min_length=1, max_length=128)]


class ArraySpec(Strict):
    name: Annotated[str, Field(min_length=1, max_length=64)]
    dtype: Annotated[str, Field(min_length=1, max_length=16)]  # checked against DTYPES by the codec
    shape: Annotated[list[int], Field(max_length=MAX_DIMS)]


# -- args, one model per op ------------------------------------------------------------------
class NoArgs(Strict):
    pass


class HelloArgs(Strict):
    versions: list[Annotated[str, Field(max_length=16)]] = Field(default_factory=lambda: ["LPNN1"],
                                                                 max_length=16)
    client: Annotated[str, Field(max_length=200)] | None = None


class ConfigureArgs(Strict):
    settings: dict[str, dict[str, Any]]


class LockArgs(Strict):
    lease_s: Annotated[float, Field(gt=0, le=3600, allow_inf_nan=False)] | None = None


class _Request(Strict):
    id: Id
    token: Token
    arrays: Annotated[list[ArraySpec], Field(max_length=MAX_ARRAYS)] = Field(default_factory=list)


class HelloRequest(_Request):
    op: Literal["hello"]
    args: HelloArgs = Field(default_factory=HelloArgs)


class DescribeRequest(_Request):
    op: Literal["describe"]
    args: NoArgs = Field(default_factory=NoArgs)


class StatusRequest(_Request):
    op: Literal["status"]
    args: NoArgs = Field(default_factory=NoArgs)


class ConfigureRequest(_Request):
    op: Literal["configure"]
    args: ConfigureArgs


class RunRequest(_Request):
    op: Literal["run"]
    args: NoArgs = Field(default_factory=NoArgs)


class AbortRequest(_Request):
    op: Literal["abort"]
    args: NoArgs = Field(default_factory=NoArgs)


class LockRequest(_Request):
    op: Literal["lock"]
    args: LockArgs = Field(default_factory=LockArgs)


class UnlockRequest(_Request):
    op: Literal["unlock"]
    args: NoArgs = Field(default_factory=NoArgs)


class PingRequest(_Request):
    op: Literal["ping"]
    args: NoArgs = Field(default_factory=NoArgs)


Request = Annotated[
    HelloRequest | DescribeRequest | StatusRequest | ConfigureRequest | RunRequest | AbortRequest
    | LockRequest | UnlockRequest | PingRequest,
    Field(discriminator="op"),
]
REQUEST_ADAPTER: TypeAdapter[Any] = TypeAdapter(Request)
OPS = ("hello", "describe", "status", "configure", "run", "abort", "lock", "unlock", "ping")


# -- replies ---------------------------------------------------------------------------------
class ErrorInfo(Strict):
    code: str
    message: str
    details: dict[str, Any] = Field(default_factory=dict)


class Reply(Strict):
    kind: Literal["reply"] = "reply"
    id: Id | None
    ok: bool
    result: dict[str, Any] | None = None
    error: ErrorInfo | None = None
    arrays: list[ArraySpec] = Field(default_factory=list)


class ProgressInfo(Strict):
    state: Literal["queued", "running"]
    done: int | None = None
    total: int | None = None
    queue_position: int = 0


class Progress(Strict):
    kind: Literal["progress"] = "progress"
    id: Id
    progress: ProgressInfo


ReplyMessage = Annotated[Reply | Progress, Field(discriminator="kind")]
REPLY_ADAPTER: TypeAdapter[Any] = TypeAdapter(ReplyMessage)

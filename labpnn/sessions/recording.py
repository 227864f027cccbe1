"""`RecordingSystem`: any `PhysicalSystem`, wrapped so every batch it runs lands in a session;
`record_to` for a lab-side record of everything a device server does."""
from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Iterator, Mapping
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np

from labpnn.contract import Measurement, measure_of
from labpnn.protocols.errors import BadSetting, ErrorCode, LabpnnError
from labpnn.sessions.layout import _TAG_BYTES, SessionWriteError, _encode_name, _jsonable, segment_path
from labpnn.sessions.writer import SessionWriter

log = logging.getLogger(__name__)




class RecordingSystem:
    """A `PhysicalSystem` that records every batch the wrapped system runs into a session.

    ``measure`` / ``run`` / ``measure_many`` append each `Measurement` under the current ``tag``;
    ``configure`` logs a ``configure`` event (and starts a new segment if the row shape or axis
    changed); failed or refused batches, aborts and instrument errors are logged as events. Other
    attributes are passed through to the wrapped system.

    ``on_write_error="raise"`` (default) raises `SessionWriteError` (carrying the measurement) once
    the session cannot be written; ``"warn"`` logs it once and goes on without recording (for a
    device server that must keep serving). ``owns_writer=True`` closes the writer in ``close()``.
    """

    def __init__(self, system: Any, writer: SessionWriter, tag: str = "train", *,
                 on_write_error: str = "raise", owns_writer: bool = False):
        if on_write_error not in ("raise", "warn"):
            raise ValueError("on_write_error must be 'raise' or 'warn'")
        self.system = system
        self.writer = writer
        self.tag = tag
        self.on_write_error = on_write_error
        self.owns_writer = owns_writer
        self._warned = False
        self._accepts = _keyword_arguments(getattr(system, "measure", None))

    @property
    def tag(self) -> str:
        return self._tag

    @tag.setter
    def tag(self, value: str) -> None:
        if not isinstance(value, str):
            raise TypeError(f"tag must be a string, got {value!r}")
        _encode_name(value, _TAG_BYTES, "tag")
        self._tag = value

    @contextlib.contextmanager
    def tagged(self, tag: str) -> Iterator[RecordingSystem]:
        """``with rec.tagged("calibration"): ...`` records under ``tag`` inside the block."""
        old = self.tag
        self.tag = tag
        try:
            yield self
        finally:
            self.tag = old

    # -- PhysicalSystem ----------------------------------------------------------------------
    def describe(self) -> Mapping[str, Any]:
        return self.system.describe()

    def run(self, controls: np.ndarray) -> np.ndarray:
        return self.measure(controls).raise_for_error().traces

    def measure(self, controls: np.ndarray, abort: threading.Event | None = None, *, tag: str | None = None,
                **kwargs: Any) -> Measurement:
        """Measure through the wrapped system and record the result, under ``tag`` if given (this
        call only), else the current tag. ``abort`` and other keyword arguments (e.g. a server's
        ``progress``) are passed on if the wrapped ``measure`` takes them."""
        if tag is None:
            tag = self.tag
        else:
            _encode_name(tag, _TAG_BYTES, "tag")
        kwargs = {k: v for k, v in kwargs.items() if v is not None and k in self._accepts}
        if abort is not None and "abort" in self._accepts:
            kwargs["abort"] = abort
        try:
            m = self.system.measure(controls, **kwargs) if kwargs else measure_of(self.system, controls)
        except LabpnnError as exc:
            self._event("refused", exc.message, code=exc.code.value, details=exc.details, tag=tag)
            raise
        except Exception as exc:
            self._event("error", f"{type(exc).__name__}: {exc}", tag=tag)
            raise
        return self._record(m, tag)

    def measure_many(self, batches: Any, *args: Any, **kwargs: Any) -> Any:
        """The wrapped system's ``measure_many`` (several batches in flight), each result recorded.
        A list comes back as a list, an iterator as an iterator."""
        many = getattr(self.system, "measure_many", None)
        tag = self.tag
        if many is None:
            return [self.measure(b) for b in batches]
        results = many(batches, *args, **kwargs)
        if isinstance(results, list):
            return [self._record(m, tag) if isinstance(m, Measurement) else m for m in results]
        return (self._record(m, tag) if isinstance(m, Measurement) else m for m in results)

    def configure(self, settings: Mapping[str, Any]) -> Any:
        configure = getattr(self.system, "configure", None)
        if configure is None:  # a plain PhysicalSystem: nothing to configure (a clear error, not a crash)
            raise BadSetting(f"{type(self.system).__name__} has no settings to configure")
        try:
            result = configure(settings)
        except Exception as exc:
            self._event("configure_failed", str(exc), settings=settings)
            raise
        names = ", ".join(map(str, settings)) or "nothing"
        self._event("configure", f"configured {names}", settings=settings, result=result)
        try:
            describe = self.system.describe()
            if self.writer.needs_new_segment(describe):
                self.writer.new_segment(describe, "configure changed the row shape or the output axis")
        except SessionWriteError as exc:
            self._write_failed(exc, None)
        return result

    def safe_state(self) -> None:
        fn = getattr(self.system, "safe_state", None)
        if fn is not None:
            fn()
            self._event("safe_state", "actuators put in their safe state")

    def close(self) -> None:
        try:
            fn = getattr(self.system, "close", None)
            if fn is not None:
                fn()
        finally:
            if self.owns_writer:
                try:
                    self.writer.close()
                except SessionWriteError as exc:
                    if self.on_write_error == "raise":
                        raise
                    log.error("session %s is incomplete: %s", self.writer.path, exc)

    def __enter__(self) -> RecordingSystem:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_") or name in ("system", "writer"):
            raise AttributeError(name)
        return getattr(self.system, name)

    # -- internals -----------------------------------------------------------------------------
    def _record(self, m: Measurement, tag: str) -> Measurement:
        try:
            batch = self.writer.append(m, tag)
            if m.error is not None:
                err = m.error
                kind = "abort" if getattr(err, "code", None) == ErrorCode.ABORTED else "instrument_error"
                self.writer.event(kind, getattr(err, "message", str(err)), batch=batch,
                                  code=getattr(getattr(err, "code", None), "value", None),
                                  n_done=m.n_done, n_sent=int(np.shape(m.controls)[0]),
                                  details=getattr(err, "details", {}), tag=tag)
        except SessionWriteError as exc:
            self._write_failed(exc, m)
        return m

    def _event(self, kind: str, message: str, **data: Any) -> None:
        try:
            self.writer.event(kind, message, **data)
        except SessionWriteError as exc:
            self._write_failed(exc, None)

    def _write_failed(self, exc: SessionWriteError, m: Measurement | None) -> None:
        if self.on_write_error == "raise":
            raise SessionWriteError(str(exc), measurement=m) from exc
        if not self._warned:
            self._warned = True
            log.error("recording stopped: %s", exc)


def _keyword_arguments(fn: Any) -> frozenset[str]:
    """Names a callable takes as keywords (all of ``abort``/``progress`` if it takes ``**kwargs``)."""
    if fn is None:
        return frozenset()
    import inspect

    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return frozenset()
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return frozenset({"abort", "progress"})
    return frozenset(name for name, p in params.items()
                     if p.kind in (inspect.Parameter.KEYWORD_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD))


def record_to(directory: str | Path, system: Any, *, name: str | None = None, tag: str = "train",
              seeds: Any = None, on_write_error: str = "raise", writer: str = "process",
              **writer_options: Any) -> RecordingSystem:
    """Wrap ``system`` so that everything it runs is recorded in a new session file in ``directory``
    (``NAME-YYYYmmdd-HHMMSS.h5``; for ``labpnn serve --record DIR``). The wrapper owns the writer:
    closing it closes the session. The writer is a separate process by default, so that HDF5 never
    holds the GIL of the process that serves the rig."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    describe = system.describe()
    stem = name or str(describe.get("name", "session"))
    stem = "".join(c if c.isalnum() or c in "-_." else "_" for c in stem) or "session"
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    path = directory / f"{stem}-{stamp}.h5"
    k = 1
    while path.exists() or segment_path(path, 1).exists():
        k += 1
        path = directory / f"{stem}-{stamp}-{k}.h5"
    session = SessionWriter(path, describe, provenance={"seeds": _jsonable(seeds)}, writer=writer, **writer_options)
    return RecordingSystem(system, session, tag, on_write_error=on_write_error, owns_writer=True)

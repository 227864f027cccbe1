"""`Rig`: actuators and sensors composed into a `PhysicalSystem`.

For each row of a batch the rig applies every actuator (each takes its own slice of the control
vector, in order), waits until the slowest actuator's settle deadline, acquires every sensor (traces
concatenated in order) and stamps the time. Every batch is validated whole before anything moves;
on an instrument failure the rows done so far are kept and the actuators are put in their safe
state. An instrument that is the rig's only actuator and only sensor and offers ``measure_batch``
(`BatchInstrument`: a simulator, a hardware-sequenced instrument) gets the whole batch in one call
instead; its rows share the batch's completion time. When every actuator is an
`OverlappedActuator` and every sensor an `OverlappedSensor` (the microwave bench: a serial
metasurface controller and a VNA), rows overlap: row i+1's controls go out while row i's trace is
read, and a read-back check travels while the row settles and is measured (`_measure_overlapped`).
Imports no torch: the device server runs this.
"""
from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from labpnn.contract import Measurement, validate_controls
from labpnn.drivers.roles import FLAG_QUANTISED, Actuator, BatchFailed, Sensor
from labpnn.protocols.errors import (
    Aborted,
    BadSetting,
    InstrumentFailure,
    LabpnnError,
    LimitExceeded,
)

log = logging.getLogger(__name__)


class Rig:
    def __init__(self, actuators: Sequence[Actuator], sensors: Sequence[Sensor], *, name: str = "rig",
                 network: dict[str, Any] | None = None):
        if not actuators or not sensors:
            raise ValueError("a rig needs at least one actuator and one sensor")
        self.name = name
        self.network = dict(network) if network else None  #: the bench's network defaults (describe()["network"])
        self.actuators = list(actuators)
        self.sensors = list(sensors)
        self.instruments = {i.name: i for i in [*self.actuators, *self.sensors]}
        bounds = np.cumsum([0] + [a.n_controls for a in self.actuators])
        self._slices = [slice(int(lo), int(hi)) for lo, hi in zip(bounds[:-1], bounds[1:], strict=True)]
        self.n_controls = int(bounds[-1])
        self._identities: dict[str, str] = {}
        only = self.actuators[0] if len(self.actuators) == 1 and self.sensors == self.actuators else None
        self._measure_batch = getattr(only, "measure_batch", None)
        self._overlapped = (all(callable(getattr(a, m, None)) for a in self.actuators
                                for m in ("begin_apply", "end_apply", "end_verify"))
                            and all(callable(getattr(s, m, None)) for s in self.sensors
                                    for m in ("begin_sweep", "end_sweep", "fetch")))
        self._lock = threading.Lock()  # one actuation at a time, whoever calls
        self.busy_s = 0.0  #: total instrument time since connect (apply -> acquired, per row)
        self.rows_done = 0

    @property
    def n_outputs(self) -> int:
        """Trace length; follows the sensors (an OSA knows its point count only once connected)."""
        return int(sum(s.n_outputs for s in self.sensors))

    # -- lifecycle ---------------------------------------------------------------------------
    def connect(self) -> Rig:
        for inst in self.instruments.values():
            inst.connect()
            self._identities[inst.name] = inst.identify()
        return self

    def close(self) -> None:
        self.safe_state()
        for inst in self.instruments.values():
            try:
                inst.close()
            except Exception:  # closing must reach every instrument
                log.exception("closing %s failed", inst.name)

    def __enter__(self) -> Rig:
        return self.connect()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def safe_state(self) -> None:
        for actuator in self.actuators:
            try:
                actuator.safe_state()
            except Exception:
                log.exception("could not put %s in its safe state", actuator.name)

    # -- PhysicalSystem ----------------------------------------------------------------------
    def describe(self) -> dict[str, Any]:
        axes = [s.axis() for s in self.sensors]
        axis = axes[0] if len(axes) == 1 else {
            "name": "+".join(a["name"] for a in axes),
            "unit": "+".join(a["unit"] for a in axes),
            "values": [v for a in axes for v in a["values"]],
        }
        return {
            "name": self.name,
            "n_controls": self.n_controls,
            "n_outputs": self.n_outputs,
            "axis": axis,
            "limits": {"controls": [0.0, 1.0]},
            "channels": {a.name: [s.start, s.stop] for a, s in zip(self.actuators, self._slices, strict=True)},
            "instruments": dict(self._identities) or {n: i.identify() for n, i in self.instruments.items()},
            "settings": {n: i.settings() for n, i in self.instruments.items()},
            **({"network": dict(self.network)} if self.network else {}),
        }

    def validate(self, controls: Any) -> np.ndarray:
        """The batch as float32[B, C] if it may run; raises before anything moves."""
        arr = controls
        if (type(arr) is np.ndarray and arr.dtype == np.float32 and arr.ndim == 2
                and arr.shape[1] == self.n_controls and arr.shape[0] > 0 and arr.flags.c_contiguous
                and arr.min() >= 0.0 and arr.max() <= 1.0):  # fast path; NaN fails both tests
            batch = arr
        else:
            batch = validate_controls(controls, self.n_controls)  # raises, naming row and channel
        for actuator, cols in zip(self.actuators, self._slices, strict=True):
            try:
                actuator.check(batch if len(self._slices) == 1 else batch[:, cols])
            except ValueError as exc:
                raise LimitExceeded(f"{actuator.name}: {exc}") from None
        return batch

    def run(self, controls: Any) -> np.ndarray:
        return self.measure(controls).raise_for_error().traces

    def measure(self, controls: Any, *, abort: threading.Event | None = None,
                progress: Callable[[int], None] | None = None) -> Measurement:
        """Measure a batch row by row. ``abort`` is checked before each row; ``progress(n)`` is
        called after each completed row with the number of rows done so far (the device server
        uses it for progress messages; it must be cheap).

        The row loop is the per-row cost of every batch, so it is kept lean: no per-row
        function calls of our own, no slicing when one instrument covers all channels."""
        batch = self.validate(controls)
        n_rows = batch.shape[0]
        if self._measure_batch is not None and (abort is None or not abort.is_set()):
            m = self._batch_measurement(batch)
            if m is not None:
                if progress is not None:
                    progress(n_rows)
                return m
        if self._overlapped:
            return self._measure_overlapped(batch, abort, progress)
        traces = np.empty((n_rows, self.n_outputs), np.float32)
        applied = batch.copy()  # overwritten only where an actuator reports something else
        stamps = np.empty(n_rows, np.float64)
        flags = np.zeros(n_rows, np.uint32)
        settle = max(a.settle_s for a in self.actuators)
        whole_a = len(self.actuators) == 1
        acts = [(a.name, a.apply, cols) for a, cols in zip(self.actuators, self._slices, strict=True)]
        sens, start = [], 0
        for sensor in self.sensors:
            sens.append((sensor.name, sensor.acquire, slice(start, start + sensor.n_outputs)))
            start += sensor.n_outputs
        is_set = abort.is_set if abort is not None else None
        perf, now = time.perf_counter, time.time
        error: LabpnnError | None = None
        busy = 0.0
        done = 0
        with self._lock:
            for done in range(n_rows):  # noqa: B007 - `done` is the row count after the loop
                if is_set is not None and is_set():
                    error = Aborted(f"aborted after {done} of {n_rows} rows", details={"n_done": done})
                    break
                started = perf()
                name = ""
                try:
                    row = batch[done]
                    for name, apply, cols in acts:  # noqa: B007 - `name` names a fault
                        if whole_a:
                            out = apply(row)
                            if out is not row:
                                applied[done] = out
                        else:
                            applied[done, cols] = apply(row[cols])
                    if settle:
                        time.sleep(settle)
                    for name, acquire, cols in sens:  # noqa: B007
                        _store_row(traces, flags, done, cols, *acquire())
                except Exception as exc:
                    error = _row_failure(name, exc, done, n_rows)
                    self.safe_state()
                    break
                busy += perf() - started
                stamps[done] = now()
                if progress is not None:
                    progress(done + 1)
            else:
                done = n_rows
            self.busy_s += busy
            self.rows_done += done
        return _rows_measured(batch, traces, applied, stamps, flags, done, error, busy)

    def _measure_overlapped(self, batch: np.ndarray, abort: threading.Event | None,
                            progress: Callable[[int], None] | None) -> Measurement:
        """`measure` for overlapped instruments. Per row i, in this order::

            begin_apply(i)        controls of row i go out (row i-1 is swept and verified)
            fetch(i-1)            row i-1's trace is read meanwhile; row i-1 is done
            end_apply(i)          the actuators took row i (each one's settle_s counts from then);
                                  a read-back starts
            prepare(i+1)          (if the actuator has it) row i+1 encoded, within the settle time
            sleep(rest of settle_s)
            begin_sweep(i)        measured from the settled row i
            end_verify(i)         the read-back of row i, back during the settle and the sweep
            end_sweep(i)          the measurement has ended

        so row i+1 never starts before row i's measurement has ended, a trace is always read before
        the next sweep, and a failed read-back fails its own row. On an error the rows done so far
        are kept (an actuator failing at row i still lets row i-1's trace be read), a measurement
        under way is waited for, and the actuators go to their safe state. Timestamps: when each
        row's sweep ended. ``busy_s``: the loop's wall time (the rows overlap, so per-row times
        would count some of it twice)."""
        n_rows = batch.shape[0]
        traces = np.empty((n_rows, self.n_outputs), np.float32)
        applied = batch.copy()
        stamps = np.empty(n_rows, np.float64)
        flags = np.zeros(n_rows, np.uint32)
        whole_a = len(self.actuators) == 1
        acts = [(a.name, a.begin_apply, a.end_apply, a.end_verify, cols, a.settle_s)
                for a, cols in zip(self.actuators, self._slices, strict=True)]
        preps = [(a.name, a.prepare, cols) for a, cols in zip(self.actuators, self._slices, strict=True)
                 if callable(getattr(a, "prepare", None))]
        sens, start = [], 0
        for sensor in self.sensors:
            sens.append((sensor.name, sensor.begin_sweep, sensor.end_sweep, sensor.fetch,
                         slice(start, start + sensor.n_outputs)))
            start += sensor.n_outputs
        is_set = abort.is_set if abort is not None else None
        perf, now = time.perf_counter, time.time
        error: LabpnnError | None = None
        done = 0  # rows whose traces are in: row `done` is the first not finished
        swept = False  # row `done` is swept and verified, its trace not yet read
        sweeping: list[str] = []  # sensors whose measurement is under way
        name = ""

        def fetch() -> None:
            nonlocal done, swept, name
            for name, _, _, fetch_one, cols in sens:  # noqa: B007 - `name` names a fault
                _store_row(traces, flags, done, cols, *fetch_one())
            done, swept = done + 1, False
            if progress is not None:
                name = ""  # not an instrument's fault: re-raised below, as from the row loop
                progress(done)

        with self._lock:
            started = perf()
            try:
                for i in range(n_rows):
                    if is_set is not None and is_set():
                        break
                    row = batch[i]
                    for name, begin, _, _, cols, _ in acts:  # noqa: B007
                        if whole_a:
                            out = begin(row)
                            if out is not row:
                                applied[i] = out
                        else:
                            applied[i, cols] = begin(row[cols])
                    if swept:
                        fetch()
                    settled = 0.0
                    for name, _, end, _, _, settle_s in acts:  # noqa: B007
                        took = end()  # when the actuator confirmed (perf_counter), or None: now
                        settled = max(settled, (took if took is not None else perf()) + settle_s)
                    if i + 1 < n_rows:  # the next row's encoding, while this one settles
                        for _, prepare, cols in preps:
                            try:
                                prepare(batch[i + 1] if whole_a else batch[i + 1, cols])
                            except Exception:  # only a head start: begin_apply encodes it again and
                                pass  # reports any fault against its own row
                    wait = settled - perf()
                    if wait > 0:
                        time.sleep(wait)
                    for name, begin_sweep, _, _, _ in sens:  # noqa: B007
                        begin_sweep()
                        sweeping.append(name)
                    for name, _, _, verify, _, _ in acts:  # noqa: B007
                        verify()
                    for name, _, end_sweep, _, _ in sens:  # noqa: B007
                        end_sweep()
                        sweeping.remove(name)
                    stamps[i] = now()
                    swept = True
                if swept:
                    fetch()
            except Exception as exc:
                failed = name
                if not failed:
                    raise
                for sensor_name, _, end_sweep, _, _ in sens:  # a measurement under way ends first
                    if sensor_name in sweeping:
                        try:
                            end_sweep()
                        except Exception:
                            log.exception("waiting for %s after %s failed", sensor_name, failed)
                if swept and any(failed == a[0] for a in acts):  # the previous row's trace is still good
                    try:
                        fetch()
                    except Exception:
                        log.exception("reading row %d after %s failed", done, failed)
                error = _row_failure(failed, exc, done, n_rows)
                self.safe_state()
            if error is None and done < n_rows:
                error = Aborted(f"aborted after {done} of {n_rows} rows", details={"n_done": done})
            busy = perf() - started
            self.busy_s += busy
            self.rows_done += done
        return _rows_measured(batch, traces, applied, stamps, flags, done, error, busy)

    def _batch_measurement(self, batch: np.ndarray) -> Measurement | None:
        with self._lock:
            started = time.perf_counter()
            try:
                out = self._measure_batch(batch)
            except Exception as exc:
                self.safe_state()
                name = self.actuators[0].name
                done = exc if isinstance(exc, BatchFailed) else None  # the rows it measured before failing
                traces = (np.asarray(done.traces, np.float32) if done is not None
                          else np.empty((0, self.n_outputs), np.float32))
                n_done = traces.shape[0]
                flags = np.asarray(done.flags, np.uint32) if done is not None else np.empty(0, np.uint32)
                self.busy_s += time.perf_counter() - started
                self.rows_done += n_done
                kept = f"rows before row {n_done} were measured" if n_done else "no rows kept"
                return Measurement(batch, traces, batch[:n_done].copy(), np.full(n_done, time.time()), flags,
                                   InstrumentFailure(
                                       f"{name}: {exc} (row {n_done} of {batch.shape[0]}; {kept})",
                                       details={"n_done": n_done, "instrument": name,
                                                "instrument_error": type(exc).__name__}))
            if out is None:
                return None
            busy = time.perf_counter() - started
            traces, flags = out
            n_rows = batch.shape[0]
            self.busy_s += busy
            self.rows_done += n_rows
        return Measurement(batch, traces, batch, np.full(n_rows, time.time()), flags, None, busy)

    # -- settings ----------------------------------------------------------------------------
    def configure(self, settings: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
        """Apply ``{instrument: {setting: value}}``. Each instrument validates its own settings
        (an invalid value changes nothing on it). Returns the new settings of those touched."""
        unknown = set(settings) - set(self.instruments)
        if unknown:
            raise BadSetting(f"no instrument named {sorted(unknown)[0]!r} (have: {sorted(self.instruments)})")
        with self._lock:
            for name, values in settings.items():
                if not isinstance(values, dict):
                    raise BadSetting(f"settings for {name!r} must be a table of setting = value")
                try:
                    self.instruments[name].configure(**values)
                except (ValueError, TypeError) as exc:
                    raise BadSetting(f"{name}: {exc}") from None
        return {name: self.instruments[name].settings() for name in settings}


def _store_row(traces: np.ndarray, flags: np.ndarray, row: int, cols: slice, trace, bits: int) -> None:
    """One sensor's trace and flags into row ``row`` (its columns ``cols``)."""
    traces[row, cols] = trace
    if bits:
        flags[row] |= bits


def _row_failure(instrument: str, exc: BaseException, done: int, n_rows: int) -> InstrumentFailure:
    return InstrumentFailure(f"{instrument}: {exc} (row {done} of {n_rows}; rows before it were measured)",
                             details={"n_done": done, "instrument": instrument,
                                      "instrument_error": type(exc).__name__})


def _rows_measured(batch, traces, applied, stamps, flags, done, error, busy) -> Measurement:
    """The first ``done`` rows of a row loop as a `Measurement`; rows whose applied controls differ
    from those sent are flagged quantised."""
    quantised = (applied[:done] != batch[:done]).any(axis=1)
    if quantised.any():
        flags[:done][quantised] |= FLAG_QUANTISED
    return Measurement(batch, traces[:done], applied[:done], stamps[:done], flags[:done], error, busy)

"""`Rig` with a `BatchInstrument`: one call per batch, the same numbers as row by row, and the
row loop whenever the instrument declines (per-row latency) or an abort is already set. `Rig` with
overlapped instruments (`OverlappedActuator` + `OverlappedSensor`): each row's trace is its own
row's, in the order that makes it so, and every failure keeps the rows done before it."""
from __future__ import annotations

import threading
import time

import numpy as np
import pytest
from conftest import assert_same_map, controls

from labpnn.drivers.roles import BatchInstrument, OverlappedActuator, OverlappedSensor
from labpnn.protocols.errors import Aborted, InstrumentFailure, LimitExceeded
from labpnn.rig import Rig
from labpnn.sim_instruments.test_rig import SimTestRig


class CountingSim(SimTestRig):
    """Counts how often the rig took each path."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.batch_calls = self.row_calls = 0

    def measure_batch(self, controls):
        self.batch_calls += 1
        return super().measure_batch(controls)

    def acquire(self):
        self.row_calls += 1
        return super().acquire()


def test_batch_path_gives_the_row_by_row_numbers():
    batch_sim, row_sim = CountingSim(16, 64, seed=7), CountingSim(16, 64, seed=7)
    row_sim.latency_s = 1e-9  # declines the batch path, draws the same noise
    assert isinstance(batch_sim, BatchInstrument)
    batch_rig, row_rig = Rig([batch_sim], [batch_sim]).connect(), Rig([row_sim], [row_sim]).connect()
    for i, rows in enumerate([1, 5, 33]):
        x = controls(rows, seed=i)
        got, want = batch_rig.measure(x), row_rig.measure(x)
        assert_same_map(got.traces, want.traces, batch_sim, x)  # gemm vs gemv: within rounding
        np.testing.assert_array_equal(got.applied, x)
        assert got.flags.dtype == np.uint32 and got.timestamps.shape == (rows,) and got.error is None
    assert (batch_sim.batch_calls, batch_sim.row_calls) == (3, 0)
    assert row_sim.row_calls == 39 and batch_sim.actuations == row_sim.actuations == 39
    assert batch_rig.rows_done == 39 and batch_rig.busy_s > 0


def test_batch_path_still_validates_and_reports_progress():
    sim = CountingSim(16, 8, max_mean_control=0.5)
    rig = Rig([sim], [sim]).connect()
    with pytest.raises(LimitExceeded, match="max_mean_control"):
        rig.measure(np.full((2, 16), 0.9, np.float32))
    done = []
    rig.measure(controls(4, high=0.5), progress=done.append)
    assert done == [4] and sim.actuations == 4


def test_an_abort_set_before_the_batch_stops_it_before_any_row():
    sim = CountingSim(16, 8)
    abort = threading.Event()
    abort.set()
    m = Rig([sim], [sim]).connect().measure(controls(3), abort=abort)
    assert isinstance(m.error, Aborted) and m.n_done == 0 and sim.actuations == 0


def test_a_failing_batch_instrument_is_an_instrument_failure_and_goes_safe():
    class Broken(CountingSim):
        def measure_batch(self, controls):
            raise OSError("trigger lost")

        def safe_state(self):
            self.safe = True

    sim = Broken(16, 8)
    m = Rig([sim], [sim]).connect().measure(controls(3))
    assert isinstance(m.error, InstrumentFailure) and "trigger lost" in str(m.error)
    assert m.n_done == 0 and m.traces.shape == (0, 8) and sim.safe


def test_a_batch_instrument_failing_part_way_keeps_the_rows_it_measured():
    from labpnn.drivers.roles import BatchFailed

    class DiesAtRowThree(CountingSim):
        def measure_batch(self, controls):
            traces, flags = super().measure_batch(controls[:3])
            raise BatchFailed("reference chirp missing three times", traces, flags)

    sim, x = DiesAtRowThree(16, 8, seed=2), controls(5)
    m = Rig([sim], [sim]).connect().measure(x)
    assert isinstance(m.error, InstrumentFailure) and m.error.details["n_done"] == 3 and m.n_done == 3
    assert "chirp" in str(m.error) and "row 3 of 5" in str(m.error)
    assert_same_map(m.traces, SimTestRig(16, 8, seed=2).run(x[:3]), sim, x)
    np.testing.assert_array_equal(m.applied, x[:3])  # copied


# -- overlapped instruments ----------------------------------------------------------------------
class Surface:
    """A fake `OverlappedActuator`: a binary surface whose sensor sees a row ``settle_s`` after
    `end_apply` (the previous row until then); logs every step; faults on request."""

    name, n_controls, settle_s = "surface", 6, 0.003

    def __init__(self, log: list, *, bad_readback_at: int = -1, fail_begin_at: int = -1):
        self.log, self.bad_readback_at, self.fail_begin_at = log, bad_readback_at, fail_begin_at
        self.rows = 0  # rows begun
        self.seen: list[tuple[float, np.ndarray]] = [(0.0, np.zeros(self.n_controls, np.float32))]
        self.safe = False
        self._sending = None

    def identify(self):
        return "fake surface"

    def connect(self):
        pass

    def close(self):
        pass

    def settings(self):
        return {}

    def configure(self, **settings):
        pass

    def check(self, controls):
        pass

    def begin_apply(self, row):
        i, self.rows = self.rows, self.rows + 1
        self.log.append(("begin", i))
        if i == self.fail_begin_at:
            raise OSError("serial port vanished")
        self._sending = (i, (row >= 0.5).astype(np.float32))
        return self._sending[1]

    def end_apply(self):
        (i, bits), self._sending = self._sending, None
        self.log.append(("end", i))
        self.seen.append((time.perf_counter() + self.settle_s, bits))
        self._verifying = i

    def end_verify(self):
        i = self._verifying
        self.log.append(("verify", i))
        if i == self.bad_readback_at:
            raise RuntimeError("the pattern read back differs")

    def apply(self, row):
        out = self.begin_apply(row)
        self.end_apply()
        self.end_verify()
        return out

    def safe_state(self):
        self.safe = True
        self.log.append(("safe",))

    def at(self, t: float) -> np.ndarray:
        return [bits for since, bits in self.seen if since <= t][-1]


class Probe:
    """A fake `OverlappedSensor`: its trace is the surface's state when the sweep started, so a
    trace names the row it measured."""

    name = "probe"

    def __init__(self, surface: Surface, log: list, *, fail_fetch_at: int = -1):
        self.surface, self.log, self.fail_fetch_at = surface, log, fail_fetch_at
        self.n_outputs = surface.n_controls
        self.sweeps = 0
        self._trace = None

    identify, connect, close, settings, configure = Surface.identify, Surface.connect, Surface.close, \
        Surface.settings, Surface.configure

    def axis(self):
        return {"name": "bit", "unit": "", "values": list(range(self.n_outputs))}

    def begin_sweep(self):
        i, self.sweeps = self.sweeps, self.sweeps + 1
        self.log.append(("sweep", i))
        self._trace = (i, self.surface.at(time.perf_counter()).copy())
        self._ends = time.perf_counter() + 0.001

    def end_sweep(self):
        time.sleep(max(0.0, self._ends - time.perf_counter()))
        self.log.append(("swept", self._trace[0]))

    def fetch(self):
        i, trace = self._trace
        self.log.append(("fetch", i))
        if i == self.fail_fetch_at:
            raise TimeoutError("VNA did not answer")
        return trace, 0

    def acquire(self):
        self.begin_sweep()
        self.end_sweep()
        return self.fetch()


def alternating(rows: int, n: int = 6) -> np.ndarray:
    """Rows whose neighbours differ in every bit (and no two consecutive rows read the same)."""
    x = np.zeros((rows, n), np.float32)
    x[0::2, 0::2] = x[1::2, 1::2] = 0.9
    x[:, -1] = (np.arange(rows) % 3) / 2  # 0, 0.5, 1: a third pattern in the mix
    return x


def overlapped_rig(surface_cls=Surface, **faults):
    log: list = []
    surface = surface_cls(log, **{k: v for k, v in faults.items() if k != "fail_fetch_at"})
    probe = Probe(surface, log, fail_fetch_at=faults.get("fail_fetch_at", -1))
    return Rig([surface], [probe]).connect(), surface, probe, log


def test_the_overlapped_loop_returns_each_rows_trace_for_its_own_row():
    rig, surface, probe, log = overlapped_rig()
    assert isinstance(surface, OverlappedActuator) and isinstance(probe, OverlappedSensor)
    x, done = alternating(9), []
    t0 = time.perf_counter()
    m = rig.measure(x, progress=done.append)
    wall = time.perf_counter() - t0
    assert m.error is None and m.n_done == 9 and done == list(range(1, 10))
    want = (x >= 0.5).astype(np.float32)
    np.testing.assert_array_equal(m.applied, want)
    np.testing.assert_array_equal(m.traces, want)  # row i's trace is row i's pattern, settled
    assert (np.diff(m.timestamps) >= 0).all() and 0 < m.busy_s <= wall  # the loop's time, counted once
    at = {event: k for k, event in enumerate(log)}
    for i in range(9):
        # the read-back is checked while the row is measured
        assert at["begin", i] < at["end", i] < at["sweep", i] < at["verify", i] < at["swept", i] < at["fetch", i]
        if i:
            # row i goes out only after row i-1's measurement ended and its read-back was checked;
            # row i-1's trace is read while row i goes out, before row i is measured
            assert at["verify", i - 1] < at["swept", i - 1] < at["begin", i] < at["fetch", i - 1] < at["end", i]
    assert rig.rows_done == 9


def test_the_next_row_is_prepared_while_the_current_one_settles():
    class PreparingSurface(Surface):
        def prepare(self, row):
            self.log.append(("prepare", self.rows))
            self.prepared = row.copy()

        def begin_apply(self, row):
            np.testing.assert_array_equal(row, self.prepared if self.rows else row)
            return super().begin_apply(row)

    rig, surface, probe, log = overlapped_rig(surface_cls=PreparingSurface)
    x = alternating(5)
    np.testing.assert_array_equal(rig.measure(x).traces, (x >= 0.5).astype(np.float32))
    at = {event: k for k, event in enumerate(log)}
    assert ("prepare", 5) not in at  # no row after the last
    for i in range(4):
        assert at["end", i] < at["prepare", i + 1] < at["sweep", i]


def test_the_overlapped_loop_waits_out_the_settle_time():
    class SlowSurface(Surface):
        settle_s = 0.02

    class LiarSurface(SlowSurface):  # settles as slowly but tells the rig it need not wait
        settle_s = 0.0

        def end_apply(self):
            super().end_apply()
            since, bits = self.seen[-1]
            self.seen[-1] = (since + SlowSurface.settle_s, bits)

    x = alternating(4)
    rig = overlapped_rig(surface_cls=SlowSurface)[0]
    np.testing.assert_array_equal(rig.measure(x).traces, (x >= 0.5).astype(np.float32))
    traces = overlapped_rig(surface_cls=LiarSurface)[0].measure(x).traces
    assert not (traces == (x >= 0.5)).all(axis=1).any()  # each sweep saw the row before: the test bites


def test_a_wrong_read_back_fails_its_own_row_and_keeps_the_rows_before():
    rig, surface, probe, log = overlapped_rig(bad_readback_at=3)
    x = alternating(6)
    m = rig.measure(x)
    assert isinstance(m.error, InstrumentFailure) and m.n_done == 3
    assert m.error.details == {"n_done": 3, "instrument": "surface", "instrument_error": "RuntimeError"}
    assert "read back differs" in str(m.error) and "row 3 of 6" in str(m.error)
    np.testing.assert_array_equal(m.traces, (x[:3] >= 0.5).astype(np.float32))
    assert surface.safe and ("begin", 4) not in log and ("fetch", 3) not in log  # row 3's trace is dropped
    assert log.index(("verify", 3)) < log.index(("swept", 3)) < log.index(("safe",))  # its sweep ends first
    assert rig.rows_done == 3


def test_an_actuator_failing_to_start_a_row_still_keeps_the_row_before():
    rig, surface, probe, log = overlapped_rig(fail_begin_at=2)
    x = alternating(5)
    m = rig.measure(x)
    assert m.n_done == 2 and "serial port vanished" in str(m.error) and "row 2 of 5" in str(m.error)
    np.testing.assert_array_equal(m.traces, (x[:2] >= 0.5).astype(np.float32))  # row 1 read after the failure
    assert surface.safe


def test_a_sensor_failing_to_read_a_trace_fails_that_row():
    rig, surface, probe, log = overlapped_rig(fail_fetch_at=2)
    x = alternating(5)
    m = rig.measure(x)
    assert m.n_done == 2 and m.error.details["instrument"] == "probe" and "row 2 of 5" in str(m.error)
    np.testing.assert_array_equal(m.traces, (x[:2] >= 0.5).astype(np.float32))
    assert surface.safe


def test_an_abort_in_the_overlapped_loop_keeps_the_row_in_flight():
    rig, surface, probe, log = overlapped_rig()
    abort = threading.Event()
    x = alternating(8)
    m = rig.measure(x, abort=abort, progress=lambda n: abort.set() if n == 2 else None)
    # progress(2) comes while row 2 goes out: row 2 is finished and read, then the batch stops
    assert isinstance(m.error, Aborted) and m.n_done == 3 and not surface.safe
    assert ("begin", 3) not in log
    np.testing.assert_array_equal(m.traces, (x[:3] >= 0.5).astype(np.float32))

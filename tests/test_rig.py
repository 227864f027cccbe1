"""`Rig` with a `BatchInstrument`: one call per batch, the same numbers as row by row, and the
row loop whenever the instrument declines (per-row latency) or an abort is already set."""
from __future__ import annotations

import threading

import numpy as np
import pytest
from conftest import assert_same_map, controls

from labpnn.drivers.roles import BatchInstrument
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

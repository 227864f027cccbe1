"""Online twin refinement: `OnlineTwinFitter` (and `DriftAlarm`, what a drift detector hands it).

A background thread in the trainer keeps refining the twin from the batches the trainer measures
anyway — fed directly (``feed``) or read from a growing session file (``follow``) — and publishes
each refined twin as an immutable snapshot (``.twin``: swapped atomically, PAT's backward calls
it; never modified after publication).

**Twin quality.** Every new batch is **scored before it is trained on**: its MSE under the
current twin, in measurement units, divided by the noise floor is the batch's noise ratio (1.0 =
as good as a twin can be). The noise floor is ``noise_var`` if given (a constant sigma^2), else the
twin's fitted noise model (``twin.meta["noise_model"]``: ``var ~ a + b max(y, 0)`` from the
calibration repeats, so a batch brighter or dimmer than the calibration mix — shot noise grows with
the signal — is judged against its own noise level), else ``twin.meta["noise_var"]``. The mean over
the last ``window`` batches (row-weighted) is tracked (``noise_ratio``, ``history``). When it rises
above ``threshold`` a ``twin_quality`` event (state ``poor``) is written to the session (when a
``writer`` is given) and logged, once; when it is back at or below ``recover_threshold``, another
(state ``ok``). This is a statement about the *twin*, not the physics: it rises just as much where
training carries the operating point beyond the data the twin was fitted on (extrapolation) as
after a drift, so it never raises a drift alarm. Drift is told by repeated measurements
(`labpnn.training.drift.DriftProbe`), which calls ``drift``.

**Adaptation.** ``drift(alarm, lookback_batches=k)`` says the physics changed (applied once every
batch fed before it has been processed, so it lands in order; it never blocks the caller): the
rows fed before the newest ``k`` batches are stale — replayed with weight ``stale_weight`` (they
still anchor regions the trainer no longer visits) — and for ``adapt_batches`` batches (or until
the windowed ratio over batches fed after the notice is back at or below ``recover_threshold``)
the learning rate is multiplied by ``adapt_lr_factor`` and the steps per batch by
``adapt_steps_factor``.

**Bounded compute.** At most ``steps_per_batch`` optimisation steps per new batch (minibatches
mixing ``recent_fraction`` rows from the newest ``recent_rows`` with rows from the whole replay
buffer of ``buffer_rows``), a duty cycle ``max_cpu_fraction`` (after a step that took t seconds
the thread sleeps ``t (1 - f) / f``), an optional ``max_steps_per_s``, and optionally
``num_threads`` for torch inside the thread (note: ``torch.set_num_threads`` is process-wide in
most builds, so it is left alone unless asked). Torch releases the GIL while it computes, so
acquisition threads keep running.
"""
from __future__ import annotations

import logging
import math
import queue
import threading
import time
from collections import deque
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from labpnn.twin.metrics import expected_noise_var
from labpnn.twin.model import Twin

log = logging.getLogger(__name__)

#: session tags the follower learns from (everything but the test set)
FOLLOW_TAGS = ("calibration", "noise", "train", "eval", "validation", "other")


@dataclass(frozen=True)
class DriftAlarm:
    """The physics changed: repeated measurements of the same controls no longer agree to within
    the noise (raised by `labpnn.training.drift.DriftProbe`)."""

    batch: int  #: training batches observed when the probe that raised it was measured
    noise_ratio: float  #: the drift statistic D: weighted mean of squared change / its noise variance (~1: no drift)
    threshold: float
    message: str
    batch_id: Any = None  #: the session's batch id, if known
    time: float = 0.0  #: unix time

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class BatchScore:
    """One batch as the fitter saw it: scored before training on it."""

    batch: int
    rows: int
    mse: float
    noise_ratio: float | None
    window_ratio: float | None
    steps: int = 0  #: optimisation steps done after it
    version: int = 0  #: twin version it was scored with
    poor: bool = False  #: the windowed ratio crossed above ``threshold`` here (a twin_quality event)
    batch_id: Any = None


class _Buffer:
    """A ring buffer of rows with a global row counter (rows never move once written)."""

    def __init__(self, capacity: int, n_controls: int, n_outputs: int):
        self.capacity = int(capacity)
        self.x = np.empty((self.capacity, n_controls), np.float32)
        self.y = np.empty((self.capacity, n_outputs), np.float32)
        self.total = 0  #: rows ever added

    def add(self, x: np.ndarray, y: np.ndarray) -> None:
        if len(x) > self.capacity:  # only the newest rows fit; the rest count as passed through
            self.total += len(x) - self.capacity
            x, y = x[-self.capacity:], y[-self.capacity:]
        start = self.total % self.capacity
        first = min(len(x), self.capacity - start)
        self.x[start:start + first], self.y[start:start + first] = x[:first], y[:first]
        if first < len(x):
            self.x[:len(x) - first], self.y[:len(x) - first] = x[first:], y[first:]
        self.total += len(x)

    @property
    def size(self) -> int:
        return min(self.total, self.capacity)

    @property
    def oldest(self) -> int:
        """Global index of the oldest row still held."""
        return self.total - self.size

    def rows(self, global_idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        slot = np.asarray(global_idx) % self.capacity
        return self.x[slot], self.y[slot]


class OnlineTwinFitter:
    """Refines a copy of ``twin`` in a background thread; see the module docstring.

    Typical use in a trainer::

        fitter = OnlineTwinFitter(twin, writer=writer, replay=(calib_x, calib_y)).start()
        ...  # each measured batch: fitter.feed(controls, traces)  (or fitter.follow(session))
        twin = fitter.twin                      # the newest snapshot, for PAT's backward
        fitter.drift(alarm, lookback_batches=4) # when a DriftProbe says the physics changed
        fitter.stop()
    """

    def __init__(
        self,
        twin: Twin,
        *,
        noise_var: float | None = None,
        noise_model: dict[str, float] | None = None,
        replay: tuple[Any, Any] | None = None,
        lr: float = 3e-4,
        steps_per_batch: int = 8,
        batch_size: int = 128,
        buffer_rows: int = 50_000,
        recent_rows: int = 512,
        recent_fraction: float = 0.5,
        max_cpu_fraction: float = 0.5,
        max_steps_per_s: float | None = None,
        num_threads: int | None = None,
        threshold: float = 2.0,
        recover_threshold: float = 1.5,
        window: int = 3,
        adapt_batches: int = 30,
        adapt_lr_factor: float = 3.0,
        adapt_steps_factor: float = 2.0,
        stale_weight: float = 0.01,
        publish_every: int = 1,
        writer: Any = None,
        queue_batches: int = 256,
        seed: int = 0,
    ):
        if not 0 < max_cpu_fraction <= 1:
            raise ValueError("max_cpu_fraction must lie in (0, 1]")
        if window < 1 or steps_per_batch < 0 or batch_size < 1:
            raise ValueError("window >= 1, steps_per_batch >= 0 and batch_size >= 1 required")
        self._model = twin.snapshot()  # our own copy; the caller's twin is never touched
        for p in self._model.core.parameters():
            p.requires_grad_(True)
        self._model.train()
        self._twin = twin.snapshot()
        self.version = 0
        meta = twin.meta or {}
        if noise_var is None and noise_model is None:
            noise_model = meta.get("noise_model")
            if noise_model is None:
                noise_var = meta.get("noise_var")
        self.noise_var = float(noise_var) if noise_var else None  #: constant floor, if given
        self.noise_model = None if self.noise_var else (dict(noise_model) if noise_model else None)
        self.lr, self.steps_per_batch, self.batch_size = float(lr), int(steps_per_batch), int(batch_size)
        self.recent_rows, self.recent_fraction = int(recent_rows), float(recent_fraction)
        self.max_cpu_fraction, self.max_steps_per_s = float(max_cpu_fraction), max_steps_per_s
        self.num_threads = num_threads
        self.threshold, self.recover_threshold, self.window = float(threshold), float(recover_threshold), int(window)
        self.adapt_batches, self.adapt_lr_factor = int(adapt_batches), float(adapt_lr_factor)
        self.adapt_steps_factor, self.stale_weight = float(adapt_steps_factor), float(stale_weight)
        self.publish_every = max(1, int(publish_every))
        self.writer = writer
        self.drifts: list[DriftAlarm | None] = []  #: drift notices received (``drift``), in order
        self.history: list[BatchScore] = []
        self.dropped = 0  #: batches fed without blocking while the inbox was full (not learnt from)
        self._inbox: queue.Queue = queue.Queue(maxsize=queue_batches)
        self._buffer = _Buffer(buffer_rows, twin.n_controls, twin.n_outputs)
        self._regime_start = 0  #: global row index where the current (post-drift) regime begins
        self._window: deque[tuple[int, float, int]] = deque(maxlen=self.window)  # (rows, ratio, first row)
        self._starts: deque[int] = deque(maxlen=1024)  # first row of each recent batch, in order
        self._poor = False  # the windowed ratio is above threshold (until back at recover_threshold)
        self._adapting = False
        self._adapt_left = 0
        self._n_batches = 0
        self._pending = 0
        self._fed = 0  #: batches queued so far (a drift notice waits until that many are processed)
        self._notices: deque[tuple[int, int, DriftAlarm | None]] = deque()
        self._idle = threading.Condition()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._followers: list[threading.Thread] = []
        self._error: BaseException | None = None
        self._rng = np.random.default_rng(seed)
        torch.manual_seed(seed)
        self._opt = torch.optim.Adam(self._model.core.parameters(), lr=self.lr)
        var = self._model.out_std.detach() ** 2
        self._pixel_weight = var / var.mean()
        self.steps = 0
        self.busy_s = 0.0
        if replay is not None:
            x, y = (np.asarray(a, np.float32) for a in replay)
            self._buffer.add(x, y)
            self._regime_start = 0

    # -- public ----------------------------------------------------------------------------
    @property
    def twin(self) -> Twin:
        """The newest published twin (immutable snapshot; safe to use from any thread)."""
        return self._twin

    @property
    def noise_ratio(self) -> float | None:
        """The current windowed noise ratio (None before the first scored batch)."""
        return self._window_ratio()

    @property
    def adapting(self) -> bool:
        """Adapting to a drift notice (raised learning rate and steps, old rows stale)."""
        return self._adapting

    @property
    def twin_poor(self) -> bool:
        """The windowed noise ratio went above ``threshold`` and is not yet back at ``recover_threshold``."""
        return self._poor

    def start(self) -> OnlineTwinFitter:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="twin-fitter", daemon=True)
            self._thread.start()
        return self

    def stop(self, timeout: float | None = 10.0) -> None:
        self._stop.set()
        for t in [*self._followers, self._thread]:
            if t is not None:
                t.join(timeout)

    def __enter__(self) -> OnlineTwinFitter:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def feed(self, controls: Any, traces: Any, *, batch_id: Any = None, block: bool = True) -> None:
        """Queue one measured batch (copied); starts the thread if needed. With ``block=False`` a
        full queue drops the batch (logged) rather than stall the caller."""
        x = np.array(controls, np.float32, copy=True, ndmin=2)
        y = np.array(traces, np.float32, copy=True, ndmin=2)
        if x.shape[0] != y.shape[0] or x.shape[1] != self._model.n_controls or y.shape[1] != self._model.n_outputs:
            raise ValueError(f"expected controls [B, {self._model.n_controls}] and traces [B, "
                             f"{self._model.n_outputs}], got {x.shape} and {y.shape}")
        if not len(x):
            return
        if self._thread is None and not self._stop.is_set():
            self.start()
        with self._idle:
            self._pending += 1
        try:
            self._inbox.put((x, y, batch_id), block=block)
        except queue.Full:
            with self._idle:
                self._pending -= 1
            self.dropped += 1
            if self.dropped in (1, 10, 100) or self.dropped % 1000 == 0:  # not one line per batch
                log.warning("twin fitter queue full: dropped a batch of %d rows (%d batches so far; the fitter "
                            "learns from the others)", len(x), self.dropped)
            return
        with self._idle:
            self._fed += 1

    def drift(self, alarm: DriftAlarm | None = None, *, lookback_batches: int = 1) -> None:
        """The physics changed (a `DriftAlarm`): adapt (see the module docstring). Applied once
        every batch already fed has been processed (never blocks the caller, whatever the queue
        holds); the newest ``lookback_batches`` of those (the batches measured since the last
        clean probe) start the new regime."""
        if self._thread is None and not self._stop.is_set():
            self.start()
        with self._idle:
            self._pending += 1
            self._notices.append((self._fed, max(0, int(lookback_batches)), alarm))

    def feed_measurement(self, measurement: Any, *, batch_id: Any = None) -> None:
        """`feed` the completed rows of a `labpnn.contract.Measurement`."""
        n = measurement.n_done
        if n:
            self.feed(measurement.controls[:n], measurement.traces, batch_id=batch_id)

    def follow(self, path: str | Path, *, tags: Iterable[str] | None = FOLLOW_TAGS, poll_s: float = 0.2,
               from_start: bool = False) -> threading.Thread:
        """Follow a growing session file (SWMR) in a thread: every new batch whose tag is in
        ``tags`` (None: all) is fed. Rows already in the file are skipped unless ``from_start``."""
        tags = None if tags is None else set(tags)

        def run() -> None:
            from labpnn.sessions import open_session

            reader = open_session(path)
            try:
                seen = 0 if from_start else int(reader.n_rows)
                while not self._stop.is_set():
                    reader.refresh()
                    n = int(reader.n_rows)
                    if n > seen:
                        self._feed_rows(reader, seen, n, tags)
                        seen = n
                    else:
                        self._stop.wait(poll_s)
            except Exception as exc:  # a broken follower must be visible, not silent
                log.exception("following %s failed", path)
                self._error = exc
            finally:
                close = getattr(reader, "close", None)
                if close is not None:
                    close()

        thread = threading.Thread(target=run, name=f"twin-follow-{Path(path).name}", daemon=True)
        self._followers.append(thread)
        thread.start()
        self.start()
        return thread

    def wait_idle(self, timeout: float | None = None) -> bool:
        """Block until every fed batch has been scored and trained on. False on timeout."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._idle:
            while self._pending:
                if self._error is not None:
                    raise RuntimeError("twin fitter failed") from self._error
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    return False
                self._idle.wait(0.1 if left is None else min(left, 0.1))
        return True

    def stats(self) -> dict[str, Any]:
        return {"batches": self._n_batches, "rows": self._buffer.total, "steps": self.steps,
                "version": self.version, "busy_s": self.busy_s, "noise_ratio": self.noise_ratio,
                "adapting": self._adapting, "twin_poor": self._poor, "drifts": len(self.drifts),
                "dropped_batches": self.dropped, "noise_var": self.noise_var, "noise_model": self.noise_model}

    # -- internals -------------------------------------------------------------------------
    def _feed_rows(self, reader: Any, lo: int, hi: int, tags: set[str] | None) -> None:
        for x, y, row_tags, ids in _read_rows(reader, lo, hi):
            breaks = np.flatnonzero(ids[1:] != ids[:-1]) + 1
            for a, b in zip(np.r_[0, breaks], np.r_[breaks, len(ids)]):
                if tags is None or row_tags[a] in tags:
                    self.feed(x[a:b], y[a:b], batch_id=ids[a].item())

    def _floor(self, traces: np.ndarray) -> float | None:
        """The noise variance a perfect twin's MSE would show on these traces."""
        if self.noise_var:
            return self.noise_var
        if self.noise_model:
            return expected_noise_var(self.noise_model, traces) or None
        return None

    def _window_ratio(self) -> float | None:
        if not self._window:
            return None
        rows = sum(r for r, _, _ in self._window)
        return sum(r * q for r, q, _ in self._window) / rows

    def _run(self) -> None:
        if self.num_threads:
            torch.set_num_threads(int(self.num_threads))
        try:
            while not self._stop.is_set():
                while self._notices and self._notices[0][0] <= self._n_batches:
                    _, lookback, alarm = self._notices.popleft()
                    try:
                        self._adapt(lookback, alarm)
                    finally:
                        with self._idle:
                            self._pending -= 1
                            self._idle.notify_all()
                try:
                    x, y, batch_id = self._inbox.get(timeout=0.1)
                except queue.Empty:
                    continue
                try:
                    self._process(x, y, batch_id)
                finally:
                    with self._idle:
                        self._pending -= 1
                        self._idle.notify_all()
        except BaseException as exc:
            log.exception("twin fitter stopped")
            self._error = exc
            with self._idle:
                self._pending = 0
                self._idle.notify_all()

    @torch.no_grad()
    def _score(self, x: np.ndarray, y: np.ndarray) -> float:
        model = self._model
        model.eval()
        pred = model(torch.from_numpy(x).to(model.device)).double().cpu().numpy()
        model.train()
        return float(((pred - y.astype(np.float64)) ** 2).mean())

    def _process(self, x: np.ndarray, y: np.ndarray, batch_id: Any) -> None:
        index = self._n_batches
        self._n_batches += 1
        mse = self._score(x, y)
        floor = self._floor(y)
        ratio = mse / floor if floor else None
        first_row = self._buffer.total
        self._starts.append(first_row)
        score = BatchScore(index, len(x), mse, ratio, None, version=self.version, batch_id=batch_id)
        if ratio is not None:
            self._window.append((len(x), ratio, first_row))
            score.window_ratio = self._window_ratio()
        self._buffer.add(x, y)
        w = score.window_ratio
        if w is not None and len(self._window) == self.window:
            if not self._poor and w > self.threshold:
                self._poor = score.poor = True
                self._event("poor", f"twin error {w:.2f}x the noise floor over the last {self.window} batches "
                            f"(> {self.threshold:g}; batch {index}): the operating point has left the twin's data, "
                            "or the physics changed (the drift probes tell which)", index, w)
            elif w <= self.recover_threshold:
                if self._poor:
                    self._poor = False
                    self._event("ok", f"twin error back to {w:.2f}x the noise floor (<= {self.recover_threshold:g}; "
                                f"batch {index})", index, w)
                if self._adapting:
                    self._adapting, self._adapt_left = False, 0
                    log.info("twin caught up after the drift: noise ratio %.2f at batch %d", w, index)
        score.steps = self._train(self._n_steps())
        if self._adapt_left:
            self._adapt_left -= 1
            if not self._adapt_left:
                self._adapting = False
        self.history.append(score)
        if self._n_batches % self.publish_every == 0:
            self._publish()

    def _event(self, state: str, message: str, index: int, ratio: float) -> None:
        (log.warning if state == "poor" else log.info)(message)
        if self.writer is not None:
            try:
                self.writer.event("twin_quality", message, state=state, batch=index, noise_ratio=float(ratio))
            except Exception:
                log.exception("could not log the twin quality to the session")

    def _adapt(self, lookback: int, alarm: DriftAlarm | None) -> None:
        """A drift notice, in order with the batches: rows before the newest ``lookback`` batches
        are stale; raise the learning rate and the steps for a while; judge recovery afresh."""
        self.drifts.append(alarm)
        starts = self._starts
        self._regime_start = starts[-min(lookback, len(starts))] if lookback and starts else self._buffer.total
        self._adapting, self._adapt_left = True, self.adapt_batches
        self._window.clear()  # recovery is judged on batches fed after the notice
        log.info("twin fitter adapting to a drift: %d rows stale, lr x %g for up to %d batches",
                 self._regime_start - self._buffer.oldest, self.adapt_lr_factor, self.adapt_batches)

    def _n_steps(self) -> int:
        n = self.steps_per_batch
        if self._adapt_left:
            n = int(math.ceil(n * self.adapt_steps_factor))
        return n

    def _sample(self) -> np.ndarray:
        buf = self._buffer
        total, oldest = buf.total, buf.oldest
        bs = min(self.batch_size, buf.size)
        n_recent = int(round(bs * self.recent_fraction))
        recent_lo = max(oldest, total - self.recent_rows)
        idx = [self._rng.integers(recent_lo, total, n_recent)]
        n_rest = bs - n_recent
        if n_rest:
            start = min(max(self._regime_start, oldest), total - 1)
            n_stale, n_fresh = start - oldest, total - start
            p_stale = (self.stale_weight * n_stale) / (self.stale_weight * n_stale + n_fresh) if n_stale else 0.0
            k_stale = int(self._rng.binomial(n_rest, p_stale)) if p_stale else 0
            if k_stale:
                idx.append(self._rng.integers(oldest, start, k_stale))
            idx.append(self._rng.integers(start, total, n_rest - k_stale))
        return np.concatenate(idx)

    def _train(self, n_steps: int) -> int:
        if n_steps <= 0 or self._buffer.size == 0:
            return 0
        model = self._model
        lr = self.lr * (self.adapt_lr_factor if self._adapt_left else 1.0)
        for group in self._opt.param_groups:
            group["lr"] = lr
        done = 0
        for _ in range(n_steps):
            if self._stop.is_set():
                break
            started = time.perf_counter()
            xb, yb = self._buffer.rows(self._sample())
            xt = torch.from_numpy(xb).to(model.device)
            yt = model.normalise_traces(torch.from_numpy(yb).to(model.device))
            loss = (((model.forward_normalised(xt) - yt) ** 2) * self._pixel_weight).mean()
            self._opt.zero_grad(set_to_none=True)
            loss.backward()
            self._opt.step()
            done += 1
            took = time.perf_counter() - started
            self.busy_s += took
            pause = took * (1 - self.max_cpu_fraction) / self.max_cpu_fraction
            if self.max_steps_per_s:
                pause = max(pause, 1.0 / self.max_steps_per_s - took)
            if pause > 0:
                self._stop.wait(pause)
        self.steps += done
        return done

    def _publish(self) -> None:
        snap = self._model.snapshot()
        snap.meta = {**snap.meta, "online": {"batches": self._n_batches, "rows": self._buffer.total,
                                             "steps": self.steps, "version": self.version + 1,
                                             "noise_ratio": self.noise_ratio}}
        self.version += 1
        self._twin = snap  # one reference assignment: readers see the old or the new twin, whole


def _read_rows(reader: Any, lo: int, hi: int):
    """Rows [lo, hi) of a session as ``(controls, traces, tags, batch_ids)`` chunks, one per
    segment, reading only those rows (a SessionReader's array properties read whole datasets)."""
    segments = getattr(reader, "segments", None)
    if not segments or not hasattr(segments[0], "read"):
        yield (np.asarray(reader.controls[lo:hi], np.float32), np.asarray(reader.traces[lo:hi], np.float32),
               np.asarray(reader.tags[lo:hi]).astype(str), np.asarray(reader.batch_ids[lo:hi]))
        return
    for seg in segments:
        a, b = max(lo, seg.row_offset), min(hi, seg.row_offset + seg.n_rows)
        if a >= b:
            continue
        rows = slice(a - seg.row_offset, b - seg.row_offset)
        names = list(seg.tag_names())
        codes = np.asarray(seg.read("tag", rows)).astype(np.intp)
        lut = np.array(names + [f"tag{k}" for k in range(len(names), 256)], dtype=str)
        yield (np.asarray(seg.read("controls", rows), np.float32), np.asarray(seg.read("traces", rows), np.float32),
               lut[codes], np.asarray(seg.read("batch_id", rows)))

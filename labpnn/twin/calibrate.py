"""Calibration sweep: measure N control vectors into a session, plus repeats for the noise floor.

Rows tagged ``calibration`` are drawn uniformly in [0, 1]^C and, optionally, a fraction from a
``sampler`` that knows where training will operate (`near_sampler`: jittered copies of given
control vectors, e.g. encoded dataset samples around the initial parameters). Rows tagged
``noise`` are ``n_repeats`` passes over the same ``n_distinct`` control vectors (drawn from the
same mixture), spread evenly through the sweep (so the noise floor includes slow drift over the
sweep, as held-out rows do), each pass in a fresh random order. `labpnn.twin` pools their
per-pixel repeat variance into sigma^2.

Several batches are kept in flight when the system offers ``measure_many`` (`RigClient`); rows
are logged as they arrive. Works with any `PhysicalSystem`. Imports no torch and nothing from
``labpnn.sim_instruments`` (``--config`` builds a rig at run time, which may).

CLI::

    labpnn calibrate --rig tcp://127.0.0.1:5555 -n 20000 -o calib.h5
    labpnn calibrate --config examples/test-rig.toml -n 2000 -o calib.h5 --repeats 32 8
    labpnn calibrate --rig ADDR -n 5000 -o calib.h5 --near encoded.npy --near-fraction 0.5
"""
from __future__ import annotations

import argparse
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from labpnn.contract import Measurement, PhysicalSystem, measure_of

log = logging.getLogger(__name__)

CALIBRATION_TAG = "calibration"
NOISE_TAG = "noise"

#: ``sampler(rng, n) -> float32[n, C]`` in [0, 1]
Sampler = Callable[[np.random.Generator, int], np.ndarray]


def uniform_sampler(n_controls: int) -> Sampler:
    def sample(rng: np.random.Generator, n: int) -> np.ndarray:
        return rng.random((n, n_controls), dtype=np.float32)

    return sample


def near_sampler(centres: Any, jitter: float = 0.05) -> Sampler:
    """Rows of ``centres`` [K, C] (e.g. encoded dataset samples with the initial parameters),
    picked at random, plus Gaussian jitter of std ``jitter``, clipped to [0, 1]."""
    centres = np.asarray(centres, np.float32)
    if centres.ndim != 2 or not len(centres):
        raise ValueError(f"centres must be a non-empty [K, C] array, got shape {centres.shape}")
    if not np.isfinite(centres).all():
        raise ValueError("centres must be finite")

    def sample(rng: np.random.Generator, n: int) -> np.ndarray:
        rows = centres[rng.integers(0, len(centres), n)]
        rows = rows + jitter * rng.standard_normal(rows.shape, dtype=np.float32)
        return np.clip(rows, 0.0, 1.0).astype(np.float32)

    return sample


@dataclass
class CalibrationPlan:
    """The batches of a sweep, in the order they will be measured."""

    batches: list[np.ndarray]
    tags: list[str]
    noise_controls: np.ndarray  #: [n_distinct, C]

    @property
    def n_rows(self) -> int:
        return int(sum(len(b) for b in self.batches))


def plan_calibration(
    n_controls: int,
    n: int,
    *,
    batch_size: int = 64,
    repeats: tuple[int, int] = (32, 8),
    seed: int = 0,
    sampler: Sampler | None = None,
    sampler_fraction: float = 0.5,
) -> CalibrationPlan:
    """Draw every control vector of a sweep and lay out its batches (see the module docstring)."""
    if n < 0 or batch_size < 1:
        raise ValueError("n must be >= 0 and batch_size >= 1")
    n_distinct, n_repeats = (int(v) for v in repeats)
    if n_distinct < 0 or n_repeats < 0 or (n_distinct > 0 and n_repeats == 1):
        raise ValueError("repeats must be (n_distinct, n_repeats) with n_repeats >= 2, or (0, 0)")
    if not 0.0 <= sampler_fraction <= 1.0:
        raise ValueError("sampler_fraction must lie in [0, 1]")
    rng = np.random.default_rng(seed)
    uniform = uniform_sampler(n_controls)

    def draw(k: int) -> np.ndarray:
        k_s = int(round(k * sampler_fraction)) if sampler is not None else 0
        parts = [uniform(rng, k - k_s)]
        if k_s:
            extra = np.asarray(sampler(rng, k_s), np.float32)
            if extra.shape != (k_s, n_controls):
                raise ValueError(f"sampler returned shape {extra.shape}, expected {(k_s, n_controls)}")
            parts.append(np.clip(extra, 0.0, 1.0))
        rows = np.concatenate(parts)
        return rows[rng.permutation(k)]

    main = draw(n)
    noise = draw(n_distinct) if n_distinct and n_repeats else np.empty((0, n_controls), np.float32)
    main_batches = [main[i:i + batch_size] for i in range(0, n, batch_size)]
    passes = [noise[rng.permutation(len(noise))] for _ in range(n_repeats)] if len(noise) else []
    # pass k goes after main batch floor((k + 0.5) * n_main / n_passes): evenly spread in time
    slots: dict[int, list[np.ndarray]] = {}
    for k, rows in enumerate(passes):
        at = int((k + 0.5) * len(main_batches) / len(passes)) if main_batches else 0
        slots.setdefault(at, []).append(rows)
    batches: list[np.ndarray] = []
    tags: list[str] = []
    for i in range(len(main_batches) + 1):
        for rows in slots.get(i, []):
            for j in range(0, len(rows), batch_size):
                batches.append(np.ascontiguousarray(rows[j:j + batch_size]))
                tags.append(NOISE_TAG)
        if i < len(main_batches):
            batches.append(np.ascontiguousarray(main_batches[i]))
            tags.append(CALIBRATION_TAG)
    return CalibrationPlan(batches, tags, noise)


@dataclass
class CalibrationResult:
    n_rows: int  #: rows measured (calibration + noise)
    n_noise_rows: int
    n_batches: int
    seconds: float
    noise_var: float | None  #: sigma^2 from the noise rows (see `labpnn.twin.noise_variance`)
    noise_groups: int
    #: filled when ``keep_data=True``: the measured rows in order
    controls: np.ndarray | None = None
    traces: np.ndarray | None = None
    tags: np.ndarray | None = None
    batch_ids: list[Any] = field(default_factory=list)


def _measurements(system: PhysicalSystem, batches: list[np.ndarray], max_in_flight: int) -> Iterator[Measurement]:
    many = getattr(system, "measure_many", None)
    if many is not None and max_in_flight > 1:
        yield from many(iter(batches), max_in_flight=max_in_flight)
    else:
        for batch in batches:
            yield measure_of(system, batch)


def calibrate(
    system: PhysicalSystem,
    n: int,
    writer: Any = None,
    *,
    batch_size: int = 64,
    repeats: tuple[int, int] = (32, 8),
    seed: int = 0,
    sampler: Sampler | None = None,
    sampler_fraction: float = 0.5,
    progress: bool = True,
    max_in_flight: int = 4,
    keep_data: bool = False,
) -> CalibrationResult:
    """Measure ``n`` calibration rows (tag ``calibration``) and ``n_distinct x n_repeats``
    noise rows (tag ``noise``) on ``system``, appending each batch to ``writer`` (a
    `labpnn.sessions.SessionWriter`; None: nothing is logged, use ``keep_data``).

    ``sampler`` (with ``sampler_fraction`` of the rows) draws where training will operate; the
    rest is uniform in [0, 1]. If a batch fails part-way, the rows measured are logged, an
    ``error`` event is written and the error is raised."""
    describe = system.describe()
    n_controls = int(describe["n_controls"])
    plan = plan_calibration(n_controls, n, batch_size=batch_size, repeats=repeats, seed=seed,
                            sampler=sampler, sampler_fraction=sampler_fraction)
    if writer is not None:
        writer.event("calibration_start", f"calibration sweep: {n} rows + {len(plan.noise_controls)} x "
                     f"{repeats[1]} noise rows", n=int(n), n_distinct=int(repeats[0]),
                     n_repeats=int(repeats[1]), batch_size=int(batch_size), seed=int(seed),
                     sampler=None if sampler is None else getattr(sampler, "__qualname__", "custom"),
                     sampler_fraction=float(sampler_fraction) if sampler is not None else 0.0)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=plan.n_rows, desc="calibrate", unit="row")
    started = time.perf_counter()
    noise_x: list[np.ndarray] = []
    noise_y: list[np.ndarray] = []
    kept: list[tuple[np.ndarray, np.ndarray, str]] = []
    batch_ids: list[Any] = []
    done = n_noise = 0
    try:
        for i, meas in enumerate(_measurements(system, plan.batches, max_in_flight)):
            tag = plan.tags[i]
            if meas.n_done and writer is not None:
                batch_ids.append(writer.append(meas, tag=tag))
            if tag == NOISE_TAG:
                noise_x.append(np.asarray(meas.applied, np.float32))
                noise_y.append(np.asarray(meas.traces, np.float32))
                n_noise += meas.n_done
            if keep_data:
                # as applied (quantised states, limits): what the twin is fitted to
                kept.append((np.asarray(meas.applied), np.asarray(meas.traces), tag))
            done += meas.n_done
            if bar is not None:
                bar.update(meas.n_done)
            if meas.error is not None:
                if writer is not None:
                    writer.event("error", f"calibration stopped after {done} rows: {meas.error}",
                                 batch=i, n_done=int(meas.n_done))
                raise meas.error
    finally:
        if bar is not None:
            bar.close()
    seconds = time.perf_counter() - started
    noise_var, groups = None, 0
    if noise_x:
        from labpnn.twin.metrics import noise_from_repeats

        noise_var, groups = noise_from_repeats(np.concatenate(noise_x), np.concatenate(noise_y))
    if writer is not None:
        writer.event("calibration_done", f"calibration sweep done: {done} rows in {seconds:.1f} s",
                     n_rows=int(done), n_noise_rows=int(n_noise), seconds=float(seconds),
                     noise_var=noise_var, noise_groups=int(groups))
    result = CalibrationResult(done, n_noise, len(plan.batches), seconds, noise_var, groups, batch_ids=batch_ids)
    if keep_data and kept:
        result.controls = np.concatenate([k[0] for k in kept]).astype(np.float32)
        result.traces = np.concatenate([k[1] for k in kept]).astype(np.float32)
        result.tags = np.concatenate([np.full(len(k[0]), k[2]) for k in kept])
    return result


# ------------------------------------------------------------------------------------------
# CLI
# ------------------------------------------------------------------------------------------
def _load_centres(path: str) -> np.ndarray:
    p = Path(path)
    if p.suffix == ".npz":
        with np.load(p) as data:
            key = "controls" if "controls" in data else data.files[0]
            return np.asarray(data[key], np.float32)
    if p.suffix == ".npy":
        return np.asarray(np.load(p), np.float32)
    return np.loadtxt(p, delimiter=",", dtype=np.float32, ndmin=2)


def cli_calibrate(parser: argparse.ArgumentParser):
    src = parser.add_mutually_exclusive_group(required=True)
    src.add_argument("--rig", metavar="ADDR", help="ZeroMQ address of a device server, e.g. tcp://127.0.0.1:5555")
    src.add_argument("--config", metavar="RIG.toml", help="run this rig in-process instead")
    parser.add_argument("-n", type=int, required=True, help="number of calibration rows")
    parser.add_argument("-o", "--output", required=True, help="session file to create (HDF5)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--repeats", type=int, nargs=2, default=(32, 8), metavar=("DISTINCT", "REPEATS"),
                        help="noise floor: DISTINCT control vectors measured REPEATS times each "
                             "(tag 'noise'; default 32 8; 0 0 for none)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--near", metavar="FILE",
                        help="control vectors where training will operate (.npy, .npz 'controls', or CSV "
                             "[K, C]); a fraction of the rows is drawn around them")
    parser.add_argument("--near-fraction", type=float, default=0.5)
    parser.add_argument("--near-jitter", type=float, default=0.05, help="std of the jitter around --near rows")
    parser.add_argument("--max-in-flight", type=int, default=4, help="batches in flight (--rig)")
    parser.add_argument("--server-key", help="server public key (file or Z85) if the server uses CURVE")
    parser.add_argument("--client-key", help="this client's .key_secret file (default: an ephemeral pair)")
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument("--force", action="store_true", help="overwrite OUTPUT if it exists")

    def handler(args: argparse.Namespace) -> int:
        out = Path(args.output)
        if out.exists() and not args.force:
            parser.error(f"{out} exists (use --force to overwrite)")
        sampler = near_sampler(_load_centres(args.near), args.near_jitter) if args.near else None
        from labpnn.sessions import SessionWriter

        if args.rig:
            from labpnn.remote.client import RigClient

            system: Any = RigClient(args.rig, server_public_key=args.server_key, client_keys=args.client_key)
            closer = getattr(system, "close", lambda: None)
        else:
            from labpnn.config import build_rig, load_config

            system = build_rig(load_config(args.config)).connect()
            closer = system.close
        try:
            provenance = {"command": "labpnn calibrate", "n": args.n, "repeats": list(args.repeats),
                          "seed": args.seed, "batch_size": args.batch_size, "near": args.near,
                          "near_fraction": args.near_fraction if args.near else 0.0,
                          "near_jitter": args.near_jitter if args.near else None,
                          "source": args.rig or str(Path(args.config).resolve())}
            writer = SessionWriter(out, dict(system.describe()), provenance=provenance)
            try:
                result = calibrate(system, args.n, writer, batch_size=args.batch_size,
                                   repeats=tuple(args.repeats), seed=args.seed, sampler=sampler,
                                   sampler_fraction=args.near_fraction, progress=not args.no_progress,
                                   max_in_flight=args.max_in_flight)
            finally:
                writer.close()
        finally:
            closer()
        noise = "n/a" if result.noise_var is None else f"{result.noise_var:.4g}"
        print(f"{out}: {result.n_rows} rows ({result.n_noise_rows} noise) in {result.seconds:.1f} s, "
              f"{result.n_rows / max(result.seconds, 1e-9):.0f} rows/s; noise floor sigma^2 = {noise} "
              f"({result.noise_groups} repeated controls)")
        return 0

    return handler

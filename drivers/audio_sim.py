"""The acoustic bench in-process: the same shots as the sound card, through the plant's physics on a
simulated clock (no audio, no sleeping), behind the `BatchInstrument` role.

For calibration sweeps, training benchmarks and the demo, where real time would only cost time.
It is labelled as such in ``identify()`` (and so in the rig's ``describe()``): it is a simulation,
not a measurement through an audio path.

What it shares with `labpnn.drivers.soundcard.AcousticSoundCard`: the `ShotPlan`, `synthesise`,
the level limits (`check_levels`) and `readout`, so the same controls give the same traces up to
the plant's noise. What differs: the plant's ``process_shots`` runs every shot from rest
(vectorised), there is no latency (offset 0) and no reference to check; the simulated clock
advances by one shot length per row (``simulated_time_s``). The plant is passed in (duck-typed:
``sample_rate``, ``n_speakers``, ``n_mics``, ``process_shots(float32[B, n, S]) -> float32[B, n, M]``,
optionally ``ringdown_s``), so drivers never import sim_instruments.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from .audio_shots import ShotPlan, output_axis, readout, synthesise
from .soundcard import _per_channel, check_levels

__all__ = ["SimulatedAudioPath"]


class SimulatedAudioPath:
    """``SimulatedAudioPath(plant, plan=None, *, max_peak=0.9, max_rms=0.5, chunk_rows=16)``.

    ``plan`` defaults to a `ShotPlan` with the plant's sample rate, speakers and microphones
    (channels 1..S and 1..M). The plan's tail must cover the plant's ``ringdown_s`` (shots are
    independent on the real bench only then; here each shot starts from rest anyway, but a plan
    that would fail on the bench is refused here too)."""

    name = "soundcard"
    settle_s = 0.0
    _SETTINGS = ("max_peak", "max_rms", "plan")

    def __init__(self, plant: Any, plan: ShotPlan | None = None, *, max_peak: Any = 0.9, max_rms: Any = 0.5,
                 chunk_rows: int = 16):
        self.plant = plant
        if plan is None:
            plan = ShotPlan(sample_rate=int(plant.sample_rate), speaker_channels=tuple(range(1, plant.n_speakers + 1)),
                            mic_channels=tuple(range(1, plant.n_mics + 1)), reference_out=plant.n_speakers + 1,
                            reference_in=plant.n_mics + 1)
        self._check_plan(plan)
        self.plan = plan
        self.max_peak = _per_channel(max_peak, plan.n_out_channels, "max_peak")
        self.max_rms = _per_channel(max_rms, plan.n_out_channels, "max_rms")
        self.chunk_rows = max(1, int(chunk_rows))
        self.simulated_time_s = 0.0  #: audio time the shots would have taken on the bench
        self._row: np.ndarray | None = None

    def _check_plan(self, plan: ShotPlan) -> None:
        plant = self.plant
        if plan.sample_rate != int(plant.sample_rate):
            raise ValueError(f"plan at {plan.sample_rate} Hz, plant at {plant.sample_rate} Hz")
        if (plan.n_speakers, plan.n_mics) != (int(plant.n_speakers), int(plant.n_mics)):
            raise ValueError(f"plan has {plan.n_speakers} speakers x {plan.n_mics} mics, the plant "
                             f"{plant.n_speakers} x {plant.n_mics}")
        ringdown = getattr(plant, "ringdown_s", None)
        if ringdown is not None and plan.tail_s < float(ringdown):
            raise ValueError(f"tail_s = {plan.tail_s} s is shorter than the plant's ring-down {float(ringdown):.3f} s")

    # -- Instrument -----------------------------------------------------------------------------
    @property
    def n_controls(self) -> int:
        return self.plan.n_controls

    @property
    def n_outputs(self) -> int:
        return self.plan.n_outputs

    def identify(self) -> str:
        return f"labpnn in-process acoustic simulation (no audio path): {type(self.plant).__name__}, " \
               f"{self.plan.sample_rate} Hz, {self.plan.n_speakers} speakers x {self.plan.n_mics} mics"

    def connect(self) -> None:
        pass

    def close(self) -> None:
        self._row = None

    def settings(self) -> dict[str, Any]:
        return {"simulated": True, "max_peak": self.max_peak.tolist(), "max_rms": self.max_rms.tolist(),
                "plan": self.plan.as_dict()}

    def configure(self, **settings: Any) -> None:
        unknown = set(settings) - set(self._SETTINGS)
        if unknown:
            raise ValueError(f"unknown setting {sorted(unknown)[0]!r} (have: {', '.join(self._SETTINGS)})")
        plan = self.plan
        if "plan" in settings:
            if not isinstance(settings["plan"], dict):
                raise ValueError("plan must be a table of ShotPlan fields")
            try:
                plan = self.plan.replace(**settings["plan"])
            except TypeError as exc:
                raise ValueError(str(exc)) from None
            self._check_plan(plan)
        peak = _per_channel(settings.get("max_peak", self.max_peak), plan.n_out_channels, "max_peak")
        rms = _per_channel(settings.get("max_rms", self.max_rms), plan.n_out_channels, "max_rms")
        self.plan, self.max_peak, self.max_rms = plan, peak, rms

    # -- Actuator / Sensor ----------------------------------------------------------------------
    def check(self, controls: np.ndarray) -> None:
        check_levels(self.plan, np.asarray(controls), self.max_peak, self.max_rms)

    def safe_state(self) -> None:
        self._row = None

    def axis(self) -> dict[str, Any]:
        return output_axis(self.plan)

    def apply(self, controls: np.ndarray) -> np.ndarray:
        self._row = np.asarray(controls, np.float32)
        return controls

    def acquire(self) -> tuple[np.ndarray, int]:
        if self._row is None:
            raise RuntimeError("acquire without apply")
        trace, _ = self.measure_batch(self._row[None])
        return trace[0], 0

    # -- BatchInstrument ------------------------------------------------------------------------
    def measure_batch(self, controls: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        controls = np.asarray(controls, np.float32)
        plan = self.plan
        traces = np.empty((len(controls), plan.n_outputs), np.float32)
        for first in range(0, len(controls), self.chunk_rows):
            rows = controls[first:first + self.chunk_rows]
            shots = synthesise(plan, rows)
            recording = np.asarray(self.plant.process_shots(shots[:, :, :plan.n_speakers]), np.float32)
            traces[first:first + len(rows)] = readout(recording, 0, plan)
            self.simulated_time_s += len(rows) * plan.duration_s
        return traces, np.zeros(len(controls), np.uint32)

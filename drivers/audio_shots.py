"""The acoustic bench's encodings: controls in [0, 1] -> drive waveforms -> measured outputs.

Pure functions, no audio I/O; the sound-card driver (`labpnn.drivers.soundcard`) and the
in-process path (`labpnn.drivers.audio_sim`) share them, so both measure the same thing.

A **shot** is one row of a batch: ``n_samples`` frames at ``sample_rate`` on every output channel,
then the system rests for the ring-down before the next shot starts (shots are independent)::

    | pre-roll | burst (fade in, steady, fade out)               | tail (ring-down) |
    | silence  | speakers play; the reference chirp plays first  | silence          |
                            |<- window_start ->| analysis window |

Encodings (``ShotPlan.encoding``):

- ``"tones"``: control ``c[s*T + t]`` (speaker-major) sets the amplitude of tone ``t`` on speaker
  ``s``, linearly: ``a = c * max_amplitude`` (full-scale units, 1.0 = the DAC's full scale). Each
  speaker plays ``sum_t a_st * sin(2 pi f_t t) * e(t)`` with ``e`` a sin^2 fade-in/out of
  ``fade_s`` (no click). Tones lie on the FFT grid of the analysis window (``f = k * fs / N``), so
  a rectangular window reads them without leakage; by default no tone is a 2nd- or 3rd-order
  mixing product of others (``f_i + f_j - f_k`` or ``f_i +- f_j``), so any mixing read there is
  the bench's, not the encoding's. Readout: each microphone's spectral magnitude at the readout
  frequencies (default: the tones), scaled ``2 |X_k| / N`` so a sine of amplitude ``A`` reads
  ``A``; output ``m*K + k`` (microphone-major).
- ``"segments"``: control ``c[s*K + k]`` sets speaker ``s``'s amplitude in time segment ``k`` of
  the burst (``a = c * max_amplitude``), segments joined by sin^2 cross-fades (the envelopes sum to
  one inside the burst) on a carrier ``sin(2 pi f_c t)`` (``segment_carrier_hz = 0``: baseband
  levels). Readout: each microphone's recording over the burst cut into ``n_time_bins`` equal bins,
  RMS per bin (microphone-major).

Reference: every shot plays a linear chirp on the reference output at the start of the burst and
again at its end (after the analysis window); it returns on the reference input (a loopback cable,
or the emulator's pass-through) and the opening chirp is cross-correlated to find where the shot
landed in the recording (`locate_reference`); the closing one must be there too, at the same
offset (a path that dies mid-shot leaves the start of the shot intact). The offset must equal the stream's latency; a
missing, moved or distorted reference raises `ReferenceError`, so the shot is remeasured.

Levels (`levels`): per output channel, the peak and RMS (over the burst) of the synthesised
waveform: what the safety limit is checked on, before anything plays.
"""
from __future__ import annotations

import dataclasses
import itertools
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = [
    "DEFAULT_TONES_HZ",
    "ENCODINGS",
    "ReferenceError",
    "ShotPlan",
    "levels",
    "locate_reference",
    "mixing_collisions",
    "output_axis",
    "readout",
    "reference_chirp",
    "synthesise",
]

ENCODINGS = ("tones", "segments")
#: 300-900 Hz, on a 10 Hz grid (a 100 ms or 200 ms window), no 2nd/3rd-order mixing collisions.
DEFAULT_TONES_HZ = (300.0, 430.0, 570.0, 720.0, 880.0)


class ReferenceError(ValueError):
    """The reference chirp of a shot is missing, moved or distorted (``reason`` says which)."""

    def __init__(self, reason: str, message: str):
        super().__init__(f"reference {reason}: {message}")
        self.reason = reason


def mixing_collisions(tones_hz: tuple[float, ...], tol_hz: float = 1e-6) -> list[str]:
    """The tones that equal a 2nd-order (``f_i +- f_j``, ``2 f_i``) or 3rd-order
    (``f_i + f_j - f_k``, ``2 f_i - f_j``) product of the others, as readable equations."""
    tones = [float(f) for f in tones_hz]
    found = []
    for k, target in enumerate(tones):
        others = [f for i, f in enumerate(tones) if i != k]
        for a, b in itertools.combinations_with_replacement(others, 2):
            for value, text in ((a + b, f"{a:g} + {b:g}"), (abs(a - b), f"|{a:g} - {b:g}|")):
                if abs(value - target) <= tol_hz:
                    found.append(f"{target:g} = {text}")
        for a, b, c in itertools.product(others, repeat=3):
            if c not in (a, b) and abs(a + b - c - target) <= tol_hz:
                found.append(f"{target:g} = {a:g} + {b:g} - {c:g}")
    return found


@dataclass(frozen=True)
class ShotPlan:
    """Everything that fixes a shot's waveform and its readout. Times in seconds, levels in
    full-scale units; channels are the sound card's, 1-based (as PortAudio/sounddevice count)."""

    sample_rate: int = 48000
    encoding: str = "tones"
    speaker_channels: tuple[int, ...] = (1, 2, 3, 4)  #: playback channel of each speaker
    mic_channels: tuple[int, ...] = (1, 2, 3, 4)  #: capture channel of each microphone
    reference_out: int = 5  #: playback channel carrying the reference chirp
    reference_in: int = 5  #: capture channel where it comes back
    pre_roll_s: float = 0.02
    burst_s: float = 0.5
    fade_s: float = 0.025
    window_start_s: float = 0.15  #: from the start of the burst
    window_s: float = 0.2
    tail_s: float = 0.2  #: silence after the burst: at least the slowest mode's ring-down (T60)
    tones_hz: tuple[float, ...] = DEFAULT_TONES_HZ
    readout_hz: tuple[float, ...] = ()  #: bins read per microphone; () = the tones
    allow_mixing: bool = False  #: accept tones that are mixing products of others
    max_amplitude: float = 0.1  #: amplitude of a tone (or segment) at control 1.0
    n_segments: int = 8
    segment_carrier_hz: float = 600.0
    n_time_bins: int = 16
    chirp_s: float = 0.02
    chirp_band_hz: tuple[float, float] = (500.0, 8000.0)
    chirp_level: float = 0.25
    max_latency_s: float = 0.25  #: the reference is searched this far after the nominal start
    reference_tolerance_lsb: float = 4.0  #: allowed deviation of the returned chirp
    adc_bits: int = 16
    reference_gain_range: tuple[float, float] = (0.5, 2.0)  #: loopback gain accepted

    def __post_init__(self) -> None:
        # Normalise sequences to tuples (a TOML/JSON config gives lists), then validate.
        for name in ("speaker_channels", "mic_channels", "tones_hz", "readout_hz", "chirp_band_hz",
                     "reference_gain_range"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        problems = self._problems()
        if problems:
            raise ValueError("bad shot plan: " + "; ".join(problems))

    def _problems(self) -> list[str]:
        p = []
        fs = self.sample_rate
        if self.encoding not in ENCODINGS:
            p.append(f"encoding {self.encoding!r} is not one of {ENCODINGS}")
        if not self.speaker_channels or not self.mic_channels:
            p.append("need at least one speaker and one microphone")
        outs = (*self.speaker_channels, self.reference_out)
        ins = (*self.mic_channels, self.reference_in)
        if min(outs + ins) < 1 or len(set(outs)) != len(outs) or len(set(ins)) != len(ins):
            p.append("channels are 1-based and distinct (speakers + reference out; mics + reference in)")
        if min(self.pre_roll_s, self.fade_s, self.window_start_s, self.tail_s) < 0 or self.burst_s <= 0:
            p.append("times must be >= 0 (burst > 0)")
        if self.window_start_s < self.fade_s or self.window_start_s + self.window_s > self.burst_s - self.fade_s:
            p.append(f"the analysis window [{self.window_start_s}, {self.window_start_s + self.window_s}] s must "
                     f"lie in the steady part of the burst [{self.fade_s}, {self.burst_s - self.fade_s}] s")
        n_window = self.window_s * fs
        if n_window < 2 or abs(n_window - round(n_window)) > 1e-6:
            p.append(f"window_s * sample_rate = {n_window:g} must be a whole number of samples")
        elif self.encoding == "tones":
            grid = fs / round(n_window)
            for f in (*self.tones_hz, *self.readout_hz):
                if abs(f / grid - round(f / grid)) > 1e-6 or not 0 < f < fs / 2:
                    p.append(f"{f:g} Hz is not on the analysis window's FFT grid ({grid:g} Hz steps, below "
                             f"{fs / 2:g} Hz)")
            if not self.tones_hz:
                p.append("encoding 'tones' needs tones_hz")
            elif not self.allow_mixing:
                p.extend(f"tone {c} (set allow_mixing to accept)" for c in mixing_collisions(self.tones_hz))
        if self.encoding == "segments" and (self.n_segments < 1 or self.n_time_bins < 1):
            p.append("n_segments and n_time_bins must be >= 1")
        f0, f1 = self.chirp_band_hz
        if not 0 < f0 < f1 < fs / 2 or self.chirp_s <= 0 or not 0 < self.chirp_level <= 1:
            p.append("the chirp needs 0 < f0 < f1 < fs/2, a length > 0 and a level in (0, 1]")
        if 2 * self.chirp_s > self.burst_s:
            p.append("two chirps (opening and closing) must fit in the burst")
        if not 0 < self.max_amplitude <= 1:
            p.append("max_amplitude must be in (0, 1]")
        return p

    # -- derived sizes (samples) ---------------------------------------------------------------
    def samples(self, seconds: float) -> int:
        return int(round(seconds * self.sample_rate))

    @property
    def n_speakers(self) -> int:
        return len(self.speaker_channels)

    @property
    def n_mics(self) -> int:
        return len(self.mic_channels)

    @property
    def n_out_channels(self) -> int:
        """Columns of a synthesised shot: the speakers in order, then the reference."""
        return self.n_speakers + 1

    @property
    def n_samples(self) -> int:
        """Frames in one shot: pre-roll + burst + tail."""
        return self.samples(self.pre_roll_s) + self.samples(self.burst_s) + self.samples(self.tail_s)

    @property
    def duration_s(self) -> float:
        return self.n_samples / self.sample_rate

    @property
    def max_latency_frames(self) -> int:
        return self.samples(self.max_latency_s)

    @property
    def capture_frames(self) -> int:
        """Frames recorded per shot: the shot plus the latency searched."""
        return self.n_samples + self.max_latency_frames

    @property
    def burst_span(self) -> slice:
        start = self.samples(self.pre_roll_s)
        return slice(start, start + self.samples(self.burst_s))

    @property
    def window_span(self) -> slice:
        start = self.samples(self.pre_roll_s) + self.samples(self.window_start_s)
        return slice(start, start + self.samples(self.window_s))

    @property
    def readout_frequencies(self) -> tuple[float, ...]:
        return self.readout_hz or self.tones_hz

    @property
    def n_controls(self) -> int:
        per_speaker = len(self.tones_hz) if self.encoding == "tones" else self.n_segments
        return self.n_speakers * per_speaker

    @property
    def n_outputs(self) -> int:
        per_mic = len(self.readout_frequencies) if self.encoding == "tones" else self.n_time_bins
        return self.n_mics * per_mic

    def as_dict(self) -> dict[str, Any]:
        """JSON-able fields (tuples as lists), for ``settings()``; ``ShotPlan(**d)`` rebuilds it."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}

    def replace(self, **changes: Any) -> ShotPlan:
        return dataclasses.replace(self, **changes)


# -- waveforms -----------------------------------------------------------------------------------
def _sin2_ramp(n: int) -> np.ndarray:
    """n samples rising from 0 towards 1 as sin^2 (first sample exactly 0)."""
    return np.sin(0.5 * np.pi * np.arange(n) / max(n, 1)) ** 2


def _fade_envelope(n: int, n_fade: int) -> np.ndarray:
    env = np.ones(n)
    n_fade = min(n_fade, n // 2)
    if n_fade:
        ramp = _sin2_ramp(n_fade)
        env[:n_fade] = ramp
        env[n - n_fade:] = ramp[::-1]
        env[-1] = 0.0  # the mirrored ramp ends one step above 0; end silent
    return env


def reference_chirp(plan: ShotPlan) -> np.ndarray:
    """The reference: a linear chirp over ``chirp_band_hz`` with 2 ms sin^2 fades (float64)."""
    n = plan.samples(plan.chirp_s)
    t = np.arange(n) / plan.sample_rate
    f0, f1 = plan.chirp_band_hz
    phase = 2 * np.pi * (f0 * t + 0.5 * (f1 - f0) / plan.chirp_s * t**2)
    return plan.chirp_level * np.sin(phase) * _fade_envelope(n, plan.samples(0.002))


def _burst_basis(plan: ShotPlan) -> np.ndarray:
    """float64[K, burst samples]: what one unit of each per-speaker control plays."""
    n = plan.samples(plan.burst_s)
    t = np.arange(n) / plan.sample_rate
    if plan.encoding == "tones":
        env = _fade_envelope(n, plan.samples(plan.fade_s))
        return np.sin(2 * np.pi * np.asarray(plan.tones_hz)[:, None] * t) * env
    # segments: smooth steps S(t - boundary) so that the envelopes telescope to 1 inside the burst
    k = plan.n_segments
    bounds = np.linspace(0, n, k + 1)
    n_fade = max(1, min(plan.samples(plan.fade_s), int(n / k / 2)))
    index = np.arange(n)

    def step(at: float, centred: bool) -> np.ndarray:
        start = at - n_fade / 2 if centred else at
        return np.sin(0.5 * np.pi * np.clip((index - start) / n_fade, 0, 1)) ** 2

    edges = [step(0, False)] + [step(b, True) for b in bounds[1:-1]] + [step(n - 1 - n_fade, False)]
    envelopes = np.array([edges[i] - edges[i + 1] for i in range(k)])
    carrier = np.sin(2 * np.pi * plan.segment_carrier_hz * t) if plan.segment_carrier_hz else 1.0
    return envelopes * carrier


def synthesise(plan: ShotPlan, controls: np.ndarray) -> np.ndarray:
    """float32[B, n_samples, n_speakers + 1] for controls float32[B, n_controls] in [0, 1]:
    the speakers' drives (columns in ``speaker_channels`` order), then the reference chirp."""
    controls = np.asarray(controls, np.float64)
    if controls.ndim != 2 or controls.shape[1] != plan.n_controls:
        raise ValueError(f"controls must be [B, {plan.n_controls}], got {controls.shape}")
    basis = _burst_basis(plan)
    amplitudes = controls.reshape(len(controls), plan.n_speakers, -1) * plan.max_amplitude
    out = np.zeros((len(controls), plan.n_samples, plan.n_out_channels), np.float32)
    burst = plan.burst_span
    out[:, burst, :plan.n_speakers] = np.einsum("bsk,kn->bns", amplitudes, basis)
    chirp = reference_chirp(plan)
    out[:, burst.start:burst.start + len(chirp), plan.n_speakers] = chirp
    out[:, burst.stop - len(chirp):burst.stop, plan.n_speakers] = chirp  # the closing chirp
    return out


def levels(waveforms: np.ndarray, span: slice = slice(None)) -> tuple[np.ndarray, np.ndarray]:
    """(peak, rms), each float64[B, channels], of float[B, n, channels]; RMS over ``span``
    (pass ``plan.burst_span`` to average over the burst only, as the level limit does)."""
    w = np.asarray(waveforms)
    peak = np.abs(w).max(axis=1).astype(np.float64)
    part = w[:, span].astype(np.float64)
    rms = np.sqrt((part**2).mean(axis=1))
    return peak, rms


# -- reference ----------------------------------------------------------------------------------
def locate_reference(recorded: np.ndarray, plan: ShotPlan, expected: int | None = None,
                     tolerance: int = 0) -> tuple[int, dict[str, float]]:
    """Where the reference chirp landed in one shot's recorded reference channel.

    ``recorded``: float[frames] (at least ``plan.capture_frames``), recorded from the shot's
    nominal start. Returns (offset in frames = the path's latency, quality ``{gain, residual_lsb,
    peak_ratio}``). Raises `ReferenceError`: ``missing`` (the loopback gain is out of
    ``reference_gain_range``: silence, a dead plant, an unplugged cable), ``moved`` (offset differs
    from ``expected`` by more than ``tolerance``), ``distorted`` (after fitting the gain, some
    sample is off by more than ``reference_tolerance_lsb`` LSB of an ``adc_bits`` converter).
    """
    chirp = reference_chirp(plan)
    n = len(chirp)
    start = plan.burst_span.start
    search = np.asarray(recorded[start:start + plan.max_latency_frames + n], np.float64)
    if len(search) < n:
        raise ReferenceError("missing", f"the recording holds {len(recorded)} frames, too few to search")
    size = 1 << int(np.ceil(np.log2(len(search) + n)))
    corr = np.fft.irfft(np.fft.rfft(search, size) * np.conj(np.fft.rfft(chirp, size)), size)
    corr = corr[:len(search) - n + 1]
    offset = int(np.argmax(corr))
    got = search[offset:offset + n]
    energy = float(chirp @ chirp)
    gain = float(got @ chirp) / energy
    lo, hi = plan.reference_gain_range
    quality = {"gain": gain, "residual_lsb": float("inf"), "peak_ratio": 0.0}
    if not lo <= gain <= hi:
        raise ReferenceError("missing", f"loopback gain {gain:.3g} at offset {offset} is outside [{lo}, {hi}]")
    lsb = 2.0 ** (1 - plan.adc_bits)
    quality["residual_lsb"] = float(np.abs(got - gain * chirp).max() / lsb)
    others = np.abs(np.delete(corr, np.arange(max(0, offset - n // 8), min(len(corr), offset + n // 8))))
    quality["peak_ratio"] = float(corr[offset] / others.max()) if others.size and others.max() > 0 else float("inf")
    if quality["residual_lsb"] > plan.reference_tolerance_lsb:
        raise ReferenceError("distorted", f"the chirp at offset {offset} deviates by {quality['residual_lsb']:.1f} "
                             f"LSB (> {plan.reference_tolerance_lsb})")
    # The closing chirp, at the same offset: the path still worked at the end of the shot.
    closing = np.asarray(recorded[plan.burst_span.stop - n + offset:plan.burst_span.stop + offset], np.float64)
    closing_lsb = float(np.abs(closing - gain * chirp).max() / lsb) if len(closing) == n else float("inf")
    if closing_lsb > plan.reference_tolerance_lsb:
        raise ReferenceError("missing", f"the closing chirp deviates by {closing_lsb:.1f} LSB: the path failed "
                             "during the shot")
    if expected is not None and abs(offset - expected) > tolerance:
        raise ReferenceError("moved", f"offset {offset} frames, expected {expected} (+-{tolerance})")
    return offset, quality


# -- readout ------------------------------------------------------------------------------------
def readout(recording: np.ndarray, offset: int | np.ndarray, plan: ShotPlan) -> np.ndarray:
    """float32[B, n_outputs] from the microphones' recordings float[B, frames, n_mics] (recorded
    from each shot's nominal start), each shot shifted by its ``offset`` (the latency found by
    `locate_reference`; an int for all, or one per shot)."""
    rec = np.asarray(recording)
    if rec.ndim != 3 or rec.shape[2] != plan.n_mics:
        raise ValueError(f"recording must be [B, frames, {plan.n_mics}], got {rec.shape}")
    offsets = np.broadcast_to(np.asarray(offset, np.int64), (rec.shape[0],))
    span = plan.window_span if plan.encoding == "tones" else plan.burst_span
    length = span.stop - span.start
    if offsets.min() < 0 or offsets.max() + span.stop > rec.shape[1]:
        raise ValueError(f"offsets {offsets.min()}..{offsets.max()} put the readout outside {rec.shape[1]} frames")
    index = offsets[:, None] + np.arange(span.start, span.stop)[None, :]
    part = np.take_along_axis(rec, index[:, :, None], axis=1).astype(np.float64)  # [B, N, mics]
    if plan.encoding == "tones":
        bins = np.rint(np.asarray(plan.readout_frequencies) * length / plan.sample_rate).astype(np.int64)
        t = np.arange(length)
        # Only a few bins are needed: a direct DFT at those bins beats a full FFT.
        kernel = np.exp(-2j * np.pi * np.outer(t, bins) / length)  # [N, K]
        spectrum = np.einsum("bnm,nk->bmk", part, kernel)
        values = 2.0 * np.abs(spectrum) / length
    else:
        edges = np.linspace(0, length, plan.n_time_bins + 1).astype(np.int64)
        values = np.stack([np.sqrt((part[:, a:b] ** 2).mean(axis=1)) for a, b in zip(edges[:-1], edges[1:])],
                          axis=2)  # [B, mics, bins]
    return values.reshape(rec.shape[0], -1).astype(np.float32)


def output_axis(plan: ShotPlan) -> dict[str, Any]:
    """``{name, unit, values, labels}``: per output, the frequency (tones) or the time bin's centre
    from the burst start (segments), with a label naming the microphone."""
    if plan.encoding == "tones":
        per_mic = [float(f) for f in plan.readout_frequencies]
        name, unit, fmt = "microphone x frequency", "Hz", "mic{m} {v:g} Hz"
    else:
        width = plan.burst_s / plan.n_time_bins
        per_mic = [float((i + 0.5) * width) for i in range(plan.n_time_bins)]
        name, unit, fmt = "microphone x time", "s", "mic{m} {v:.4g} s"
    values = per_mic * plan.n_mics
    labels = [fmt.format(m=m, v=v) for m in plan.mic_channels for v in per_mic]
    return {"name": name, "unit": unit, "values": values, "labels": labels,
            "signal": "amplitude", "signal_unit": "full scale"}

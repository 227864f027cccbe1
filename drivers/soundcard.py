"""A sound card as the acoustic bench's actuator and sensor, through python-sounddevice (PortAudio).

Two layers:

- `SoundCard`: one long-lived full-duplex ``sounddevice.Stream`` (a new ``playrec`` per shot has no
  stable play->record offset). Its callback counts frames: the block it plays and the block it
  records share the stream frame ``F``. Playback comes from a schedule of waveforms, each with
  the stream frame it starts at (silence where nothing is scheduled: the safe state); capture goes
  into a ring buffer indexed by stream frame; every non-empty ``CallbackFlags`` is logged with
  the frames of its block. So a shot scheduled at ``F`` is read back as ``capture(F, n)`` and the
  path's latency appears as the reference's offset in it.
- `AcousticSoundCard` (name ``"soundcard"``): the rig's only actuator and sensor. Controls ->
  waveforms by a `ShotPlan` (`labpnn.drivers.audio_shots`); every shot carries the reference chirp
  on ``plan.reference_out``, looped back to ``plan.reference_in``. ``connect`` measures the
  latency from a reference-only shot; each shot's reference must then come back at exactly that
  latency, undistorted, and its frames must carry no ``CallbackFlags`` -- else the shot is
  discarded and remeasured (the row gets `FLAG_REMEASURED`). Three bad shots in a row end the
  batch with `BatchFailed` carrying the rows done (a dead emulator or a pulled cable gives silence
  with no flag: only the reference catches it). ``measure_batch`` streams the shots back to back,
  ``ahead`` shots scheduled at a time; the plan's tail is the ring-down gap between shots.

Level limits (``check``): per output channel, the peak and the RMS over the burst of the
synthesised waveform (every tone on that channel summed), for every row of the batch, before
anything plays.

sounddevice is imported lazily: it enumerates devices at import, so the audio server (JACK) must
run first; a device not found triggers one re-scan of PortAudio's devices. Imports nothing of
labpnn except the roles (and the codec beside it).
"""
from __future__ import annotations

import collections
import threading
import time
from typing import Any

import numpy as np

from .audio_shots import (
    ReferenceError,
    ShotPlan,
    levels,
    locate_reference,
    output_axis,
    readout,
    synthesise,
)
from .roles import BatchFailed, InstrumentError

__all__ = ["FLAG_REMEASURED", "AcousticSoundCard", "SoundCard", "SoundCardError", "check_levels", "import_sounddevice"]

#: Row flag: the row's first shot(s) were discarded (bad reference or a stream under/overrun)
#: and it was measured again.
FLAG_REMEASURED = 1 << 3

# Our own bits for PortAudio's CallbackFlags (logged per block).
INPUT_UNDERFLOW, INPUT_OVERFLOW, OUTPUT_UNDERFLOW, OUTPUT_OVERFLOW, PRIMING_OUTPUT = (1 << i for i in range(5))
_STATUS_NAMES = ("input underflow", "input overflow", "output underflow", "output overflow", "priming output")


class SoundCardError(InstrumentError):
    """The sound card or its stream failed (device missing, wrong rate, stream stopped)."""


def import_sounddevice(rescan: bool = False):
    """The ``sounddevice`` module, with a clear error when it or PortAudio is missing.
    ``rescan``: re-initialise PortAudio so devices that appeared since import are seen."""
    try:
        import sounddevice as sd
    except OSError as exc:  # sounddevice raises OSError when libportaudio cannot be loaded
        raise SoundCardError(f"PortAudio library not found ({exc}); on Debian: apt-get install libportaudio2") \
            from None
    except ImportError:
        raise SoundCardError("python-sounddevice is not installed: pip install sounddevice") from None
    if rescan:
        sd._terminate()
        sd._initialize()
    return sd


def _status_bits(status: Any) -> int:
    return (INPUT_UNDERFLOW * bool(status.input_underflow) | INPUT_OVERFLOW * bool(status.input_overflow)
            | OUTPUT_UNDERFLOW * bool(status.output_underflow) | OUTPUT_OVERFLOW * bool(status.output_overflow)
            | PRIMING_OUTPUT * bool(status.priming_output))


def status_text(bits: int) -> str:
    return ", ".join(name for i, name in enumerate(_STATUS_NAMES) if bits & (1 << i)) or "none"


class SoundCard:
    """One full-duplex stream on the device whose name contains ``device`` (case-insensitive; an
    exact name wins), ``n_inputs`` x ``n_outputs`` float32 channels at ``sample_rate``.

    ``ring_s``: seconds of capture kept (a shot must be read back within that time).
    """

    def __init__(self, device: str, sample_rate: int, n_inputs: int, n_outputs: int, *, ring_s: float = 10.0):
        self.device_query, self.sample_rate = str(device), int(sample_rate)
        self.n_inputs, self.n_outputs = int(n_inputs), int(n_outputs)
        self.device_name = ""
        self.host_api = ""
        self._ring = np.zeros((int(ring_s * sample_rate), self.n_inputs), np.float32)
        self._frame = 0  # stream frame of the next callback block
        self._schedule: list[tuple[int, np.ndarray]] = []  # (start frame, float32[n, n_outputs])
        self._events: collections.deque[tuple[int, int, int]] = collections.deque(maxlen=10_000)
        self._cond = threading.Condition()
        self._stream = None
        self.callback_error: str | None = None

    # -- lifecycle ------------------------------------------------------------------------------
    def _find_device(self, sd) -> int:
        query = self.device_query.lower()
        devices = list(sd.query_devices())
        fits = [i for i, d in enumerate(devices) if query in d["name"].lower()
                and d["max_input_channels"] >= self.n_inputs and d["max_output_channels"] >= self.n_outputs]
        exact = [i for i in fits if devices[i]["name"].lower() == query]
        if exact or fits:
            return (exact or fits)[0]
        have = "; ".join(f"{d['name']!r} ({d['max_input_channels']} in, {d['max_output_channels']} out)"
                         for d in devices) or "none"
        raise SoundCardError(f"no audio device named like {self.device_query!r} with {self.n_inputs} inputs and "
                             f"{self.n_outputs} outputs (devices: {have})")

    def open(self) -> None:
        if self._stream is not None:
            return
        sd = import_sounddevice()
        try:
            index = self._find_device(sd)
        except SoundCardError:
            sd = import_sounddevice(rescan=True)  # the audio server may have started after import
            index = self._find_device(sd)
        info = sd.query_devices(index)
        self.device_name = info["name"]
        self.host_api = sd.query_hostapis(info["hostapi"])["name"]
        try:
            sd.check_input_settings(index, channels=self.n_inputs, dtype="float32", samplerate=self.sample_rate)
            sd.check_output_settings(index, channels=self.n_outputs, dtype="float32", samplerate=self.sample_rate)
        except sd.PortAudioError as exc:
            raise SoundCardError(f"{self.device_name!r} refuses {self.sample_rate} Hz with {self.n_inputs} in / "
                                 f"{self.n_outputs} out ({exc}); its default rate is "
                                 f"{info['default_samplerate']:g} Hz") from None
        stream = sd.Stream(device=(index, index), samplerate=self.sample_rate, channels=(self.n_inputs, self.n_outputs),
                           dtype="float32", callback=self._callback)
        if stream.samplerate != self.sample_rate:
            stream.close()
            raise SoundCardError(f"stream opened at {stream.samplerate:g} Hz, not {self.sample_rate} Hz")
        self._stream = stream
        stream.start()

    def close(self) -> None:
        stream, self._stream = self._stream, None
        if stream is not None:
            self.silence()
            stream.stop()
            stream.close()

    @property
    def is_open(self) -> bool:
        return self._stream is not None and self._stream.active

    @property
    def frame(self) -> int:
        """The stream frame of the next block the callback will play/record."""
        return self._frame

    @property
    def reported_latency_frames(self) -> int:
        """Input + output latency PortAudio reports for the stream, in frames."""
        if self._stream is None:
            raise SoundCardError("the stream is not open")
        lat_in, lat_out = self._stream.latency
        return int(round((lat_in + lat_out) * self.sample_rate))

    # -- the audio thread -----------------------------------------------------------------------
    def _callback(self, indata, outdata, frames, _time, status) -> None:
        try:
            with self._cond:
                start = self._frame
                stop = start + frames
                outdata.fill(0)
                keep = []
                for begin, wave in self._schedule:
                    end = begin + len(wave)
                    if end <= start:
                        continue
                    keep.append((begin, wave))
                    lo, hi = max(begin, start), min(end, stop)
                    if lo < hi:
                        outdata[lo - start:hi - start] = wave[lo - begin:hi - begin]
                self._schedule = keep
                at = start % len(self._ring)
                first = min(frames, len(self._ring) - at)
                self._ring[at:at + first] = indata[:first]
                self._ring[:frames - first] = indata[first:]
                if status:
                    self._events.append((start, stop, _status_bits(status)))
                self._frame = stop
                self._cond.notify_all()
        except Exception as exc:  # never let an exception kill the audio thread silently
            self.callback_error = repr(exc)
            outdata.fill(0)

    # -- scheduling and capture -----------------------------------------------------------------
    def schedule(self, wave: np.ndarray, not_before: int = 0, lead_frames: int = 0) -> int:
        """Play float32[n, n_outputs] from stream frame ``max(not_before, next block + lead)``;
        return that frame."""
        wave = np.ascontiguousarray(wave, np.float32)
        if wave.ndim != 2 or wave.shape[1] != self.n_outputs:
            raise ValueError(f"waveform must be [n, {self.n_outputs}], got {wave.shape}")
        with self._cond:
            start = max(int(not_before), self._frame + int(lead_frames))
            self._schedule.append((start, wave))
        return start

    def silence(self) -> None:
        """Drop everything scheduled: the card plays zeros from its next block on."""
        with self._cond:
            self._schedule = []

    def capture(self, start: int, n_frames: int, timeout_s: float | None = None) -> np.ndarray:
        """float32[n_frames, n_inputs] recorded from stream frame ``start`` (waits for it)."""
        stop = start + n_frames
        if n_frames > len(self._ring):
            raise ValueError(f"{n_frames} frames exceed the capture ring ({len(self._ring)})")
        if timeout_s is None:
            timeout_s = max(0.0, (stop - self._frame) / self.sample_rate) + 2.0
        with self._cond:
            if not self._cond.wait_for(lambda: self._frame >= stop, timeout_s):
                raise SoundCardError(f"the stream stopped delivering audio (at frame {self._frame}, waiting for "
                                     f"{stop} for {timeout_s:.1f} s; callback error: {self.callback_error})")
            if self._frame - start > len(self._ring):
                raise SoundCardError(f"frames {start}..{stop} were overwritten in the capture ring")
            index = np.arange(start, stop) % len(self._ring)
            return self._ring[index]

    def status_between(self, start: int, stop: int) -> int:
        """OR of the CallbackFlags bits logged for blocks overlapping frames [start, stop)."""
        bits = 0
        with self._cond:
            for lo, hi, flag in self._events:
                if lo < stop and hi > start:
                    bits |= flag
        return bits


def check_levels(plan: ShotPlan, controls: np.ndarray, max_peak: np.ndarray, max_rms: np.ndarray,
                 chunk_rows: int = 16) -> None:
    """Raise ValueError naming the first row and channel whose synthesised waveform exceeds the
    peak or RMS (over the burst) limit; limits are float[n_out_channels] (speakers, reference)."""
    channels = (*plan.speaker_channels, plan.reference_out)
    for first in range(0, len(controls), chunk_rows):
        peak, rms = levels(synthesise(plan, controls[first:first + chunk_rows]), plan.burst_span)
        for what, value, limit in (("peak", peak, max_peak), ("RMS", rms, max_rms)):
            over = value > limit
            if over.any():
                row, col = np.argwhere(over)[0]
                raise ValueError(f"row {first + row}: output channel {channels[col]} {what} level {value[row, col]:.4g} "
                                 f"exceeds the limit {limit[col]:.4g} (full scale)")


def _per_channel(value: Any, n: int, what: str) -> np.ndarray:
    arr = np.broadcast_to(np.asarray(value, np.float64), (n,)).copy() if np.ndim(value) == 0 \
        else np.asarray(value, np.float64)
    if arr.shape != (n,) or not np.isfinite(arr).all() or (arr <= 0).any():
        raise ValueError(f"{what} must be a positive number or {n} of them (speakers, then reference)")
    return arr


class AcousticSoundCard:
    """The acoustic bench through a sound card (see the module docstring).

    :param device: device name (substring, case-insensitive): ``"system"`` for JACK.
    :param plan: the `ShotPlan` (sample rate, channels, encoding, timing).
    :param max_peak, max_rms: level limits per output channel (speakers in order, then the
        reference), full-scale units; a scalar applies to every channel.
    :param keep_waveforms: keep the last batch's raw recordings (``last_recordings``).
    :param ahead: shots scheduled ahead of the one being read (2 keeps the card busy).
    :param max_failures: bad shots in a row that end a batch.
    :param connect_timeout_s: how long ``connect`` waits for the reference to come back (an
        emulator connects its ports once the stream exists).
    """

    name = "soundcard"
    settle_s = 0.0
    _SETTINGS = ("max_peak", "max_rms", "keep_waveforms", "plan")

    def __init__(self, device: str = "system", plan: ShotPlan | None = None, *, max_peak: Any = 0.9,
                 max_rms: Any = 0.5, keep_waveforms: bool = False, ahead: int = 2, max_failures: int = 3,
                 connect_timeout_s: float = 10.0):
        self.plan = plan or ShotPlan()
        self.max_peak = _per_channel(max_peak, self.plan.n_out_channels, "max_peak")
        self.max_rms = _per_channel(max_rms, self.plan.n_out_channels, "max_rms")
        self.keep_waveforms = bool(keep_waveforms)
        self.ahead, self.max_failures = max(1, int(ahead)), max(1, int(max_failures))
        self.connect_timeout_s = float(connect_timeout_s)
        self.card = SoundCard(device, self.plan.sample_rate, max(*self.plan.mic_channels, self.plan.reference_in),
                              max(*self.plan.speaker_channels, self.plan.reference_out))
        self.latency_frames: int | None = None
        self.last_recordings: np.ndarray | None = None  #: float32[B, capture_frames, n_mics + 1] if kept
        self.shots_played = 0
        self.shots_discarded = 0
        self.last_discard_reason = ""
        self._pending: tuple[int, np.ndarray] | None = None  # row-by-row: (start frame, waveform)

    # -- Instrument -----------------------------------------------------------------------------
    @property
    def n_controls(self) -> int:
        return self.plan.n_controls

    @property
    def n_outputs(self) -> int:
        return self.plan.n_outputs

    def identify(self) -> str:
        sd = import_sounddevice()
        where = f"{self.card.device_name!r} ({self.card.host_api})" if self.card.device_name else \
            f"{self.card.device_query!r} (not connected)"
        return f"sounddevice {sd.__version__}, {sd.get_portaudio_version()[1]}, device {where}, " \
               f"{self.plan.sample_rate} Hz"

    def connect(self) -> None:
        self.card.open()
        try:
            self.latency_frames = self._measure_latency()
        except Exception:
            self.card.close()
            raise

    def close(self) -> None:
        self._pending = None
        self.card.close()

    def settings(self) -> dict[str, Any]:
        return {"device": self.card.device_query, "max_peak": self.max_peak.tolist(), "max_rms": self.max_rms.tolist(),
                "keep_waveforms": self.keep_waveforms, "latency_frames": self.latency_frames,
                "plan": self.plan.as_dict()}

    def configure(self, **settings: Any) -> None:
        unknown = set(settings) - set(self._SETTINGS)
        if unknown:
            raise ValueError(f"unknown setting {sorted(unknown)[0]!r} (have: {', '.join(self._SETTINGS)})")
        plan = self.plan
        if "plan" in settings:
            changes = settings["plan"]
            if not isinstance(changes, dict):
                raise ValueError("plan must be a table of ShotPlan fields")
            try:
                plan = self.plan.replace(**changes)
            except TypeError as exc:
                raise ValueError(str(exc)) from None
            if (plan.sample_rate, plan.speaker_channels, plan.mic_channels, plan.reference_in, plan.reference_out) != \
                    (self.plan.sample_rate, self.plan.speaker_channels, self.plan.mic_channels,
                     self.plan.reference_in, self.plan.reference_out):
                raise ValueError("sample rate and channels are fixed once the card is made")
        peak = _per_channel(settings.get("max_peak", self.max_peak), plan.n_out_channels, "max_peak")
        rms = _per_channel(settings.get("max_rms", self.max_rms), plan.n_out_channels, "max_rms")
        keep = settings.get("keep_waveforms", self.keep_waveforms)
        if not isinstance(keep, bool):
            raise ValueError("keep_waveforms must be true or false")
        self.plan, self.max_peak, self.max_rms, self.keep_waveforms = plan, peak, rms, keep

    # -- Actuator / Sensor ----------------------------------------------------------------------
    def check(self, controls: np.ndarray) -> None:
        check_levels(self.plan, np.asarray(controls), self.max_peak, self.max_rms)

    def safe_state(self) -> None:
        self._pending = None
        self.card.silence()

    def axis(self) -> dict[str, Any]:
        return output_axis(self.plan)

    def apply(self, controls: np.ndarray) -> np.ndarray:
        wave = self._card_waveform(synthesise(self.plan, np.asarray(controls)[None])[0])
        self._pending = (self.card.schedule(wave, lead_frames=self._lead_frames()), wave)
        return controls

    def acquire(self) -> tuple[np.ndarray, int]:
        if self._pending is None:
            raise SoundCardError("acquire without apply")
        start, wave = self._pending
        failures, flags = 0, 0
        while True:
            trace, recording, reason = self._read_shot(start)
            if trace is not None:
                self._pending = None
                if self.keep_waveforms:
                    self.last_recordings = recording[None]
                return trace[0], flags
            failures += 1
            flags |= FLAG_REMEASURED
            if failures >= self.max_failures:
                self.safe_state()
                raise SoundCardError(f"{failures} bad shots in a row; last: {reason}")
            start = self.card.schedule(wave, lead_frames=self._lead_frames())

    # -- BatchInstrument ------------------------------------------------------------------------
    def measure_batch(self, controls: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Stream the rows' shots back to back; see the module docstring for remeasuring."""
        controls = np.asarray(controls, np.float32)
        n_rows, plan = len(controls), self.plan
        traces = np.zeros((n_rows, plan.n_outputs), np.float32)
        flags = np.zeros(n_rows, np.uint32)
        done = np.zeros(n_rows, bool)
        recordings = np.zeros((n_rows, plan.capture_frames, plan.n_mics + 1), np.float32) \
            if self.keep_waveforms else None
        pending = collections.deque(range(n_rows))
        inflight: collections.deque[tuple[int, int]] = collections.deque()
        waves: dict[int, np.ndarray] = {}
        next_start, failures = 0, 0
        try:
            while pending or inflight:
                while pending and len(inflight) < self.ahead:
                    row = pending.popleft()
                    if row not in waves:
                        waves[row] = self._card_waveform(synthesise(plan, controls[row:row + 1])[0])
                    start = self.card.schedule(waves[row], not_before=next_start, lead_frames=self._lead_frames())
                    next_start = start + plan.n_samples
                    inflight.append((row, start))
                row, start = inflight.popleft()
                trace, recording, reason = self._read_shot(start)
                if trace is not None:
                    traces[row], done[row], failures = trace[0], True, 0
                    del waves[row]
                    if recordings is not None:
                        recordings[row] = recording
                    continue
                failures += 1
                flags[row] |= FLAG_REMEASURED
                pending.appendleft(row)
                if failures >= self.max_failures:
                    raise SoundCardError(f"{failures} bad shots in a row; last: {reason}")
        except SoundCardError as exc:
            self.safe_state()
            n_done = int(np.argmin(done)) if not done.all() else n_rows
            if recordings is not None:
                self.last_recordings = recordings[:n_done]
            raise BatchFailed(f"{exc} ({n_done} of {n_rows} rows measured)", traces[:n_done].copy(),
                              flags[:n_done].copy()) from exc
        if recordings is not None:
            self.last_recordings = recordings
        return traces, flags

    # -- internals ------------------------------------------------------------------------------
    def _lead_frames(self) -> int:
        return self.plan.samples(0.01)

    def _card_waveform(self, shot: np.ndarray) -> np.ndarray:
        """A synthesised shot [n, speakers + reference] placed on the card's output channels."""
        plan = self.plan
        wave = np.zeros((len(shot), self.card.n_outputs), np.float32)
        for column, channel in enumerate((*plan.speaker_channels, plan.reference_out)):
            wave[:, channel - 1] = shot[:, column]
        return wave

    def _read_shot(self, start: int) -> tuple[np.ndarray | None, np.ndarray, str]:
        """(trace float32[1, S] or None if the shot is bad, recording [frames, mics + reference],
        why it is bad)."""
        plan = self.plan
        captured = self.card.capture(start, plan.capture_frames)
        self.shots_played += 1
        columns = [c - 1 for c in (*plan.mic_channels, plan.reference_in)]
        recording = captured[:, columns]
        # Only the frames this shot's readout can use: a flag in the next shot's start is not ours.
        used = plan.n_samples + (self.latency_frames if self.latency_frames is not None else plan.max_latency_frames)
        bits = self.card.status_between(start, start + used)
        reason = ""
        if bits & ~PRIMING_OUTPUT:
            reason = f"stream reported {status_text(bits)}"
        else:
            try:
                offset, _ = locate_reference(recording[:, -1], plan, self.latency_frames)
            except ReferenceError as exc:
                reason = str(exc)
        if reason:
            self.shots_discarded += 1
            self.last_discard_reason = reason
            return None, recording, reason
        return readout(recording[None, :, :-1], offset, plan), recording, ""

    def _measure_latency(self) -> int:
        """Play reference-only shots until one comes back clean; its offset is the latency."""
        silent = self._card_waveform(synthesise(self.plan, np.zeros((1, self.plan.n_controls), np.float32))[0])
        deadline = time.monotonic() + self.connect_timeout_s
        reason = "no shot played"
        while time.monotonic() < deadline:
            start = self.card.schedule(silent, lead_frames=self._lead_frames())
            recording = self.card.capture(start, self.plan.capture_frames)
            bits = self.card.status_between(start, start + self.plan.capture_frames)
            try:
                offset, _ = locate_reference(recording[:, self.plan.reference_in - 1], self.plan)
            except ReferenceError as exc:
                reason = str(exc)
                continue
            if bits & ~PRIMING_OUTPUT:
                reason = f"stream reported {status_text(bits)}"
                continue
            return offset
        raise SoundCardError(f"the reference on output {self.plan.reference_out} did not come back on input "
                             f"{self.plan.reference_in} within {self.connect_timeout_s:g} s ({reason}); is the "
                             "loopback cable (or the emulator) connected?")

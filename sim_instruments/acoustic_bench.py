"""The simulated acoustic bench: a JACK dummy server and the plate/cavity emulator between PortAudio's ports.

Run it as ``labpnn sim acoustic`` or ``python -m labpnn.sim_instruments.acoustic_bench [--preset
plate|cavity] [--server-name NAME] [--seed N] [--copy-seed N] [--no-jackd]``. It starts
``jackd`` (dummy backend, no sound card) unless one of that name already runs (or ``--no-jackd``:
then one must), starts the emulator (`AcousticJackEmulator`), prints::

    server NAME
    device system
    env JACK_DEFAULT_SERVER=NAME
    channels playback S+1 capture M+1 (reference: playback S+1 -> capture M+1)
    ready

and serves until SIGINT/SIGTERM (exit status 0; jackd stopped if it started it). A driver opens the
PortAudio device ``system`` (JACK host API) with ``JACK_DEFAULT_SERVER`` set to the server's name.
SIGUSR1 stalls the emulator's process callback once for ``--stall-ms`` (fault injection).

The physics is ``labpnn.sim_instruments.acoustic`` (`AcousticPlant`); where that module is not
installed, `StandInPlant` (a few linear modes with carried filter state) plays its part with the
same interface.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import signal
import sys

import numpy as np
from scipy.signal import lfilter

from .acoustic_jack import AcousticJackEmulator, JackServer, JackUnavailable, server_running
from .serving import stop_on_signals

__all__ = ["AcousticBenchEmulators", "StandInPlant", "make_plant", "main", "DEFAULT_SERVER_NAME"]

DEFAULT_SERVER_NAME = "labpnn"


class StandInPlant:
    """A linear stand-in for the bench's physics: ``n_modes`` damped 2nd-order resonators (unit peak gain) driven by a
    fixed mix of the speakers and heard by each microphone with fixed mixed-sign couplings, plus
    white noise of RMS ``noise_rms`` on each microphone. Causal and stateful (filter state carried
    between `process` calls), deterministic given ``seed``::

        q_j[n] = 2 r_j cos(theta_j) q_j[n-1] - r_j^2 q_j[n-2] + b_j sum_s A[j, s] u_s[n]
        y_m[n] = sum_j C[m, j] q_j[n] + noise_rms * z,   r = exp(-pi f / (Q fs)), theta = 2 pi f / fs
    """

    def __init__(self, n_speakers: int = 4, n_mics: int = 4, sample_rate: int = 48000, seed: int = 0,
                 noise_rms: float = 1e-4, n_modes: int = 8, q_factor: float = 10.0):
        self.n_speakers, self.n_mics, self.sample_rate = int(n_speakers), int(n_mics), int(sample_rate)
        self.noise_rms = float(noise_rms)
        rng = np.random.default_rng(seed)
        # log-spaced over 300-3000 Hz with a 5 % jitter, broad (low Q): any tone there is heard
        freqs = np.geomspace(300.0, 3000.0, n_modes) * (1 + 0.05 * rng.uniform(-1, 1, n_modes))
        r = np.exp(-np.pi * freqs / (q_factor * sample_rate))
        theta = 2 * np.pi * freqs / sample_rate
        gain = (1 - r) * np.sqrt(1 - 2 * r * np.cos(2 * theta) + r**2)  # |denominator| at resonance
        self.mode_freqs = freqs
        self._filters = [(np.array([g]), np.array([1.0, -2 * ri * np.cos(t), ri**2])) for g, ri, t in zip(gain, r, theta)]
        self._state = [np.zeros(2) for _ in freqs]
        self.speaker_mix = rng.uniform(-1, 1, (n_modes, n_speakers)) / np.sqrt(n_speakers)
        self.mic_mix = rng.uniform(-1, 1, (n_mics, n_modes)) / np.sqrt(n_modes)
        self._noise = np.random.default_rng([seed, 1])

    def process(self, drive: np.ndarray) -> np.ndarray:
        drive = np.asarray(drive, np.float64)
        forces = drive @ self.speaker_mix.T  # [n, modes]
        modes = np.empty_like(forces)
        for j, (b, a) in enumerate(self._filters):
            modes[:, j], self._state[j] = lfilter(b, a, forces[:, j], zi=self._state[j])
        out = modes @ self.mic_mix.T
        if self.noise_rms:
            out += self.noise_rms * self._noise.standard_normal(out.shape)
        return out.astype(np.float32)


def make_plant(preset: str = "cavity", seed: int = 0, copy_seed: int | None = None):
    """The bench's physics: ``AcousticPlant(AcousticConfig.<preset>())`` with the seeds set (the
    fields that exist), or a `StandInPlant` if the physics module is not there."""
    try:
        from .acoustic import AcousticConfig, AcousticPlant
    except ImportError:
        return StandInPlant(seed=seed if copy_seed is None else seed * 1000003 + copy_seed)
    config = getattr(AcousticConfig, preset)()
    names = {f.name for f in dataclasses.fields(config)}
    changes = {"seed": seed} if "seed" in names else {}
    if copy_seed is not None and "copy_seed" in names:
        changes["copy_seed"] = copy_seed
    return AcousticPlant(dataclasses.replace(config, **changes) if changes else config)


class AcousticBenchEmulators:
    """jackd (unless ``start_jackd=False`` or one of that name runs) + the emulator, for in-test use.

    ``config`` is an ``AcousticConfig`` (the plant is built from it), a ready plant (anything with
    ``process``, e.g. `StandInPlant`), or None (`make_plant` of ``preset``, ``seed``, ``copy_seed``).
    After `start`, ``emulator`` is the running `AcousticJackEmulator` and ``server`` the `JackServer`
    (None if someone else's server is used); ``plant`` is the physics either way."""

    def __init__(self, config=None, *, server_name: str = DEFAULT_SERVER_NAME, preset: str = "cavity",
                 seed: int = 0, copy_seed: int | None = None, start_jackd: bool = True, period: int = 1024,
                 channels: int = 8, **emulator_kwargs):
        if config is None:
            self.plant = make_plant(preset, seed, copy_seed)
        elif hasattr(config, "process"):
            self.plant = config
        else:
            from .acoustic import AcousticPlant

            self.plant = AcousticPlant(config)
        self.server_name = server_name
        self.start_jackd, self.period, self.channels = start_jackd, period, channels
        self.emulator_kwargs = emulator_kwargs
        self.server: JackServer | None = None
        self.emulator: AcousticJackEmulator | None = None

    def start(self) -> AcousticBenchEmulators:
        if self.start_jackd and not server_running(self.server_name):
            self.server = JackServer(self.server_name, rate=int(self.plant.sample_rate), period=self.period,
                                     channels=self.channels).start()
        try:
            self.emulator = AcousticJackEmulator(self.plant, server_name=self.server_name,
                                                 **self.emulator_kwargs).start()
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        if self.emulator is not None:
            self.emulator.stop()
            self.emulator = None
        if self.server is not None:
            self.server.stop()
            self.server = None

    def __enter__(self) -> AcousticBenchEmulators:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    @property
    def device(self) -> str:
        """The PortAudio device a driver opens (JACK host API, named after JACK's ``system`` client)."""
        return "system"


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="labpnn sim acoustic",
        description="Simulated acoustic bench: a plate/cavity as a JACK client between PortAudio's ports "
                    "(JACK dummy backend, no sound card).",
    )
    p.add_argument("--preset", choices=("plate", "cavity"), default="cavity", help="which physics (default cavity)")
    p.add_argument("--server-name", default=DEFAULT_SERVER_NAME, help="JACK server name (default labpnn)")
    p.add_argument("--seed", type=int, default=0, help="physics seed (noise)")
    p.add_argument("--copy-seed", type=int, default=None, help="copy-to-copy variation seed")
    p.add_argument("--no-jackd", action="store_true", help="do not start jackd: use the running server")
    p.add_argument("--period", type=int, default=1024, help="JACK period in frames (below 1024 xruns on 2 cores)")
    p.add_argument("--channels", type=int, default=8, help="system ports each way")
    p.add_argument("--no-reference", action="store_true", help="return silence on the reference channel")
    p.add_argument("--stall-ms", type=float, default=200.0, help="stall length on SIGUSR1 (ms)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.period <= 0 or args.channels <= 0 or args.stall_ms < 0:
        print("error: --period and --channels must be > 0, --stall-ms >= 0", file=sys.stderr)
        return 2
    if args.no_jackd and not server_running(args.server_name):
        print(f"error: no JACK server named {args.server_name!r} is running (drop --no-jackd to start one)",
              file=sys.stderr)
        return 1
    bench = AcousticBenchEmulators(
        make_plant(args.preset, args.seed, args.copy_seed), server_name=args.server_name,
        start_jackd=not args.no_jackd, period=args.period, channels=args.channels,
        ref_latency_match=not args.no_reference,
    )
    with stop_on_signals() as stop:
        try:
            bench.start()
        except (JackUnavailable, ValueError) as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
        stall = None
        if hasattr(signal, "SIGUSR1"):
            with contextlib.suppress(ValueError):
                stall = signal.signal(signal.SIGUSR1, lambda *_: bench.emulator.stall(args.stall_ms / 1e3))
        try:
            plant = bench.plant
            print(f"server {args.server_name}", flush=True)
            print(f"device {bench.device}", flush=True)
            print(f"env JACK_DEFAULT_SERVER={args.server_name}", flush=True)
            print(f"channels playback {plant.n_speakers + 1} capture {plant.n_mics + 1} "
                  f"(reference: playback {plant.n_speakers + 1} -> capture {plant.n_mics + 1})", flush=True)
            print("ready", flush=True)
            while not stop.wait(0.5):
                pass
        finally:
            bench.stop()
            if stall is not None:
                signal.signal(signal.SIGUSR1, stall)
    return 0


if __name__ == "__main__":
    sys.exit(main())

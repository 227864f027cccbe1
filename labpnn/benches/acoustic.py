"""The acoustic bench: a sound card drives four speakers into a small reverberant box and records four
microphones (``cavity``, PhyLL's acoustic system), or one speaker on a plate and one microphone
(``plate``, PAT's mechanical layer). Physics: `labpnn.sim_instruments.acoustic`.

Controls: one tone amplitude per speaker per tone (5 tones at 300-880 Hz on the analysis window's FFT
grid, speaker-major: speaker 1's five tones, then speaker 2's, ...), in [0, 1] of
``max_amplitude``; outputs: each microphone's magnitude spectrum at the tones, from a steady window
after the ring-up (microphone-major). The paths:

- ``"inprocess"`` (default for calibration, training benchmarks and the demo): the same shots
  through the same physics on a simulated clock, no audio, labelled a simulation in describe();
- ``"jack"``: the real audio path — jackd on its dummy backend, the physics as a JACK client
  between PortAudio's ports, the sounddevice driver with its reference chirp — in real time.

``examples/acoustic-sim.toml`` is the JACK path as ``labpnn sim acoustic`` starts it,
``examples/acoustic-lab.toml`` a real sound card.
"""
from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator
from typing import Any

from labpnn.config import build_rig, parse_config
from labpnn.rig import Rig

NAME = "acoustic"
SUMMARY = "acoustic cavity: 4 speakers x 5 tones -> 4 microphones x 5 spectral magnitudes (sound card)"

#: the shot plan of each preset (`labpnn.drivers.audio_shots.ShotPlan` fields)
PLANS: dict[str, dict[str, Any]] = {
    "cavity": {"encoding": "tones", "speaker_channels": [1, 2, 3, 4], "mic_channels": [1, 2, 3, 4],
               "reference_out": 5, "reference_in": 5, "tones_hz": [300.0, 430.0, 570.0, 720.0, 880.0],
               "max_amplitude": 0.1, "burst_s": 0.5, "window_start_s": 0.15, "window_s": 0.2, "tail_s": 0.2},
    "plate": {"encoding": "tones", "speaker_channels": [1], "mic_channels": [1], "reference_out": 2,
              "reference_in": 2, "tones_hz": [820.0, 1135.0, 1480.0, 1965.0, 2410.0, 2860.0],
              "max_amplitude": 0.15, "burst_s": 0.5, "window_start_s": 0.15, "window_s": 0.2, "tail_s": 0.45},
}

#: the [rig] table of examples/acoustic-sim.toml (the JACK path, device "system")
RIG: dict[str, Any] = {"kind": "acoustic", "device": "system", "plan": PLANS["cavity"], "max_peak": 0.9,
                       "max_rms": 0.5}


#: the [network] table: one tone per input feature, inputs on the first speakers' tones and the
#: trainable parameters on the last speakers' — the same tones, so inputs and parameters meet in
#: the box before the magnitude readout (controls are speaker-major). The twin's core: a microphone's
#: reading at a tone is the magnitude of a field linear in the tone amplitudes, so ``modulus`` (held-out
#: noise ratio 1.31-1.40 against the generic MLP's 3.2 on 6,256 uniform rows fitted for 90 s)
NETWORK: dict[str, Any] = {"repeat": 1, "layout": "blocks", "twin_core": "modulus"}


def rig_section(*, preset: str = "cavity", path: str = "inprocess", seed: int = 0, copy_seed: int = 0,
                drift_scale: float = 1.0) -> dict[str, Any]:
    """The bench's [rig] table: the sound card "system" (``path="jack"``) or its in-process simulation."""
    section = copy.deepcopy(RIG)
    section["plan"] = copy.deepcopy(PLANS[preset])
    if path == "inprocess":
        section["simulation"] = {"preset": preset, "seed": seed, "copy_seed": copy_seed, "drift_scale": drift_scale}
    elif path != "jack":
        raise ValueError(f"path must be 'inprocess' or 'jack', got {path!r}")
    return section


@contextlib.contextmanager
def simulated_rig(*, settle_s: float = 0.0, sweep_s: float = 0.0, seed: int = 0, copy_seed: int = 0,
                  preset: str = "cavity", path: str = "inprocess", server_name: str = "labpnn-bench",
                  drift_scale: float = 1.0) -> Iterator[Rig]:
    """A connected `Rig` on the simulated acoustic bench, closed (and jackd stopped) on exit.
    ``settle_s``/``sweep_s`` are accepted for the common bench interface and ignored: a shot takes
    its audio time (the plan's), in real time on the JACK path, on a simulated clock in-process."""
    config = parse_config({"name": f"acoustic-{preset}-sim",
                           "rig": rig_section(preset=preset, path=path, seed=seed, copy_seed=copy_seed,
                                              drift_scale=drift_scale), "network": NETWORK}, "acoustic bench")
    if path == "inprocess":
        rig = build_rig(config).connect()
        try:
            yield rig
        finally:
            rig.close()
        return
    from labpnn.sim_instruments.acoustic_bench import AcousticBenchEmulators
    from labpnn.sim_instruments.acoustic_jack import JackServer

    emulators = AcousticBenchEmulators(preset=preset, seed=seed, copy_seed=copy_seed, server_name=server_name).start()
    try:
        import sounddevice as sd

        sd._terminate()  # PortAudio lists devices when it starts: restart it now that jackd runs
        sd._initialize()
        rig = build_rig(config).connect()
        try:
            yield rig
        finally:
            rig.close()
            sd._terminate()  # before jackd goes, or PortAudio's JACK client asserts at exit
            sd._initialize()
    finally:
        emulators.stop()
        del JackServer


def sim_main(argv: list[str]) -> int:
    """``labpnn sim acoustic``: jackd (dummy backend) and the emulator until SIGINT/SIGTERM."""
    from labpnn.sim_instruments.acoustic_bench import main

    return int(main(argv) or 0)

"""The acoustic bench as users run it: the rig kind in TOML, the in-process path, inputs and
parameters that interact in the physics, and the real audio path with `labpnn sim acoustic` and
`labpnn serve` as separate processes behind a `RigClient`."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from labpnn.benches import get_bench
from labpnn.config import load_config, parse_config
from labpnn.protocols.errors import InstrumentFailure, LimitExceeded

REPO = Path(__file__).resolve().parents[1]


def test_the_example_is_the_bench_rig():
    example = load_config(REPO / "examples" / "acoustic-sim.toml").rig.model_dump()
    bench = get_bench("acoustic")
    assert parse_config({"rig": bench.rig_section(path="jack")}).rig.model_dump() == example
    assert parse_config({"rig": bench.rig_section()}).rig.simulation.preset == "cavity"
    assert load_config(REPO / "examples" / "acoustic-sim.toml").network.model_dump(exclude_none=True) == bench.NETWORK


def test_the_bench_names_its_twin_core_and_the_defaults_take_it():
    from labpnn.training.defaults import choose_defaults

    with get_bench("acoustic").simulated_rig() as rig:
        describe = rig.describe()
    chosen = {c.name: c for c in choose_defaults(describe, n_features=12, n_classes=7, n_train=300).choices}
    assert (chosen["twin_core"].value, chosen["twin_core"].source) == ("modulus", "bench")
    generic = choose_defaults({"n_controls": 20, "n_outputs": 20}, n_features=12, n_classes=7, n_train=300)
    assert {c.name: c.value for c in generic.choices}["twin_core"] == "residual_mlp"


def test_the_in_process_path_is_labelled_and_shots_have_no_memory():
    x = np.random.default_rng(0).random((6, 20), dtype=np.float32)
    with get_bench("acoustic").simulated_rig(seed=1, drift_scale=0.0) as rig:
        assert "in-process acoustic simulation (no audio path)" in json.dumps(rig.describe()["instruments"])
        first = rig.run(x)
        order = np.array([5, 3, 1, 0, 4, 2])
        again = rig.run(x[order])
        noise = rig.run(np.repeat(x[:1], 8, axis=0)).std(axis=0).mean()
    assert first.shape == (6, 20) and np.isfinite(first).all()
    # the same rows in another order read the same within the repeat noise: nothing carries over
    assert np.sqrt(np.mean((again - first[order]) ** 2)) < 3 * noise


def test_an_inputs_effect_changes_with_a_parameter_on_the_same_tone():
    """Input feature on speaker 1's first tone, a parameter on speaker 4's first tone: they meet in
    the cavity (same frequency, mixed-sign transfers) before the magnitude readout, so the output's
    sensitivity to the input depends on the parameter — the interaction a network layer needs."""
    base = np.full(20, 0.3, np.float32)
    rows = []
    for param in (0.0, 1.0):
        for value in (0.4, 0.6):
            row = base.copy()
            row[0], row[15] = value, param  # speaker 1 tone 1 (input), speaker 4 tone 1 (parameter)
            rows.append(row)
    reps = 6
    with get_bench("acoustic").simulated_rig(seed=2, drift_scale=0.0) as rig:
        traces = rig.run(np.repeat(np.array(rows), reps, axis=0)).reshape(4, reps, 20)
    mean, sd = traces.mean(1), traces.std(1, ddof=1)
    sens = np.stack([mean[1] - mean[0], mean[3] - mean[2]])  # d(output) for the input step, per parameter
    sens_se = np.sqrt(sd[0] ** 2 + sd[1] ** 2 + sd[2] ** 2 + sd[3] ** 2) / np.sqrt(reps)
    change = np.abs(sens[1] - sens[0])
    tone1 = [0, 5, 10, 15]  # each microphone's first tone (microphone-major outputs)
    assert change[tone1].max() > 3 * sens_se[tone1][np.argmax(change[tone1])], (change[tone1], sens_se[tone1])


def _require_audio():
    from labpnn.sim_instruments.acoustic_jack import available, portaudio_available

    for ok, reason in (available(), portaudio_available()):
        if not ok:
            if os.environ.get("CI", "").lower() == "true":
                pytest.fail(f"CI must run the audio-path tests: {reason}")
            pytest.skip(reason)


@pytest.mark.slow
def test_the_real_audio_path_through_separate_processes(tmp_path):
    _require_audio()
    from labpnn.remote.client import RigClient
    from labpnn.sim_instruments.acoustic_jack import JackServer

    name = f"lpa-{os.getpid()}"
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "JACK_DEFAULT_SERVER": name}
    config = parse_config({"name": "acoustic-sim", "server": {"bind": "tcp://127.0.0.1:0", "publish": ""},
                           "rig": {**get_bench("acoustic").rig_section(path="jack"), "max_failures": 3}})
    path = tmp_path / "rig.json"
    path.write_text(config.model_dump_json())
    with JackServer(name, rate=48000, period=1024, channels=8):
        sim = subprocess.Popen([sys.executable, "-m", "labpnn", "sim", "acoustic", "--no-jackd", "--server-name", name,
                                "--seed", "3"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        serve = None
        try:
            while (line := sim.stdout.readline()) and line.strip() != "ready":
                pass
            assert line.strip() == "ready", sim.stderr.read()
            serve = subprocess.Popen([sys.executable, "-m", "labpnn", "serve", "--config", str(_toml(tmp_path, config))],
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
            line = serve.stdout.readline()
            assert "listening on tcp://" in line, line + serve.stderr.read()
            with RigClient(line.split("listening on ")[1].split()[0].rstrip(","), timeout_s=60) as client:
                tone = np.zeros((2, 20), np.float32)
                tone[:, 0] = 1.0  # speaker 1, 300 Hz
                m = client.measure(tone)
                assert m.error is None and m.traces.shape == (2, 20)
                with get_bench("acoustic").simulated_rig(seed=4) as local:  # the same shot in-process
                    expected = local.run(tone)
                mic_tone1 = [0, 5, 10, 15]
                np.testing.assert_allclose(m.traces[:, mic_tone1], expected[:, mic_tone1], rtol=0.05, atol=2e-4)
                # the level limit refuses the whole batch before anything plays
                before = client.status()["rows_done"]
                client.configure({"soundcard": {"max_peak": 0.2}})
                with pytest.raises(LimitExceeded, match="peak"):
                    client.run(np.ones((3, 20), np.float32))
                assert client.status()["rows_done"] == before
                client.configure({"soundcard": {"max_peak": 0.9}})
                # the emulator dies mid-batch: INSTRUMENT with the rows done so far; the server keeps serving
                x = np.random.default_rng(5).random((12, 20), dtype=np.float32)
                killer = subprocess.Popen([sys.executable, "-c", f"import os, signal, time; time.sleep(2.5); "
                                           f"os.kill({sim.pid}, signal.SIGKILL)"])
                failed = client.measure(x)
                killer.wait(10)
                assert isinstance(failed.error, InstrumentFailure) and "bad shots in a row" in str(failed.error)
                assert 0 < failed.n_done < 12 and failed.traces.shape == (failed.n_done, 20)
                assert client.ping() >= 0
            serve.send_signal(signal.SIGTERM)
            assert serve.wait(timeout=30) == 0
        finally:
            for proc in (serve, sim):
                if proc is not None and proc.poll() is None:
                    proc.kill()
                    proc.wait(10)


def _toml(tmp_path: Path, config) -> Path:
    """The config as TOML (the format `labpnn serve --config` reads)."""
    data = json.loads(config.model_dump_json(exclude_none=True))
    lines = [f"name = {json.dumps(data['name'])}", "[server]"]
    lines += [f"{k} = {json.dumps(v)}" for k, v in data["server"].items()]
    rig = data["rig"]
    lines.append("[rig]")
    lines += [f"{k} = {json.dumps(v)}" for k, v in rig.items() if not isinstance(v, dict)]
    lines.append("[rig.plan]")
    lines += [f"{k} = {json.dumps(v)}" for k, v in rig["plan"].items()]
    path = tmp_path / "rig.toml"
    path.write_text("\n".join(lines) + "\n")
    time.sleep(0)
    return path

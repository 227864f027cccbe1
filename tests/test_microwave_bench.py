"""The microwave bench as users run it: the rig kind in TOML, `labpnn sim microwave` and `labpnn serve`
as separate processes, a `RigClient`; binary controls reported as the states set; a twin that
quantises like the rig."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import tomllib

from labpnn.benches import get_bench
from labpnn.config import load_config, parse_config
from labpnn.drivers.roles import FLAG_QUANTISED

REPO = Path(__file__).resolve().parents[1]


def test_the_example_is_the_bench_rig():
    example = load_config(REPO / "examples" / "microwave-sim.toml").rig.model_dump()
    bench = get_bench("microwave")
    served = parse_config({"rig": bench.rig_section(example["metasurface"]["port"], example["vna"]["resource"])})
    assert served.rig.model_dump() == example
    assert len(example["metasurface"]["atoms"]) == bench.N_META >= 40
    network = load_config(REPO / "examples" / "microwave-sim.toml").network.model_dump(exclude_none=True)
    assert network == bench.NETWORK


def test_the_default_layout_leaves_at_least_32_atoms_to_the_parameters():
    from labpnn.training.defaults import choose_defaults

    with get_bench("microwave").simulated_rig() as rig:
        describe = rig.describe()
    assert describe["network"] == get_bench("microwave").NETWORK  # served, so a remote trainer sees it
    chosen = choose_defaults(describe, n_features=12, n_classes=7, n_train=154)  # the vowels
    assert chosen["features"] * chosen["repeat"] <= describe["n_controls"] - 32
    assert {c.name: c.source for c in chosen.choices}["repeat"] == "bench"


def test_binary_controls_come_back_as_the_states_set():
    x = np.random.default_rng(1).random((6, 48), dtype=np.float32)
    x[0, :3] = [0.49, 0.5, 0.51]
    with get_bench("microwave").simulated_rig(seed=1) as rig:
        m = rig.measure(x)
        d = rig.describe()
    assert m.error is None and m.traces.shape == (6, 20) and d["axis"]["unit"] == "Hz"
    np.testing.assert_array_equal(m.applied, (x >= 0.5).astype(np.float32))
    assert (m.flags & FLAG_QUANTISED).all()
    assert np.isfinite(m.traces).all() and (m.traces > 0).all() and (m.traces <= 1).all()  # |S21|, passive
    assert (m.traces.max(0) / m.traces.min(0)).max() > 2  # the configuration matters


def test_the_twin_learns_the_rig_quantises_and_passes_gradients_straight_through():
    import torch

    from labpnn.contract import control_levels
    from labpnn.twin.fit import fit_twin

    assert control_levels(np.array([[0, 1], [1, 1]], np.float32)) == 2
    assert control_levels(np.array([[0, 1 / 3], [2 / 3, 1]], np.float32)) == 4
    assert control_levels(np.random.default_rng(0).random((50, 4))) is None
    rng = np.random.default_rng(0)
    states = (rng.random((300, 6)) >= 0.5).astype(np.float32)
    traces = np.stack([states @ rng.normal(size=6), (states[:, 0] * states[:, 1])], 1).astype(np.float32)
    twin, _ = fit_twin(states, traces, max_seconds=5, epochs=30, width=32, depth=1, progress=False)
    assert twin.levels == 2
    x = torch.tensor([[0.4, 0.6, 0.2, 0.9, 0.5, 0.51]], requires_grad=True)
    y = twin(x)
    torch.testing.assert_close(y, twin(torch.tensor([[0.0, 1, 0, 1, 1, 1]])))  # the states, not the values
    y.sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0  # straight through the rounding


@pytest.mark.slow
def test_sim_microwave_and_serve_as_separate_processes(tmp_path):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    link = tmp_path / "ris"
    sim = subprocess.Popen([sys.executable, "-m", "labpnn", "sim", "microwave", "--vna-port", "0", "--link", str(link)],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    serve = None
    try:
        vna = sim.stdout.readline().split()[1]
        assert sim.stdout.readline().startswith("metasurface /dev/pts/") and link.is_symlink()
        config = tomllib.loads((REPO / "examples" / "microwave-sim.toml").read_text())
        config["rig"]["metasurface"]["port"] = str(link)
        config["rig"]["vna"]["resource"] = vna
        config["server"] = {"bind": "tcp://127.0.0.1:0", "publish": ""}
        path = tmp_path / "rig.toml"
        path.write_text(_toml(config))
        serve = subprocess.Popen([sys.executable, "-m", "labpnn", "serve", "--config", str(path)],
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        line = serve.stdout.readline()
        assert "listening on tcp://" in line, line + serve.stderr.read()
        from labpnn.remote.client import RigClient

        with RigClient(line.split("listening on ")[1].split()[0].rstrip(",")) as client:
            x = np.random.default_rng(3).random((3, 48), dtype=np.float32)
            m = client.measure(x)
            assert m.error is None and m.traces.shape == (3, 20)
            np.testing.assert_array_equal(m.applied, (x >= 0.5).astype(np.float32))
        serve.send_signal(signal.SIGTERM)
        assert serve.wait(timeout=20) == 0
        sim.send_signal(signal.SIGTERM)
        assert sim.wait(timeout=20) == 0 and not link.exists()
    finally:
        for proc in (serve, sim):
            if proc is not None and proc.poll() is None:
                proc.kill()


def _toml(data: dict, prefix: str = "") -> str:
    """A small TOML writer for the nested tables of a rig config."""
    import json

    scalars = [f"{k} = {json.dumps(v)}" for k, v in data.items() if not isinstance(v, dict)]
    out = ([f"[{prefix}]"] if prefix and scalars else []) + scalars
    for key, value in data.items():
        if isinstance(value, dict):
            out.append(_toml(value, f"{prefix}.{key}" if prefix else key))
    return "\n".join(out) + "\n"


def test_export_writes_what_was_measured_and_refuses_magnitudes(tmp_path, capsys):
    import skrf

    from labpnn.cli import main
    from labpnn.sessions import RecordingSystem, SessionWriter
    from labpnn.sessions.export import ExportProblem, export_touchstone

    x = np.random.default_rng(4).random((3, 48), dtype=np.float32)
    recorded = {}
    for output in ("reim", "db"):
        with get_bench("microwave").simulated_rig(output=output) as rig, \
                SessionWriter(tmp_path / f"{output}.h5", rig.describe()) as writer:
            recorded[output] = RecordingSystem(rig, writer, tag="calibration").run(x)
    traces = recorded["reim"]
    paths = export_touchstone(tmp_path / "reim.h5", tmp_path / "ts")
    assert [p.name for p in paths] == ["row000000.s2p", "row000001.s2p", "row000002.s2p"]
    net = skrf.Network(str(paths[1]))
    np.testing.assert_allclose(net.s[:, 1, 0], traces[1, :20] + 1j * traces[1, 20:], rtol=1e-6)  # text round trip
    assert np.isnan(net.s[:, 0, 0]).all() and np.isnan(net.s[:, 0, 1]).all() and np.isnan(net.s[:, 1, 1]).all()
    np.testing.assert_allclose(net.f, np.linspace(4.5e9, 5.5e9, 20))
    text = paths[1].read_text()
    assert "S11, S12 and S22 were not measured" in text and '"if_bandwidth_hz": 10000.0' in text
    with pytest.raises(ExportProblem, match="\\|S21\\| in dB only"):
        export_touchstone(tmp_path / "db.h5", tmp_path / "no")
    assert main(["export", str(tmp_path / "db.h5"), "--touchstone", str(tmp_path / "no")]) == 2
    assert "never measured are not invented" in capsys.readouterr().err
    assert main(["export", str(tmp_path / "reim.h5"), "--touchstone", str(tmp_path / "one"), "--rows", "2"]) == 0
    assert [p.name for p in (tmp_path / "one").iterdir()] == ["row000002.s2p"]


def _running(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[1][0] != "Z"
    except (FileNotFoundError, IndexError):
        return False


@pytest.mark.skipif(not Path("/proc/self/task").exists(), reason="needs Linux /proc")
def test_the_emulators_stop_when_the_process_that_started_them_is_killed():
    # a benchmark killed with SIGKILL never runs its finally: its emulator process must go anyway
    code = ("import os, time\n"
            "from labpnn.benches import get_bench\n"
            "with get_bench('microwave').emulators():\n"
            "    print(open(f'/proc/self/task/{os.getpid()}/children').read(), flush=True)\n"
            "    time.sleep(60)\n")
    parent = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        children = [int(p) for p in parent.stdout.readline().split()]
        assert children, "no emulator process started"
    finally:
        parent.kill()
        parent.wait(10)
    deadline = time.monotonic() + 20
    while any(_running(pid) for pid in children) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not any(_running(pid) for pid in children), f"emulator process(es) {children} outlived the killed parent"

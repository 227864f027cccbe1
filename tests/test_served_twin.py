"""A fitted twin served as a rig: `labpnn serve --twin TWIN.pt` in its own process, seen by a
`RigClient` over a real socket — labelled in describe() and in every batch's meta, the repeat noise
it measured, controls refused like a rig's, sessions recorded from it marked and refused by
`twin fit` — and `labpnn serve --config` without torch."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from labpnn.config import build_rig, parse_config
from labpnn.drivers.roles import FLAG_REPLAY_APPROX
from labpnn.protocols.errors import BadSetting, InvalidControls
from labpnn.remote.client import RigClient
from labpnn.sessions import RecordingSystem, SessionWriter, open_session
from labpnn.twin.calibrate import calibrate
from labpnn.twin.fit import TwinDataRefused, fit_twin_from_sessions, load_sessions, twin_sources
from labpnn.twin.model import load_twin, save_twin
from labpnn.twin.served import TWIN_LABEL, TwinSystem, is_twin_describe

REPO = Path(__file__).resolve().parents[1]
C, S, NOISE = 8, 32, 0.03  # the test rig: 8 controls -> 32 pixels, additive noise of std 0.03


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    """A twin fitted (briefly) to a calibration session measured on the built-in test rig."""
    root = tmp_path_factory.mktemp("twin")
    rig = build_rig(parse_config({"name": "bench-a", "rig": {"kind": "test", "n_controls": C, "n_outputs": S,
                                                             "noise": NOISE, "seed": 4}})).connect()
    with SessionWriter(root / "cal.h5", rig.describe()) as writer:
        calibrate(rig, 600, writer, repeats=(16, 8), progress=False)
    twin, _ = fit_twin_from_sessions(root / "cal.h5", width=32, epochs=30, max_seconds=3, progress=False)
    save_twin(twin, root / "twin.pt")
    return root, rig.describe()


def _start(*args: str, env: dict | None = None) -> tuple[subprocess.Popen, str, list[str]]:
    proc = subprocess.Popen([sys.executable, "-m", "labpnn.cli", "serve", *args], cwd=REPO, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})})
    lines = []
    for _ in range(5):
        line = proc.stdout.readline()
        lines.append(line)
        if "listening on" in line:
            return proc, line.split("listening on ")[1].split(",")[0].split()[0], lines
    proc.kill()
    raise AssertionError(f"serve did not start: {lines} {proc.stderr.read()}")


def _stop(proc: subprocess.Popen) -> str:
    proc.send_signal(signal.SIGTERM)
    try:
        assert proc.wait(timeout=20) == 0, proc.stderr.read()
    finally:
        proc.kill()
    return proc.stdout.read()


def test_twin_system_in_process_labels_noise_and_limits(fitted):
    root, rig_describe = fitted
    system = TwinSystem(root / "twin.pt", seed=1)
    desc = system.describe()
    assert is_twin_describe(desc) and desc["twin"]["label"] == TWIN_LABEL
    assert desc["name"] == "twin of bench-a" and "not the physics" in desc["instruments"]["twin"]
    assert desc["axis"] == rig_describe["axis"] and desc["limits"] == rig_describe["limits"]
    assert desc["twin"]["rig"]["instruments"] == rig_describe["instruments"]
    assert desc["twin"]["fitted_on"][0]["path"] == str((root / "cal.h5").resolve())
    # the noise model var = a + b max(y, 0) reproduced: 400 repeats of one control vector, 32 pixels
    twin = load_twin(root / "twin.pt")
    twin.meta["noise_model"] = {"a": 4e-4, "b": 2e-3}  # a signal-dependent model, set by hand
    noisy = TwinSystem(twin, seed=2)
    x = np.full((400, C), 0.4, np.float32)
    mean = TwinSystem(twin, noise=False).run(x[:1])[0].astype(np.float64)
    got = noisy.run(x).astype(np.float64)
    want = 4e-4 + 2e-3 * np.maximum(mean, 0)
    # pooled over pixels the ratio has 399 x 32 degrees of freedom: relative std sqrt(2 / 12768) = 1.3 %
    assert np.var(got, axis=0, ddof=1).sum() / want.sum() == pytest.approx(1.0, abs=0.06)
    np.testing.assert_allclose(got.mean(0), mean, atol=4 * np.sqrt(want.max() / 400))
    assert np.array_equal(TwinSystem(twin, seed=2).run(x), got.astype(np.float32))  # seeded
    assert not noisy.describe()["twin"].get("path")  # in memory: no path, no hash


def test_an_older_twin_without_the_rigs_describe_gets_a_pixel_axis(fitted, tmp_path):
    root, _ = fitted
    twin = load_twin(root / "twin.pt")
    del twin.meta["describe"]  # what twins fitted before the describe was recorded hold
    save_twin(twin, tmp_path / "old.pt")
    desc = TwinSystem(tmp_path / "old.pt").describe()
    assert desc["name"] == "twin of bench-a" and desc["limits"] == {"controls": [0.0, 1.0]}
    assert desc["axis"]["values"] == list(range(S)) and desc["axis"]["unit"] == "1"
    assert desc["twin"]["rig_description"].startswith("partial")
    twin.meta = {}  # nothing at all (e.g. fitted from arrays): still a sensible, labelled describe
    desc = TwinSystem(twin, noise=True).describe()
    assert desc["name"] == "twin of rig" and desc["twin"]["noise"]["served"] is False


def test_serve_twin_a_client_sees_the_label_noise_and_refusals(fitted, tmp_path):
    root, _ = fitted
    twin_path = root / "twin.pt"
    proc, address, lines = _start("--twin", str(twin_path), "--bind", "tcp://127.0.0.1:*", "--publish", "",
                                  "--record", str(tmp_path / "rec"))
    assert any("DIGITAL TWIN, not the physics" in line for line in lines), lines
    try:
        with RigClient(address, timeout_s=30) as client:
            desc = client.describe()
            assert desc["name"].startswith("twin of") and desc["twin"]["label"] == TWIN_LABEL
            assert desc["twin"]["path"] == str(twin_path.resolve())
            noise = desc["twin"]["noise"]
            assert noise["served"] and desc["twin"]["noise_var"] == pytest.approx(NOISE**2, rel=0.1)  # the repeats
            x = np.full((256, C), 0.6, np.float32)
            batches = [client.measure(x[i:i + 64]) for i in range(0, 256, 64)]
            for m in batches:  # the label reaches the caller with every batch, every row flagged modelled
                assert m.meta["twin"]["sha256"] == desc["twin"]["sha256"] and m.meta["twin"]["noise"] is True
                assert (m.flags & FLAG_REPLAY_APPROX).all()
            traces = np.concatenate([m.traces for m in batches]).astype(np.float64)
            want = noise["a"] + noise["b"] * np.maximum(load_twin(twin_path).predict(x[:1])[0], 0)
            # 255 x 32 degrees of freedom: relative std of the pooled variance sqrt(2 / 8160) = 1.6 %
            assert np.var(traces, axis=0, ddof=1).sum() / want.sum() == pytest.approx(1.0, abs=0.07)
            for bad in (np.full((2, C), 1.5, np.float32), np.full((2, C), np.nan, np.float32),
                        np.zeros((2, C + 1), np.float32)):
                with pytest.raises(InvalidControls):
                    client.run(bad)
            with pytest.raises(BadSetting):
                client.configure({"twin": {"noise": False}})
            # a client-side record of the twin is marked as well (the describe it stores says twin)
            with SessionWriter(tmp_path / "client.h5", client.describe()) as writer:
                RecordingSystem(client, writer).run(np.full((3, C), 0.2, np.float32))
            assert client.run(x[:2]).shape == (2, S)  # still serving after the refusals
    finally:
        _stop(proc)
    (recorded,) = sorted((tmp_path / "rec").glob("*.h5"))
    for path in (recorded, tmp_path / "client.h5"):
        with open_session(path) as session:
            assert session.describe["twin"]["sha256"] == desc["twin"]["sha256"]
        assert twin_sources(load_sessions(path, tags=None))
    with open_session(recorded) as session:
        assert session.n_rows == 256 + 3 + 2  # refused batches are not rows


def test_twin_fit_refuses_sessions_recorded_from_a_twin(fitted, tmp_path, capsys):
    from labpnn.cli import main

    root, _ = fitted
    twin_system = TwinSystem(root / "twin.pt")
    path = tmp_path / "from-twin.h5"
    with SessionWriter(path, twin_system.describe()) as writer:
        calibrate(twin_system, 60, writer, repeats=(4, 4), progress=False)
    assert main(["twin", "fit", str(path), str(root / "cal.h5"), "-o", str(tmp_path / "t.pt"),
                 "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "refused" in err and "from-twin.h5" in err and "--allow-twin-data" in err
    assert not (tmp_path / "t.pt").exists()
    with pytest.raises(TwinDataRefused, match="not from the physics"):
        fit_twin_from_sessions(path, progress=False)
    # on purpose: allowed, and the new twin says what it was fitted on
    twin, _ = fit_twin_from_sessions(path, allow_twin_data=True, width=16, epochs=2, max_seconds=1, progress=False)
    assert twin.meta["fitted_on_twin_data"] == [str(path.resolve())]
    assert TwinSystem(twin).describe()["twin"]["fitted_on_twin_data"] is True


def test_serve_config_imports_no_torch(tmp_path):
    """`labpnn serve --config` through the real command: torch never enters the process."""
    config = tmp_path / "rig.toml"
    config.write_text('name = "plain"\n[rig]\nkind = "test"\nn_outputs = 16\n')
    code = ("import sys\nfrom labpnn.cli import main\n"
            f"rc = main(['serve', '--config', {str(config)!r}, '--bind', 'tcp://127.0.0.1:*', '--publish', ''])\n"
            "print('torch imported:', sorted(m for m in sys.modules if m == 'torch' or m.startswith('torch.')),"
            " flush=True)\nsys.exit(rc)\n")
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=REPO, text=True, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    line = proc.stdout.readline()
    assert "listening on" in line, (line, proc.stderr.read() if proc.poll() is not None else "")
    address = line.split("listening on ")[1].split(",")[0].split()[0]
    with RigClient(address, timeout_s=10) as client:
        assert "twin" not in client.describe()
        assert client.run(np.full((2, 16), 0.5, np.float32)).shape == (2, 16)
    assert "torch imported: []" in _stop(proc)


def test_serve_twin_and_config_are_exclusive_and_twin_needs_torch(fitted, tmp_path, capsys):
    from labpnn.cli import main

    root, _ = fitted
    with pytest.raises(SystemExit) as exit_:
        main(["serve", "--config", "examples/test-rig.toml", "--twin", str(root / "twin.pt")])
    assert exit_.value.code == 2 and "not allowed with argument" in capsys.readouterr().err
    assert main(["serve", "--config", "examples/test-rig.toml", "--no-noise"]) == 2
    assert "--twin only" in capsys.readouterr().err
    assert main(["serve", "--twin", str(tmp_path / "none.pt")]) == 2
    assert "cannot load the twin" in capsys.readouterr().err
    code = ("import sys\nsys.modules['torch'] = None\nfrom labpnn.cli import main\n"
            f"sys.exit(main(['serve', '--twin', {str(root / 'twin.pt')!r}, '--bind', 'tcp://127.0.0.1:*']))\n")
    no_torch = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert no_torch.returncode == 2 and "--twin needs torch" in no_torch.stderr


def test_a_quantised_twin_reports_the_states_it_applied_and_refuses_outside_the_limits():
    from labpnn.drivers.roles import FLAG_QUANTISED
    from labpnn.protocols.errors import LimitExceeded
    from labpnn.twin.model import Twin

    twin = Twin(4, 6, width=8, levels=2, meta={"noise_var": 1e-4, "describe": {
        "name": "surface", "n_controls": 4, "n_outputs": 6, "limits": {"controls": [0.0, 0.9]}}})
    system = TwinSystem(twin)
    m = system.measure(np.array([[0.3, 0.7, 0.0, 0.9], [0.0, 0.0, 0.0, 0.0]], np.float32))
    np.testing.assert_array_equal(m.applied, [[0, 1, 0, 1], [0, 0, 0, 0]])
    assert m.flags.tolist() == [FLAG_REPLAY_APPROX | FLAG_QUANTISED, FLAG_REPLAY_APPROX]
    with pytest.raises(LimitExceeded, match=r"\[0.0, 0.9\]"):
        system.run(np.full((1, 4), 0.95, np.float32))

"""The names users type: ``import labpnn`` (lazy, torch-free), ``python -m labpnn``, the console script."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=REPO)


def test_import_labpnn_leaves_torch_out_while_the_rig_side_resolves():
    got = python("import sys, labpnn\n"
                 "names = [labpnn.RigClient, labpnn.Rig, labpnn.PhysicalSystem, labpnn.Measurement, labpnn.ReplayRig,"
                 " labpnn.SessionWriter, labpnn.open_session, labpnn.RecordingSystem, labpnn.DeviceServer]\n"
                 "print([n.__module__ for n in names]); print('torch' in sys.modules)")
    assert got.returncode == 0, got.stderr
    modules, torch_loaded = got.stdout.splitlines()
    assert "labpnn.remote.client" in modules and "labpnn.sessions.replay" in modules
    assert torch_loaded == "False"


def test_training_names_resolve_with_the_extra():
    import labpnn

    assert labpnn.train.__module__ == "labpnn.training.trainer"
    assert labpnn.fit_twin_from_sessions.__module__ == "labpnn.twin.fit"
    assert labpnn.load_twin.__module__ == "labpnn.twin.model"
    assert labpnn.PhysicalNetwork.__name__ == "PhysicalNetwork"
    assert {"RigClient", "train", "PhysicalNetwork"} <= set(dir(labpnn))
    with pytest.raises(AttributeError, match="no attribute 'nonsense'"):
        labpnn.nonsense  # noqa: B018


def test_a_training_name_without_torch_says_how_to_install_it():
    # sys.modules["torch"] = None makes `import torch` fail as on an install without the extra
    got = python("import sys\nsys.modules['torch'] = None\nimport labpnn\nprint(labpnn.RigClient.__name__)\n"
                 "try:\n    labpnn.train\nexcept ImportError as exc:\n    print('ImportError:', exc)\n")
    assert got.returncode == 0, got.stderr
    lines = got.stdout.splitlines()
    assert lines[0] == "RigClient"
    assert lines[1].startswith("ImportError: labpnn.train needs the training extra") and "labpnn[train]" in lines[1]


def test_python_dash_m_labpnn_is_the_labpnn_command():
    script = Path(sys.executable).with_name("labpnn")
    via_module = subprocess.run([sys.executable, "-m", "labpnn", "--help"], capture_output=True, text=True, timeout=60)
    via_script = subprocess.run([str(script), "--help"], capture_output=True, text=True, timeout=60)
    assert via_module.returncode == via_script.returncode == 0
    assert via_module.stdout == via_script.stdout
    for command in ("serve", "sim", "calibrate", "train", "demo", "replay"):
        assert f"\n  {command} " in via_module.stdout
    bad = subprocess.run([sys.executable, "-m", "labpnn", "no-such-command"], capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "unknown command" in bad.stderr

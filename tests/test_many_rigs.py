"""Data-parallel training over several rigs (`labpnn.training.parallel`) under a real
``torchrun --standalone``: two simulated optical rigs from different copy seeds, each behind its own
device server in its own process (`labpnn sim optical --serve`), one training process per rig."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import torch

from labpnn.benches.optical import ServedCopy
from labpnn.sessions import open_session
from labpnn.training.checkpoint import load_checkpoint, twin_path

pytestmark = pytest.mark.slow

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
#: small enough to run in CI: a short calibration and twin fit per rig, vowels (154 training rows)
QUICK = ["--calibration-rows", "400", "--calibration-budget", "400", "--twin-seconds", "5", "--quiet",
         "--rig-timeout", "3"]


@pytest.fixture
def two_rigs():
    rigs = [ServedCopy(0), ServedCopy(1)]
    yield rigs
    for rig in rigs:
        rig.kill()


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def test_two_rigs_train_as_one_network(two_rigs, tmp_path):
    a, b = two_rigs
    cmd = [*TORCHRUN, "-m", "labpnn", "train", "--rig", a.address, "--rig", b.address, "--epochs", "2",
           "--session", str(tmp_path / "run.h5"), "--report", str(tmp_path / "report"), *QUICK]
    done = subprocess.run(cmd, capture_output=True, text=True, env=_env(), timeout=600, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads(done.stdout)  # rank 0 alone prints it
    rigs = summary["rigs"]
    assert [r["rig"] for r in rigs] == [a.address, b.address] and [r["rank"] for r in rigs] == [0, 1]
    # the parameters are the same on both ranks after every step
    steps = 2 * -(-154 // 16)
    assert len(rigs[0]["digests"]) == steps and rigs[0]["digests"] == rigs[1]["digests"]
    # each rig measured its own share of every minibatch: together, every training row once per epoch
    shares = []
    for rank in (0, 1):
        with open_session(tmp_path / f"run.rank{rank}.h5") as s:
            rows = [len(batch.controls) for batch in s.batches("train")]
        shares.append(rows)
        assert sum(rows) == rigs[rank]["passes"]["train"]
    assert len(shares[0]) == len(shares[1]) == steps
    for r0, r1 in zip(*shares, strict=True):
        assert r0 + r1 in (16, 154 % 16) and r0 - r1 in (0, 1)
    # accuracy on the physics measured on every rig; the run is judged on the worst
    accs = [r["test_accuracy"] for r in rigs]
    assert summary["test_accuracy"] == min(accs) and all(0 <= x <= 1 for x in accs)
    assert all(r["passes"]["test"] == 52 and r["passes"]["validation"] == 2 * 52 for r in rigs)
    report = json.loads((tmp_path / "report" / "report.json").read_text())
    assert [r["test_accuracy"] for r in report["rigs"]] == accs


def test_a_failed_rig_stops_every_rank_and_the_survivor_resumes(two_rigs, tmp_path):
    a, b = two_rigs
    ck = tmp_path / "ck.pt"
    cmd = [*TORCHRUN, "-m", "labpnn", "train", "--rig", a.address, "--rig", b.address, "--epochs", "40",
           "--session", str(tmp_path / "run.h5"), "--checkpoint", str(ck), *QUICK]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env(), cwd=tmp_path)
    err: list[str] = []
    killed = threading.Event()
    killed_at = []

    def read():
        for line in proc.stderr:
            err.append(line)
            if not killed.is_set() and "validation accuracy" in line:  # training is under way: pull the plug
                b.kill()
                killed_at.append(time.monotonic())
                killed.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        proc.wait(timeout=600)
    finally:
        if proc.poll() is None:
            proc.kill()
    reader.join(10)
    text = "".join(err)
    assert killed.is_set(), text[-3000:]
    stopped_after = time.monotonic() - killed_at[0]
    assert stopped_after < 60, stopped_after  # both ranks out within a minute of the rig's death
    assert proc.returncode != 0
    for rank in (0, 1):  # each rank says why it stopped, no traceback
        assert re.search(rf"labpnn train: rank {rank}: stopped: .*rig of rank.* failed", text), text[-3000:]
    # the checkpoint and every rig's twin were written; the sessions keep every row measured
    state = load_checkpoint(ck)
    assert state["epoch"] >= 1
    assert twin_path(ck, a.address).exists() and twin_path(ck, b.address).exists()
    for rank in (0, 1):
        with open_session(tmp_path / f"run.rank{rank}.h5") as s:
            assert len(s.select("train")) > 0 and any(e["kind"] == "stopped" for e in s.events)
    # resume on the rig that is left, alone: mid-epoch, with that rig's own twin, to the end
    resumed = subprocess.run([sys.executable, "-m", "labpnn", "train", "--rig", a.address, "--resume", str(ck),
                              "--epochs", str(state["epoch"] + 1), "--session", str(tmp_path / "resumed.h5"),
                              *QUICK], capture_output=True, text=True, env=_env(), timeout=600, cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    out = json.loads(resumed.stdout)
    assert out["rigs"] is None and 0 <= out["test_accuracy"] <= 1
    with open_session(tmp_path / "resumed.h5") as s:
        kinds = [e["kind"] for e in s.events]
        assert "resume" in kinds and "twin_fit" not in kinds  # no new calibration: rig a's twin was reused
        assert len(s.select("calibration")) == 0
    left = sum(min(16, 154 - 16 * k) for k in range(state["step"], -(-154 // 16)))  # the stopped epoch's rest
    assert out["passes"]["train"] - state["passes"]["train"] == left


def test_more_rigs_than_processes_is_a_clear_error(tmp_path):
    done = subprocess.run([sys.executable, "-m", "labpnn", "train", "--rig", "tcp://127.0.0.1:1", "--rig",
                           "tcp://127.0.0.1:2"], capture_output=True, text=True, env=_env(), timeout=120)
    assert done.returncode == 2 and "torchrun --nproc-per-node 2" in done.stderr


def test_parameter_digest_tells_parameters_apart():
    from labpnn.training.parallel import parameter_digest

    p = [torch.zeros(3), torch.ones(2)]
    same = [t.clone() for t in p]
    assert parameter_digest(p) == parameter_digest(same)
    same[1][0] = float(np.nextafter(np.float32(1), np.float32(2)))  # one ulp
    assert parameter_digest(p) != parameter_digest(same)

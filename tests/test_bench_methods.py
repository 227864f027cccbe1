"""The methods table's goal verdicts (scripts/bench_methods.py): pure functions on recorded runs."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "bench_methods.py"


@pytest.fixture(scope="module")
def bench_methods():
    spec = importlib.util.spec_from_file_location("bench_methods", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_verdict_uses_two_standard_errors(bench_methods):
    v = bench_methods.verdict
    assert v(0.97, 0.005, 5, 0.95) == "met"  # 0.96 >= 0.95
    assert v(0.97, 0.02, 5, 0.95) == "undecided (within 2 s.e.)"  # 0.93 .. 1.01
    assert v(0.90, 0.02, 5, 0.95) == "MISSED"  # 0.94 < 0.95
    assert v(0.96, float("nan"), 1, 0.95).startswith("met (n=1")
    assert v(float("nan"), float("nan"), 0, 0.95) == "not measured"


def run(bench, method, depth, split, acc):
    return {"bench": bench, "method": method, "depth": depth, "split": split, "test_acc": acc,
            "passes": {"calibration": 100, "train": 1000}}


def test_goals_are_judged_on_paired_splits(bench_methods):
    runs = []
    for s, (pat, phyll, zeros, res) in enumerate([(0.96, 0.95, 0.50, 0.40), (0.98, 0.96, 0.52, 0.42),
                                                  (0.97, 0.97, 0.49, 0.41)]):
        runs += [run("microwave", "pat", 1, s, pat), run("microwave", "phyll", 1, s, phyll),
                 run("microwave", "phyll-zeros", 1, s, zeros), run("microwave", "reservoir", None, s, res),
                 run("microwave", "reservoir-ridge", None, s, res)]
    runs.append(run("microwave", "pat", 2, 0, 0.5))  # a depth with one split, not paired with PhyLL
    lines = "\n".join(bench_methods.judge_goals(runs, [1, 2]))
    assert "PAT ≥ 93% on the microwave bench at depth 1: 97.0 ± 0.6 (n=3) -> met" in lines
    assert "microwave bench at depth 2: 50.0 (n=1) -> missed (n=1: no s.e.)" in lines
    # PhyLL - PAT = -1, -2, 0 points: mean -1.0 +- 0.6, so within 3 points
    assert ("PhyLL within 3 points of PAT (no more than 3 below) on the microwave bench at depth 1: "
            "PhyLL − PAT -1.0 ± 0.6 (n=3)") in lines
    assert "on the microwave bench at depth 1" in lines and "-> met" in lines
    assert "PhyLL measurably above PhyLL without the physics on at least one bench: met: microwave phyll d1" in lines
    assert "optical bench at depth 1: – -> not measured" in lines
    # PAT and PhyLL at depth 1 clear their floors; PAT at depth 2 (one split) cannot be shown to
    assert "2 of 3 cells shown above it; not shown: microwave pat d2 − reservoir +10.0 (n=1)" in lines


@pytest.mark.slow
def test_quick_table_end_to_end(tmp_path):
    """`--quick` (what a lab runs first): every listed method trains on the simulated optical bench,
    the passes add up, and the table, its goals and the plot are written."""
    import json
    import subprocess
    import sys

    out = tmp_path / "quick"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--out", str(out)], capture_output=True,
                          text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs = {r["method"]: r for r in map(json.loads, (out / "runs_optical.jsonl").read_text().splitlines())}
    assert set(runs) == {"insilico", "pat", "phyll", "phyll-zeros", "reservoir", "logistic"}
    assert not [m for m, r in runs.items() if "error" in r]
    train_rows = 154  # the vowels' training split
    # PhyLL: two forward passes per block per training sample per epoch, never a calibration
    assert runs["phyll"]["passes"]["train"] == 2 * train_rows * runs["phyll"]["epochs"]
    assert runs["phyll"]["passes"]["calibration"] == 0
    assert sum(runs["phyll-zeros"]["passes"].values()) == 0  # its physics is replaced by zeros
    # PAT and in-silico share one calibration; in-silico trains without the physics
    assert runs["pat"]["passes"]["calibration"] == runs["insilico"]["passes"]["calibration"] > 0
    assert runs["insilico"]["passes"]["train"] == 0 < runs["pat"]["passes"]["train"]
    table = (out / "table.md").read_text()
    assert "Goals (each judged" in table and "| optical | phyll-zeros | digital | 1 |" in table
    assert (out / "accuracy_vs_passes.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

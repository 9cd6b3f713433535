"""python -m pretraining.study.ablations --smoke: the whole ablation pipeline at a toy size (the result means nothing)."""

import csv
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_smoke_ablation_trains_every_arm_equally_probes_and_prints_the_last_line(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-m", "pretraining.study.ablations", "--smoke", "--output",
                           str(tmp_path), "--jobs", "2"], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    last = done.stdout.strip().splitlines()[-1]
    assert re.fullmatch(r"c2fmae_minus_mae=-?[\d.]+ cascade_minus_parallel_matched=-?[\d.]+ "
                        r"progressive_minus_random=-?[\d.]+", last), last
    rows = list(csv.DictReader(open(tmp_path / "runs.csv")))
    arms = {r["arm"] for r in rows}
    assert arms == {"random_init", "mae", "c2fmae", "cascade_random", "parallel_matched"}
    assert {r["steps"] for r in rows if r["arm"] != "random_init"} == {"2"}  # equal optimizer steps per arm
    assert {r["seed"] for r in rows} == {"0", "1"}
    for r in rows:
        assert 0 <= float(r["linear"]) <= 100 and 0 <= float(r["miou"]) <= 100
        assert 0 < float(r["attn_objects"]) < 100
    assert (tmp_path / "summary.csv").exists() and (tmp_path / "ablations.png").stat().st_size > 10_000
    assert "D1    c2fmae > mae" in done.stdout  # the directions table

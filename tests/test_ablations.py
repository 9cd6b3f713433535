"""The ablation study: its validity gate, last line, pieces merged from separate runs, and a tiny
end-to-end run (python -m pretraining.study.ablations --smoke; the result means nothing)."""

import csv
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from pretraining.study import ablations
from pretraining.study.tables import last_line, print_tables

ROOT = Path(__file__).resolve().parents[1]
LAST_LINE = re.compile(r"validity=(-?[\d.]+|nan) c2fmae_minus_mae=(-?[\d.]+|nan) "
                       r"cascade_minus_parallel_matched=(-?[\d.]+|nan) instance_minus_constant=(-?[\d.]+|nan)")


def _row(arm: str, seed: int, linear: float, **extra) -> dict:
    metrics = dict(linear=linear, knn=linear, finetune=linear, texture_miou=20.0, linear_shape=30.0, miou=15.0,
                   attn_objects=30.0)
    return {"arm": arm, "seed": seed, "labels": "clean", "steps": 0 if arm == "random_init" else 8, "lr": 1e-3,
            "lr_source": "sweep", "train_cpu_s": 1.0, "cpu_s": 2.0, **metrics, **extra}


def _rows(gap: float) -> list[dict]:
    """Five seeds where MAE beats random init by `gap` points and C2FMAE beats MAE by 2."""
    rows = []
    for s in range(5):
        wobble = 0.3 * (s - 2)
        rows += [_row("random_init", s, 30 + wobble, instance_loss=0.7, instance_constant=0.7),
                 _row("mae", s, 30 + gap + wobble),
                 _row("c2fmae", s, 32 + gap + wobble, instance_loss=0.5, instance_constant=0.6),
                 _row("parallel_matched", s, 31 + gap, instance_loss=0.55, instance_constant=0.6)]
    return rows


def test_the_gate_says_cannot_rank_and_tests_no_direction_when_mae_barely_beats_random_init():
    lines = print_tables(_rows(gap=4.0))
    assert any(line.startswith("cannot rank") for line in lines)
    assert not any(line.startswith("D1 ") for line in lines)
    passed = print_tables(_rows(gap=12.0))
    assert not any(line.startswith("cannot rank") for line in passed)
    d1 = next(line for line in passed if line.startswith("D1 "))
    assert d1.endswith("holds") and "2.0" in d1  # C2FMAE - MAE = 2 points in every seed


def test_last_line_carries_the_four_figures():
    line = last_line(_rows(gap=12.0))
    match = LAST_LINE.fullmatch(line)
    assert match, line
    validity, c2f_mae, cascade, instance = (float(x) for x in match.groups())
    assert validity == pytest.approx(12.0) and c2f_mae == pytest.approx(2.0)
    assert cascade == pytest.approx(1.0) and instance == pytest.approx(0.1)  # the constant's loss minus the head's


def test_set_resizes_the_scale_names_it_after_the_changes_and_refuses_unknown_or_mistyped_fields(capsys):
    from pretraining.study.arms import QUICK, resize

    sized = resize(QUICK, ["epochs=27", "lr=1", "target_radius=(0.4, 0.5)"])
    assert (sized.epochs, sized.lr, sized.target_radius, sized.img_size) == (27, 1.0, (0.4, 0.5), QUICK.img_size)
    assert sized.name == "quick+epochs=27+lr=1+target_radius=0.4,0.5"  # its own default output folder
    assert resize(QUICK, []) is QUICK
    for bad in ("epoch=27", "epochs=2.5", "epochs"):
        with pytest.raises(ValueError, match="--set"):
            resize(QUICK, [bad])
    assert ablations.main(["--smoke", "--report", "--set", "epochs=2.5"]) == 2
    assert "epochs takes int" in capsys.readouterr().err


def test_pieces_run_separately_are_reused_and_merged_by_report(tmp_path, capsys):
    for row in _rows(gap=12.0):  # finished pieces, as separate processes (or machines) leave them
        folder = tmp_path / "runs" / f"{row['arm']}-s{row['seed']}"
        folder.mkdir(parents=True)
        (folder / "result.json").write_text(json.dumps(row))
    kept = ablations.run_one("mae", 0, ablations.SCALES["smoke"], {}, str(tmp_path / "runs" / "mae-s0"), 1e-3, "sweep")
    assert kept["reused"] and kept["linear"] == _rows(12.0)[1]["linear"]  # no training: the row came back
    assert ablations.main(["--smoke", "--report", "--output", str(tmp_path),
                           "--arms", "random_init", "mae", "c2fmae", "parallel_matched"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert LAST_LINE.fullmatch(out[-1]) and out[-1].startswith("validity=12.00 c2fmae_minus_mae=2.00")
    assert not any("incomplete" in line for line in out)
    rows = list(csv.DictReader(open(tmp_path / "runs.csv")))
    assert len(rows) == 20 and {r["seed"] for r in rows} == {str(s) for s in range(5)}
    assert ablations.main(["--smoke", "--report", "--output", str(tmp_path), "--seeds", "6",
                           "--arms", "random_init", "mae"]) == 0
    assert any(line.startswith("incomplete: 2 runs missing") for line in capsys.readouterr().out.splitlines())
    assert ablations.main(["--smoke", "--report", "--output", str(tmp_path / "empty")]) == 1


@pytest.mark.slow
def test_smoke_study_sweeps_lr_trains_every_arm_equally_probes_and_prints_the_last_line(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    base = [sys.executable, "-m", "pretraining.study.ablations", "--smoke", "--output", str(tmp_path), "--jobs", "2"]
    arms = ["--arms", "random_init", "mae", "c2fmae", "parallel_matched"]
    swept = subprocess.run([*base, "--sweep-lr", "--arms", "mae"], env=env, capture_output=True, text=True,
                           timeout=600)
    assert swept.returncode == 0, swept.stderr
    choice = json.loads((tmp_path / "lr.json").read_text())["mae"]
    assert choice["lr"] in (1e-3, 2e-3) and set(choice["linear_by_lr"]) == {"0.001", "0.002"}
    done = subprocess.run([*base, *arms], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.strip().splitlines()
    assert LAST_LINE.fullmatch(lines[-1]), lines[-1]
    assert any(line.startswith("validity: mae - random_init") for line in lines)
    rows = list(csv.DictReader(open(tmp_path / "runs.csv")))
    assert {r["arm"] for r in rows} == {"random_init", "mae", "c2fmae", "parallel_matched"}
    assert {r["steps"] for r in rows if r["arm"] != "random_init"} == {"2"}  # equal optimizer steps per arm
    assert {r["seed"] for r in rows} == {"0", "1"}
    assert {float(r["lr"]) for r in rows if r["arm"] == "mae"} == {choice["lr"]}  # the sweep's choice is used
    assert {r["lr_source"] for r in rows if r["arm"] == "c2fmae"} == {"default"}
    for r in rows:
        for metric in ("linear", "knn", "finetune", "texture_miou", "linear_shape", "miou"):
            assert 0 <= float(r[metric]) <= 100, (metric, r[metric])
        assert 0 < float(r["attn_objects"]) < 100
        if r["arm"] != "mae":  # every model with an instance head scores it against the constant predictor
            assert math.isfinite(float(r["instance_loss"])) and float(r["instance_constant"]) > 0
    assert (tmp_path / "summary.csv").exists() and (tmp_path / "ablations.png").stat().st_size > 10_000

"""Two-process DDP on CPU (gloo, launched by torchrun as users do) against one process reaching the same
global batch by accumulation: the same recipe, the same split-independent global batch and learning rate."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import pytest

from dataset_card.synthetic.shapes import write_synthetic_dataset

ROOT = Path(__file__).resolve().parents[1]
# The default masking (progressive curriculum, per-sample Dirichlet splits): ranks mask different
# numbers of patches, and the per-sample loss reduction keeps the mean of rank means the global mean.
# The two runs agree to float rounding (1e-7 at the first step); Adam amplifies that rounding in
# proportion to the learning rate, so the test trains at a tenth of the tiny recipe's.
COMMON = ("epochs=2", "log_samples=true", "checkpoint_every=1000", "figure_every=0", "log_every=4", "optim.lr=2e-4",
          "global_batch=8", "data.batch_size=4")


def _train_args(data: str, output: Path, *sets: str) -> list[str]:
    return ["-m", "pretraining.train", "--data", data, "--config", "tiny", "--output", str(output), "--no-progress",
            *[arg for s in (*COMMON, *sets) for arg in ("--set", s)]]


def _steps(run: Path, rank: int) -> dict[int, list[dict]]:
    """Optimizer step -> its micro-steps' lines in RUN/samples-rankR.jsonl."""
    out: dict[int, list[dict]] = defaultdict(list)
    for record in map(json.loads, (run / f"samples-rank{rank}.jsonl").read_text().splitlines()):
        out[record["optimizer_step"]].append(record)
    return dict(out)


@pytest.mark.slow
def test_ddp_two_ranks_equal_one_process_accumulating_the_same_global_batch(tmp_path):
    data = str(tmp_path / "shapes")
    write_synthetic_dataset(data, num_images=64, num_shards=8, size=(64, 64), seed=2)  # 8 row groups of 8
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    ddp, single = tmp_path / "ddp", tmp_path / "single"
    # Global batch 8 at most 4 per process: 2 ranks x 4, or 1 rank x 4 x 2 accumulation steps. 2 ranks x 0
    # workers and 1 rank x 2 workers split the data into the same 2 streams, so each optimizer step sees the
    # same 8 samples.
    launched = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                               *_train_args(data, ddp, "data.num_workers=0")],
                              env=env, capture_output=True, text=True, timeout=600)
    assert launched.returncode == 0, launched.stderr[-3000:]
    alone = subprocess.run([sys.executable, *_train_args(data, single, "data.num_workers=2")],
                           env=env, capture_output=True, text=True, timeout=600)
    assert alone.returncode == 0, alone.stderr[-3000:]
    assert "global batch     8 = 4 per process x 2 processes x 1 accumulation step\n" in launched.stdout
    assert "global batch     8 = 4 per process x 1 process x 2 accumulation steps\n" in alone.stdout
    assert launched.stdout.count("peak lr          0.0002 (optim.lr, fixed)") == 1  # rank 0 alone prints
    runs = [json.loads((run / "run.json").read_text()) for run in (ddp, single)]
    assert [(r["world_size"], r["global_batch"], r["per_gpu_batch"], r["accum_steps"], r["lr"]) for r in runs] == [
        (2, 8, 4, 1, 2e-4), (1, 8, 4, 2, 2e-4)]

    summary = json.loads((ddp / "summary.json").read_text())
    assert summary["global_step"] == 16 and len(summary["param_sha256"]) == 2
    assert summary["param_sha256"][0] == summary["param_sha256"][1]  # identical parameters on both ranks
    assert json.loads((single / "summary.json").read_text())["global_step"] == 16

    ranks = [_steps(ddp, 0), _steps(ddp, 1)]
    assert ranks[0].keys() == ranks[1].keys() == set(range(1, 17))
    seen = defaultdict(lambda: [set(), set()])
    for rank, steps in enumerate(ranks):
        for (record,) in steps.values():
            seen[record["epoch"]][rank] |= set(record["index"])
    for epoch, (a, b) in seen.items():
        assert not a & b and a | b == set(range(64)), f"epoch {epoch}"

    one = _steps(single, 0)
    assert one.keys() == ranks[0].keys()
    for step, micro in one.items():
        assert len(micro) == 2
        (r0,), (r1,) = ranks[0][step], ranks[1][step]
        assert sorted(i for m in micro for i in m["index"]) == sorted(r0["index"] + r1["index"])
        for term, value in r0["loss"].items():
            assert value == r1["loss"][term]  # all-reduced: the same on every rank
            assert abs((micro[0]["loss"][term] + micro[1]["loss"][term]) / 2 - value) < 1e-5, f"{step} {term}"

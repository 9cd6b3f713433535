"""Two-process DDP on CPU (gloo, launched by torchrun as users do) against one process at twice the batch."""

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
COMMON = ("epochs=2", "log_samples=true", "checkpoint_every=1000", "figure_every=0", "log_every=4", "optim.lr=2e-4")


def _train_args(data: str, output: Path, *sets: str) -> list[str]:
    return ["-m", "pretraining.train", "--data", data, "--config", "tiny", "--output", str(output), "--no-progress",
            *[arg for s in (*COMMON, *sets) for arg in ("--set", s)]]


def _steps(run: Path, rank: int) -> dict[tuple[int, int], dict]:
    lines = (run / f"samples-rank{rank}.jsonl").read_text().splitlines()
    return {(r["epoch"], r["step"]): r for r in map(json.loads, lines)}


@pytest.mark.slow
def test_ddp_two_ranks_equal_one_process_at_twice_the_batch(tmp_path):
    data = str(tmp_path / "shapes")
    write_synthetic_dataset(data, num_images=64, num_shards=8, size=(64, 64), seed=2)  # 8 row groups of 8
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    ddp, single = tmp_path / "ddp", tmp_path / "single"
    # 2 ranks x 0 workers x batch 4 and 1 rank x 2 workers x batch 8 split the data into the same 2 streams.
    launched = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                               *_train_args(data, ddp, "data.batch_size=4", "data.num_workers=0")],
                              env=env, capture_output=True, text=True, timeout=600)
    assert launched.returncode == 0, launched.stderr[-3000:]
    alone = subprocess.run([sys.executable, *_train_args(data, single, "data.batch_size=8", "data.num_workers=2")],
                           env=env, capture_output=True, text=True, timeout=600)
    assert alone.returncode == 0, alone.stderr[-3000:]

    summary = json.loads((ddp / "summary.json").read_text())
    assert summary["global_step"] == 16 and len(summary["param_sha256"]) == 2
    assert summary["param_sha256"][0] == summary["param_sha256"][1]  # identical parameters on both ranks

    ranks = [_steps(ddp, 0), _steps(ddp, 1)]
    assert ranks[0].keys() == ranks[1].keys()
    seen = defaultdict(lambda: [set(), set()])
    for rank, steps in enumerate(ranks):
        for (epoch, _), record in steps.items():
            seen[epoch][rank] |= set(record["index"])
    for epoch, (a, b) in seen.items():
        assert not a & b and a | b == set(range(64)), f"epoch {epoch}"

    one = _steps(single, 0)
    assert one.keys() == ranks[0].keys()
    for key, record in one.items():
        assert set(record["index"]) == set(ranks[0][key]["index"]) | set(ranks[1][key]["index"])
        for term, value in record["loss"].items():
            assert ranks[0][key]["loss"][term] == ranks[1][key]["loss"][term]  # all-reduced: the same on every rank
            assert abs(value - ranks[0][key]["loss"][term]) < 1e-5, f"{key} {term}"

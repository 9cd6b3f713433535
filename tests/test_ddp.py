"""Two-process DDP on CPU (gloo, launched by torchrun as users do) against one process reaching the same
global batch by accumulation: the same recipe, the same split-independent global batch and learning rate."""

from __future__ import annotations

import json
import os
import shutil
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
COMMON = ("epochs=2", "log_samples=true", "checkpoint_every=3", "keep_checkpoints=10", "figure_every=0", "log_every=4",
          "optim.lr=2e-4", "global_batch=8", "data.batch_size=4")


def _train_args(data: str, output: Path, *sets: str) -> list[str]:
    return ["-m", "pretraining.train", "--data", data, "--config", "tiny", "--output", str(output), "--no-progress",
            *[arg for s in (*COMMON, *sets) for arg in ("--set", s)]]


def _steps(run: Path, rank: int) -> dict[int, list[dict]]:
    """Optimizer step -> its micro-steps' lines in RUN/samples-rankR.jsonl."""
    out: dict[int, list[dict]] = defaultdict(list)
    for record in map(json.loads, (run / f"samples-rank{rank}.jsonl").read_text().splitlines()):
        out[record["optimizer_step"]].append(record)
    return dict(out)


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory) -> tuple[str, Path, dict, subprocess.CompletedProcess]:
    """(data, run folder, environment, the launch): the tiny recipe on 2 ranks (torchrun, gloo), 2 epochs of 8
    optimizer steps, a checkpoint every 3 steps."""
    root = tmp_path_factory.mktemp("ddp")
    data = str(root / "shapes")
    write_synthetic_dataset(data, num_images=64, num_shards=8, size=(64, 64), seed=2)  # 8 row groups of 8
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    launched = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                               *_train_args(data, root / "ddp", "data.num_workers=0")],
                              env=env, capture_output=True, text=True, timeout=600)
    assert launched.returncode == 0, launched.stderr[-3000:]
    return data, root / "ddp", env, launched


@pytest.mark.slow
def test_ddp_two_ranks_equal_one_process_accumulating_the_same_global_batch(ddp_run, tmp_path):
    data, ddp, env, launched = ddp_run
    single = tmp_path / "single"
    # Global batch 8 at most 4 per process: 2 ranks x 4, or 1 rank x 4 x 2 accumulation steps. 2 ranks x 0
    # workers and 1 rank x 2 workers split the data into the same 2 streams, so each optimizer step sees the
    # same 8 samples.
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


# Another allocation at the same global batch ---------------------------------------------------------------


def _optimizer_steps(root: str, layout, start: tuple[int, int] = (0, 0), epoch_layout=None, epochs: int = 1) -> dict:
    """(epoch, optimizer step) -> sorted sample indices over every rank of `layout` (a Layout; 0 workers
    = the stream in the process), from micro-step `start` on."""
    from pretraining.data.augment import AugmentConfig
    from pretraining.data.loader import DataConfig, PretrainingLoader, SampleSpec, open_labeled_dataset
    from pretraining.models.masking import MaskingConfig

    spec = SampleSpec(img_size=32, patch_size=8, modalities=("semantic", "instance", "rgb"),
                      masking=MaskingConfig(num_visible=12, num_positions=16), augment=AugmentConfig(),
                      ignore_value=255, seed=3, epochs=epochs)
    data = DataConfig(batch_size=layout.batch_size, num_workers=0 if layout.workers == 1 else layout.workers,
                      shuffle_buffer=16)
    out: dict = defaultdict(list)
    for rank in range(layout.world_size):
        for batch in PretrainingLoader(open_labeled_dataset(root), spec, data, rank, layout.world_size, start,
                                       layout.accum, epoch_layout=epoch_layout):
            out[batch.epoch, batch.step // layout.accum] += [int(i) for c in batch.chunks for i in c["index"]]
    return {k: sorted(v) for k, v in out.items()}


@pytest.mark.usefixtures("one_thread")
def test_an_epoch_resumed_on_another_split_of_the_global_batch_takes_the_samples_it_would_have(tmp_path):
    """An epoch dealt over 2 ranks x 4 samples (2 streams), resumed after optimizer step 3 on 1 rank x 4 x 2
    accumulation steps, 1 rank x 8 or 4 ranks x 1 x 2: the epoch's remaining optimizer steps take the same
    samples, none repeated or skipped; the next epoch is dealt over the new streams and covers the data once."""
    from pretraining.data.loader import Layout, sources

    root = str(tmp_path / "shapes")
    write_synthetic_dataset(root, num_images=64, num_shards=8, size=(40, 48), seed=1)
    trained = Layout(world_size=2, workers=1, batch_size=4, accum=1)
    whole = _optimizer_steps(root, trained)
    assert len(whole) == 8 and all(len(v) == 8 for v in whole.values())
    for n, layout in enumerate((Layout(1, 1, 4, 2), Layout(1, 1, 8, 1), Layout(4, 1, 1, 2))):
        resumed = _optimizer_steps(root, layout, (0, 3 * layout.accum), trained, epochs=2 if n == 0 else 1)
        assert sorted(k for k in resumed if k[0] == 0) == [(0, j) for j in range(3, 8)]
        for j in range(3, 8):
            assert resumed[0, j] == whole[0, j], (layout, j)
        if n == 0:
            assert sorted(i for k, v in resumed.items() if k[0] == 1 for i in v) == list(range(64))
    # With the same layout the pieces are each worker's own stream; otherwise the canonical order is cut anew.
    assert sources(trained, trained, 1, 0, 0) == [(1, 0, 4)]
    assert [sources(trained, Layout(1, 2, 4, 2), 0, w, m) for m in (0, 1) for w in (0, 1)] == [
        [(0, 0, 2)], [(0, 2, 2)], [(1, 0, 2)], [(1, 2, 2)]]
    assert sources(Layout(1, 2, 4, 2), trained, 1, 0, 0) == [(0, 2, 2), (1, 2, 2)]


@pytest.mark.slow
def test_a_two_rank_run_resumes_on_one_rank_accumulating_and_finishes_its_epochs(ddp_run, tmp_path):
    """The 2-rank run stopped after optimizer step 3 (mid epoch 0), resumed on 1 process at 4 x 2: the rest of
    epoch 0 takes, step by step, the uninterrupted run's samples (its losses to float rounding); epoch 1 is
    dealt over the one process's stream; across the resume each epoch sees every row exactly once."""
    data, ddp, env, _ = ddp_run
    run = tmp_path / "run"
    shutil.copytree(ddp, run)
    (run / "summary.json").unlink()
    for path in sorted((run / "checkpoints").glob("step-*.pt"))[1:]:  # as if the allocation was lost after step 3
        path.unlink()
    resumed = subprocess.run([sys.executable, *_train_args(data, run, "data.num_workers=0")],
                             env=env, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "global batch     8 = 4 per process x 1 process x 2 accumulation steps\n" in resumed.stdout
    assert "resuming on 1 processes (4 per process x 2 accumulation steps; the run trained on 2, 4 x 1)" in resumed.stderr
    assert "done: 16 optimizer steps" in resumed.stdout
    info = json.loads((run / "run.json").read_text())
    assert (info["world_size"], info["per_gpu_batch"], info["accum_steps"]) == (1, 4, 2)
    assert info["allocations"] == [{"step": 0, "world_size": 2, "per_gpu_batch": 4, "accum_steps": 1},
                                   {"step": 3, "world_size": 1, "per_gpu_batch": 4, "accum_steps": 2}]

    before, after = [_steps(run, 0), _steps(run, 1)], _steps(run, 0)
    assert sorted(before[1]) == [1, 2, 3]  # the lost rank's log ends at the checkpoint resumed from
    assert sorted(after) == list(range(1, 17)) and all(len(after[k]) == 2 for k in range(4, 17))
    reference = [_steps(ddp, 0), _steps(ddp, 1)]
    seen: dict[int, list[int]] = defaultdict(list)
    for step in range(1, 17):
        records = [r for rank in before for r in rank[step]] if step <= 3 else after[step]
        indices = sorted(i for r in records for i in r["index"])
        assert len(indices) == 8 and len({r["epoch"] for r in records}) == 1
        seen[records[0]["epoch"]] += indices
        if 3 < step <= 8:  # the rest of epoch 0: the uninterrupted run's samples, step by step
            (r0,), (r1,) = reference[0][step], reference[1][step]
            assert indices == sorted(r0["index"] + r1["index"]), step
            mean = sum(r["loss"]["loss"] for r in records) / 2
            assert abs(mean - r0["loss"]["loss"]) < 1e-4, step
    assert {epoch: sorted(indices) for epoch, indices in seen.items()} == {0: list(range(64)), 1: list(range(64))}

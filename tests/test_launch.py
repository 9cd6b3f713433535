"""Launching a run: the recipe's global batch split over the processes found (training/allocation.py), the
shipped launchers keeping it on 8 and 32 GPUs, and `--dry-run`'s banner."""

from __future__ import annotations

import os
import stat
import subprocess
from pathlib import Path

import pytest

from dataset_card.synthetic.shapes import write_synthetic_dataset
from pretraining.train import main, parse_args
from pretraining.training.allocation import Allocation, allocate, peak_lr
from pretraining.training.config import ConfigError, amend, apply_overrides
from pretraining.training.recipes import RECIPES, get_recipe

ROOT = Path(__file__).resolve().parents[1]


def test_the_global_batch_is_split_into_the_fewest_equal_micro_batches():
    assert allocate(4096, 256, 8) == Allocation(8, 256, 2)
    assert allocate(4096, 256, 32) == Allocation(32, 128, 1)
    assert allocate(4096, 256, 16) == Allocation(16, 256, 1)
    assert allocate(4096, 96, 8) == Allocation(8, 64, 8)  # 6 micro-batches of 96 cannot split 4096 equally
    assert allocate(100, 40, 1) == Allocation(1, 25, 4)
    assert allocate(None, 8, 2) == Allocation(2, 8, 1)  # no global batch: one micro-batch per process
    for world in (1, 2, 8, 16, 32, 64):
        assert allocate(4096, 256, world).global_batch == 4096
    # The learning rate follows the global batch only.
    assert peak_lr(None, 1.5e-4, 4096) == pytest.approx(2.4e-3) and peak_lr(2e-3, 1.5e-4, 4096) == 2e-3


def test_a_world_size_that_cannot_reach_the_global_batch_is_refused_naming_what_fits():
    with pytest.raises(ConfigError) as err:
        allocate(4096, 256, 24)
    message = str(err.value)
    assert message == ("global batch 4096 cannot be split evenly over 24 processes: run on 16 or 32 GPUs, or set "
                       "--set global_batch=4080 (or 4104) for 24.")
    assert allocate(4080, 256, 24).global_batch == 4080


def test_accum_steps_is_refused_with_the_new_spelling():
    with pytest.raises(ConfigError, match="accumulation is derived now: set global_batch"):
        apply_overrides(get_recipe("tiny"), ["accum_steps=2"])


# The shipped launchers --------------------------------------------------------------------------------


def _fake_commands(folder: Path) -> dict:
    """torchrun, srun and scontrol stand-ins: torchrun writes its arguments, one a line, to $LAUNCH_LOG."""
    scripts = {
        "torchrun": 'printf "%s\\n" "$@" > "$LAUNCH_LOG"\n',
        "srun": 'while [ "$1" != torchrun ]; do shift; done\nexec "$@"\n',
        "scontrol": "echo node-0\n",
    }
    for name, body in scripts.items():
        path = folder / name
        path.write_text(f"#!/usr/bin/env bash\nset -euo pipefail\n{body}")
        path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return {**os.environ, "PATH": f"{folder}{os.pathsep}{os.environ['PATH']}", "LAUNCH_LOG": str(folder / "log")}


def _launched(env: dict, command: list[str]) -> tuple[int, list[str]]:
    """(world size, pretraining.train's arguments) of what `command` hands torchrun."""
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    args = Path(env["LAUNCH_LOG"]).read_text().splitlines()
    world = int(args[args.index("--nnodes") + 1]) * int(args[args.index("--nproc_per_node") + 1])
    return world, args[args.index("pretraining.train") + 1:]


@pytest.mark.parametrize("launcher, nodes", [("pretrain.sh", 1), ("pretrain.sh", 4), ("pretrain.sbatch", 4),
                                             ("pretrain.sbatch", 1)])
def test_the_launchers_keep_the_recipes_global_batch_and_lr(tmp_path, launcher, nodes):
    env = _fake_commands(tmp_path)
    if launcher == "pretrain.sh":
        env["NNODES"] = str(nodes)
        command = ["bash", "workflows/pretrain.sh", "/data/c2f", "runs/b400"]
    else:
        env.update(SLURM_NNODES=str(nodes), SLURM_JOB_NODELIST="node-[0-3]", SLURM_JOB_ID="7",
                   SLURM_CPUS_ON_NODE="96")
        command = ["bash", "workflows/pretrain.sbatch", "/data/c2f", "runs/b400"]
    world, args = _launched(env, command)
    assert world == 8 * nodes
    parsed = parse_args(args)
    cfg, _ = amend(apply_overrides(get_recipe(parsed.config), parsed.set), parsed.amend)
    split = allocate(cfg.global_batch, cfg.data.batch_size, world)
    assert parsed.config == "c2fmae_base_400ep" and split.global_batch == 4096
    assert (split.per_gpu, split.accum) == ((256, 2) if world == 8 else (128, 1))
    assert peak_lr(cfg.optim.lr, cfg.optim.base_lr, split.global_batch) == pytest.approx(2.4e-3)
    if launcher == "pretrain.sbatch":  # 96 CPUs over 8 ranks, less each rank's main process and pin thread
        assert cfg.data.num_workers == 10


def test_the_sbatch_passes_the_users_overrides_and_sizes_workers_by_the_nodes_cpus(tmp_path):
    env = _fake_commands(tmp_path)
    env.update(SLURM_NNODES="4", SLURM_JOB_NODELIST="n[0-3]", SLURM_JOB_ID="7", SLURM_CPUS_ON_NODE="128")
    _, args = _launched(env, ["bash", "workflows/pretrain.sbatch", "/d", "runs/r", "mae_base",
                              "--amend", "optim.base_lr=7.5e-05"])
    parsed = parse_args(args)
    assert parsed.config == "mae_base" and parsed.amend == ["data.num_workers=14", "optim.base_lr=7.5e-05"]


def test_every_base_recipe_states_mae_s_global_batch():
    for name in RECIPES:
        cfg = get_recipe(name)
        assert cfg.global_batch == (None if name == "tiny" else 4096), name


# --dry-run --------------------------------------------------------------------------------------------------


@pytest.mark.usefixtures("one_thread")
def test_dry_run_prints_the_banner_and_writes_nothing(tmp_path, capsys):
    write_synthetic_dataset(str(tmp_path / "data"), num_images=32, num_shards=2, size=(64, 64), seed=0)
    run = tmp_path / "run"
    args = ["--data", str(tmp_path / "data"), "--output", str(run), "--no-progress", "--dry-run",
            "--set", "global_batch=16", "--set", "data.batch_size=8", "--set", "data.num_workers=0"]
    assert main(args) == 0
    captured = capsys.readouterr()
    assert captured.out.splitlines()[:6] == [
        "tiny on 1 process:",
        "  global batch     16 = 8 per process x 1 process x 2 accumulation steps",
        "  peak lr          0.002 (optim.lr, fixed), 1 warm-up epochs, then a cosine",
        "  epochs           10 of 2 optimizer steps (20 in all)",
        "  numerics         fp32 (no autocast off a GPU); no gradient clipping",
        "  loader workers   0 per process",
    ]
    assert "nothing was trained or written" in captured.out and not run.exists()
    # A refusal a start would meet is met by the dry run too, in one sentence.
    assert main([*args, "--set", "global_batch=33", "--set", "data.batch_size=32"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "cannot fill one step" in err


def test_the_resume_command_appends_the_amendments_once():
    from pretraining.train import resume_command

    argv = ["--data", "d", "--output", "r", "--amend", "optim.lr=0.001", "--set", "epochs=2"]
    assert resume_command(argv, ["optim.lr=0.0005", "precision=fp32"]) == (
        "python -m pretraining.train --data d --output r --set epochs=2 --amend optim.lr=0.0005 --amend precision=fp32")

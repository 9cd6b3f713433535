"""Pretraining entrypoint: `python -m pretraining.train --data PATH --config NAME --output RUN [--set k=v ...]`.

One process per GPU under `torchrun` (DDP), or one process on a CPU. Rerunning the same command
resumes from the newest readable checkpoint in RUN (`training/resume.py` says what must agree; a
finished run says so and changes nothing; `--set epochs=N` extends it). `--init PATH` starts a new
run's encoder from another checkpoint (`training/init_weights.py`). The run is set up, resumed and
saved by `training/trainer.py`; its folder's files are `training/run_folder.py`'s. This module holds
the command line and the loop. See docs/training.md.

The loop, in order: set the learning rate and the curriculum's masking weights for the optimizer
step (both from its fractional epoch); finish the batch on the device under those weights; forward
and backward each micro-batch (DDP syncs gradients on the last one), keeping its loss terms on the
device; step the optimizer; let an adaptive curriculum see the step's per-strategy losses; every
`log_every` steps and before each checkpoint, average the kept loss terms over ranks, stop on a
non-finite one, log (with the step's gradient norm, computed only then unless clipping needs it);
draw a figure; checkpoint (and keep every N-th epoch's). The next batch is copied to the GPU meanwhile.
"""

from __future__ import annotations

import argparse
import math
import os
import shlex
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from dataset_card.contract.images import ImageReferenceError
from pretraining.data.loader import DataError, LabeledDataset
from pretraining.data.prefetch import DevicePrefetcher
from pretraining.training import checkpoint as ckpt
from pretraining.training.config import AMENDABLE_KEYS, ConfigError, TrainConfig, amend, apply_overrides
from pretraining.training.distributed import Distributed, setup_distributed
from pretraining.training.monitor import Monitor
from pretraining.training.recipes import RECIPES, get_recipe
from pretraining.training.resume import DivergedError, RunError
from pretraining.training.run_folder import rerun_config
from pretraining.training.storage import StorageError
from pretraining.training.trainer import Trainer


def learning_rate(epoch: float, lr: float, min_lr: float, warmup_epochs: float, epochs: int) -> float:
    """MAE's schedule at fractional epoch `epoch`: linear warm-up, then a half cosine to min_lr."""
    if epoch < warmup_epochs:
        return lr * epoch / warmup_epochs
    progress = (epoch - warmup_epochs) / max(epochs - warmup_epochs, 1e-8)
    return min_lr + (lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))


@dataclass
class EpochEnd:
    """What a hook gets after each epoch (e.g. a k-NN probe on frozen features every N epochs)."""

    epoch: int  # the epoch just finished (0-based)
    global_step: int
    model: torch.nn.Module  # the bare model (not DDP, not compiled); call .encode_rgb(images)
    dataset: LabeledDataset
    monitor: Monitor  # log with monitor.scalars(global_step, {...}); disabled on ranks > 0
    dist: Distributed


Hook = Callable[[EpochEnd], None]


def train(cfg: TrainConfig, data: str, output: str, hooks: Sequence[Hook] = (), progress: bool = True,
          images: str | None = None, new_data: bool = False, init: str | None = None,
          amend: Sequence[str] = (), dry_run: bool = False) -> dict:
    """Train (or resume) the run in `output` on the labeled dataset in `data`; returns its summary
    (with "complete": True when the run had already finished and nothing was done).
    `images`: the image folder of a labels-only dataset (`--images`). `new_data`: resume on a
    dataset other than the checkpoint's, on purpose (`--new-data`). `init`: a checkpoint whose
    encoder weights a new run starts from (`--init`; training/init_weights.py); ignored on resume.
    `amend`: the keys `cfg` changes on purpose on resume (`--amend`; config.AMENDABLE_KEYS).
    `dry_run`: check the start and print its banner, joining no process group, building and writing nothing."""
    if dry_run:  # every process of the launch checks its own start; rank 0 prints
        world = Distributed(int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1")),
                            torch.device("cpu"))
        trainer = Trainer(cfg, data, Path(output), world, images, new_data, init, progress, amend, dry_run=True)
        return trainer.complete
    distributed = setup_distributed(cfg.data.num_workers)
    try:
        trainer = Trainer(cfg, data, Path(output), distributed, images, new_data, init, show_progress=progress,
                          amend=amend)
        if trainer.complete is not None:
            return trainer.complete
        try:
            return train_loop(trainer, hooks)
        finally:  # after an error: a checkpoint in flight still lands (its own error would hide this one)
            trainer.writer.close(raise_errors=False)
    finally:
        if distributed.world_size > 1 and dist.is_initialized():
            dist.destroy_process_group()


def train_loop(t: Trainer, hooks: Sequence[Hook] = ()) -> dict:
    """Run `t` from its position to the end of its epochs; returns its summary (see the module's docstring)."""
    cfg = t.cfg
    t.model.train()
    waited_from = time.perf_counter()
    for batch in DevicePrefetcher(t.loader, t.device):  # the next batch's copy overlaps this step on a GPU
        epoch, step = batch.epoch, batch.step
        micro = step % t.accum_steps
        if micro == 0:  # the optimizer step's learning rate and masking weights, from its fractional epoch
            progress = t.progress_at(epoch, step)
            t.set_lr(learning_rate(progress * cfg.epochs, t.peak_lr, cfg.optim.min_lr, cfg.optim.warmup_epochs,
                                   cfg.epochs))
            weights = t.masking_weights(progress)
        inputs = batch.to(t.device, weights)
        t.window["wait"] += time.perf_counter() - waited_from
        last_micro = micro == t.accum_steps - 1
        out = t.forward_backward(inputs, sync=last_micro)
        t.keep_losses(out, inputs, epoch, step)
        if not last_micro:
            waited_from = time.perf_counter()
            continue

        log_now = (t.global_step + 1) % cfg.log_every == 0
        grad_norm = t.optimizer_step(measure_norm=log_now)
        t.advance(epoch, step)
        if log_now:
            t.log(epoch, step, inputs, grad_norm)
            t.writer.poll()  # a background checkpoint write that failed stops the run now
        if t.grad_share_due():
            t.log_grad_share(inputs)
        if t.main and cfg.figure_every and t.global_step % cfg.figure_every == 0:
            t.figure(inputs, out)
        if t.global_step % cfg.checkpoint_every == 0 or t.keeps(t.position) or (log_now and t.checkpoint_due()):
            t.checkpoint()
        if t.position[1] == 0 and hooks:  # an epoch just ended
            t.check_losses()
            for hook in hooks:
                hook(EpochEnd(epoch, t.global_step, t.model, t.dataset, t.monitor, t.distributed))
        waited_from = time.perf_counter()
    return t.finish()


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m pretraining.train",
        description="Pretrain C2FMAE (or the MAE / MultiMAE baselines) on a labeled dataset folder. Rerun the same "
                    "command to resume from the newest checkpoint in --output. Multi-GPU: launch with torchrun "
                    "(see docs/training.md).")
    parser.add_argument("--data", required=True, help="labeled dataset folder (the labeling stage's output)")
    parser.add_argument("--images", metavar="ROOT", default=None,
                        help="for a labels-only dataset (labeled with --image-storage reference): the folder it was "
                             "labeled from; each row's image is read from ROOT/<image.path> and checked against its "
                             "stored size and sha256")
    parser.add_argument("--config", default=None, choices=sorted(RECIPES), metavar="NAME",
                        help=f"named recipe: {', '.join(RECIPES)} (default: tiny; a rerun continues the config "
                             "stored in --output, and --set overrides it)")
    parser.add_argument("--output", required=True, help="run folder: config, checkpoints, logs, figures")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config field, e.g. --set data.batch_size=128 --set model.img_size=96")
    parser.add_argument("--amend", action="append", default=[], metavar="KEY=VALUE",
                        help="change a setting of a run on resume, on purpose, recorded in RUN/run.json with its step: "
                             f"{', '.join(sorted(AMENDABLE_KEYS))} (e.g. --amend optim.base_lr=7.5e-5 --amend "
                             "precision=fp32); on a fresh start it acts as --set")
    parser.add_argument("--dry-run", action="store_true",
                        help="check the start (config, resume, data, the global batch's split over this launch's "
                             "processes) and print its banner, without training or writing anything")
    parser.add_argument("--init", metavar="PATH",
                        help="start a new run's encoder from another checkpoint's weights: a run folder or one of its "
                             "checkpoints, a timm export folder, or MAE's released .pth; decoders and the optimizer "
                             "start fresh, RUN/init.json reports what was loaded; ignored when the run resumes")
    parser.add_argument("--new-data", action="store_true",
                        help="resume the run in --output on a dataset other than the one it was trained on, on "
                             "purpose (without it such a resume is refused)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar (logs only)")
    parser.add_argument("--probe-data", metavar="PATH",
                        help="a labeled folder with image classes to score a frozen-feature probe on while training "
                             "(a held-out split by hashed id), logged to TensorBoard as probe/<kind>_top1")
    parser.add_argument("--probe-every", type=int, default=10, metavar="N", help="epochs between probes (default 10)")
    parser.add_argument("--probe-kind", choices=("knn", "linear"), default="knn", help="k-NN (default) or linear probe")
    return parser.parse_args(argv)


def resume_command(argv: Sequence[str] | None, amendments: Sequence[str]) -> str:
    """The command that reran this one with `--amend` each of `amendments` (earlier --amend of the same keys
    dropped): the user's own command line, or `python -m pretraining.train ARGS` when called with `argv`."""
    if argv is None:
        prefix, args = sys.orig_argv[:sys.orig_argv.index("-m") + 2] if "-m" in sys.orig_argv \
            else sys.orig_argv[:2], sys.argv[1:]
    else:
        prefix, args = ["python", "-m", "pretraining.train"], list(argv)
    keys = {a.partition("=")[0] for a in amendments}
    kept, i = [], 0
    while i < len(args):
        if args[i] == "--amend" and i + 1 < len(args) and args[i + 1].partition("=")[0] in keys:
            i += 2
            continue
        kept.append(args[i])
        i += 1
    return shlex.join([*prefix, *kept, *[a for item in amendments for a in ("--amend", item)]])


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        # A rerun continues the stored config (today's recipe defaults never leak into an existing run).
        base = rerun_config(Path(args.output), args.config)
        cfg, amended = amend(apply_overrides(base if base is not None else get_recipe(args.config or "tiny"),
                                             args.set), args.amend)
        hooks = []
        if args.probe_data:
            from pretraining.evaluation.probe import PeriodicProbeConfig, probe_hook

            if args.probe_every < 1:
                raise ConfigError(f"--probe-every must be at least 1, got {args.probe_every}.")
            hooks.append(probe_hook(args.probe_data, cfg=PeriodicProbeConfig(every=args.probe_every,
                                                                           kind=args.probe_kind)))
        summary = train(cfg, args.data, args.output, hooks=hooks, progress=not args.no_progress, images=args.images,
                        new_data=args.new_data, init=args.init, amend=amended, dry_run=args.dry_run)
    except DivergedError as err:  # the exact command that resumes it, on one line
        launcher = "torchrun" if "TORCHELASTIC_RUN_ID" in os.environ else None
        command = resume_command(argv, err.amend)
        how = (f"rerun your torchrun launch (e.g. workflows/pretrain.sh) with {shlex.join(['--amend', *err.amend])} "
               f"appended; its training command: {command}") if launcher else f"resume with: {command}"
        print(f"error: {err.reason}; {how}", file=sys.stderr)
        return 2
    except (ConfigError, DataError, RunError, ckpt.CheckpointError, StorageError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except ImageReferenceError as err:  # from a loader worker, its sentence is the message's last line
        print(f"error: {str(err).strip().splitlines()[-1].split('ImageReferenceError: ')[-1]}", file=sys.stderr)
        return 2
    if int(os.environ.get("RANK", "0")) != 0:
        return 0
    if summary.get("dry_run"):
        print(f"dry run: {args.output} would start as above; nothing was trained or written")
        return 0
    loss = summary["last"].get("loss")
    last = f"last loss {loss:.4f}" if loss is not None else "no loss recorded"
    if summary.get("complete"):
        print(f"{args.output} is already complete ({summary['global_step']} optimizer steps over {cfg.epochs} epochs, "
              f"{last}); nothing was changed. To train longer, rerun with a larger --set epochs=N (see "
              "docs/training.md, Extending a run).")
    else:
        print(f"done: {summary['global_step']} optimizer steps, {last}; run folder {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Pretraining entrypoint: `python -m pretraining.train --data PATH --config NAME --output RUN [--set k=v ...]`.

One process per GPU under `torchrun` (DDP), or one process on a CPU. Rerunning the same command
resumes from the newest readable checkpoint in RUN (`training/resume.py` says what must agree; a
finished run says so and changes nothing; `--set epochs=N` extends it). `--init PATH` starts a new
run's encoder from another checkpoint (`training/init_weights.py`). See docs/training.md.

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
import contextlib
import dataclasses
import json
import math
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from timm.optim import param_groups_weight_decay
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from dataset_card.contract.images import ImageReferenceError
from pretraining.data.loader import (
    DataError,
    LabeledDataset,
    PretrainingLoader,
    SampleSpec,
    open_labeled_dataset,
)
from pretraining.data.prefetch import DevicePrefetcher
from pretraining.models.curriculum import Curriculum
from pretraining.models.factory import create_model
from pretraining.training import checkpoint as ckpt
from pretraining.training.config import ConfigError, TrainConfig, apply_overrides, to_dict
from pretraining.training.distributed import (
    Distributed,
    gather,
    mean_over_ranks,
    param_hash,
    setup_distributed,
)
from pretraining.training.init_weights import INIT_FILE, initialize
from pretraining.training.loss_meter import LossMeter, MicroStep, NonFiniteLoss
from pretraining.training.monitor import Monitor, reconstruction_figure, step_scalars
from pretraining.training.recipes import RECIPES, get_recipe
from pretraining.training.resume import RunError, check_resume, complete_summary, dataset_fingerprint
from pretraining.training.storage import StorageError, write_json, writing
from pretraining.training.strategy_log import StrategyLog

CONFIG_FILE = "config.json"
RUN_FILE = "run.json"  # what the config does not fix: data path, world size, learning rate, dataset size


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


def _open_samples_log(path: Path, position: tuple[int, int]):
    """The per-step sample log, without the lines a killed run wrote after the checkpoint resumed from."""
    kept = []
    if path.exists():
        kept = [line for line in path.read_text().splitlines()
                if line and tuple(json.loads(line)[k] for k in ("epoch", "step")) < position]
    with writing(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        log = open(path, "w", buffering=1)  # line-buffered: a killed run keeps what it logged
        log.writelines(line + "\n" for line in kept)
    return log


def train(cfg: TrainConfig, data: str, output: str, hooks: Sequence[Hook] = (), progress: bool = True,
          images: str | None = None, new_data: bool = False, init: str | None = None) -> dict:
    """Train (or resume) the run in `output` on the labeled dataset in `data`; returns its summary
    (with "complete": True when the run had already finished and nothing was done).
    `images`: the image folder of a labels-only dataset (`--images`). `new_data`: resume on a
    dataset other than the checkpoint's, on purpose (`--new-data`). `init`: a checkpoint whose
    encoder weights a new run starts from (`--init`; training/init_weights.py); ignored on resume."""
    distributed = setup_distributed(cfg.data.num_workers)
    try:
        return _train(cfg, data, Path(output), hooks, progress, distributed, images, new_data, init)
    finally:
        if distributed.world_size > 1 and dist.is_initialized():
            dist.destroy_process_group()


def _train(cfg: TrainConfig, data: str, run_dir: Path, hooks: Sequence[Hook], show_progress: bool,
           distributed: Distributed, images: str | None = None, new_data: bool = False,
           init: str | None = None) -> dict:
    device, main = distributed.device, distributed.main
    dataset = open_labeled_dataset(data, images)
    global_batch = cfg.data.batch_size * distributed.world_size * cfg.accum_steps
    peak_lr = cfg.optim.lr if cfg.optim.lr is not None else cfg.optim.base_lr * global_batch / 256
    run_info = {"data": str(data), "world_size": distributed.world_size, "global_batch": global_batch,
                "lr": peak_lr, "dataset_rows": dataset.num_rows,
                "num_semantic_classes": dataset.metadata.num_semantic_classes, "dataset": dataset_fingerprint(dataset),
                "init": None}  # --init's source and sha256, when the run started from another checkpoint
    # The newest readable checkpoint binds the run (config, processes, data); an unreadable newer one is moved aside.
    say = (lambda line: tqdm.write(line, file=sys.stderr)) if main else (lambda line: None)
    resumed = ckpt.load_newest_readable(run_dir, move_aside=main, warn=say)
    if resumed is not None:
        latest, state = resumed
        plan = check_resume(latest, json.loads(state["config"]), json.loads(state["run"]), cfg, run_info,
                            (state["position"]["epoch"], state["position"]["step"]), new_data)
        if plan.complete:  # a rerun of a finished run: say so and change nothing
            return {**complete_summary(run_dir, state), "complete": True}

    torch.manual_seed(cfg.seed)  # the same initial weights on every rank
    try:
        model = create_model(cfg.model, num_semantic_classes=dataset.metadata.num_semantic_classes, **cfg.model_args)
    except (TypeError, ValueError) as err:  # an unknown or inconsistent model_args override
        raise ConfigError(f"model {cfg.model} with model_args {cfg.model_args}: {err}") from err
    init_report = None
    if resumed is not None:  # the checkpoint's weights win; run.json keeps where the run's first weights came from
        run_info["init"] = json.loads(state["run"]).get("init")
        if init is not None:
            started = run_info["init"]["source"] if run_info["init"] else "its own initialisation"
            say(f"--init {init} ignored: resuming from {latest}, whose weights win (the run started from {started}).")
    elif init is not None:  # weights only: the optimizer and the schedules start fresh
        init_report = initialize(model, init)
        run_info["init"] = init_report.provenance()
    model.to(device)
    no_decay = model.no_weight_decay() if hasattr(model, "no_weight_decay") else ()
    groups = param_groups_weight_decay(model, cfg.optim.weight_decay, no_weight_decay_list=no_decay)
    optimizer = torch.optim.AdamW(groups, lr=peak_lr, betas=cfg.optim.betas, fused=device.type == "cuda")
    autocast_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.precision) if device.type == "cuda" else None
    scaler = torch.amp.GradScaler(device.type, enabled=autocast_dtype == torch.float16)  # bf16 needs no scaling

    curriculum = Curriculum(model.cfg.masking.curriculum, device)
    global_step, position = 0, (0, 0)  # optimizer steps done; next (epoch, micro-step) to load
    if resumed is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scaler.load_state_dict(state["scaler"])
        curriculum.load_state_dict(state["curriculum"].get("adaptive", {}))
        global_step, position = state["global_step"], (state["position"]["epoch"], state["position"]["step"])
        ckpt.set_rng_state(state["rng"][distributed.rank])
        say(f"resuming from {latest}: optimizer step {global_step}, epoch {position[0]}, batch {position[1]}")
        for note in plan.notes:
            say(note)

    mcfg = model.cfg
    spec = SampleSpec(img_size=mcfg.img_size, patch_size=mcfg.patch_size, modalities=mcfg.modalities,
                      masking=mcfg.masking, augment=cfg.data.augment, ignore_value=dataset.metadata.ignore_value,
                      seed=cfg.seed, epochs=cfg.epochs, instance_offset_unit=mcfg.offset_unit_pixels,
                      num_semantic_classes=dataset.metadata.num_semantic_classes)
    loader = PretrainingLoader(dataset, spec, cfg.data, distributed.rank, distributed.world_size, position,
                               cfg.accum_steps, pin_memory=device.type == "cuda")
    if main:  # only now: a start refused above leaves nothing behind
        write_json(run_dir / CONFIG_FILE, to_dict(cfg))
        write_json(run_dir / RUN_FILE, run_info)
        if init_report is not None:
            write_json(run_dir / INIT_FILE, dataclasses.asdict(init_report))
            for line in [*init_report.lines(), f"init: the report is in {run_dir / INIT_FILE}"]:
                say(line)
    steps_per_epoch = loader.steps_per_epoch  # micro-steps of epoch 0; later epochs may differ slightly
    train_model = torch.compile(model) if cfg.compile else model
    if distributed.world_size > 1:
        # broadcast_buffers=False: the only buffers are fixed sin-cos position embeddings, equal on every rank.
        train_model = DistributedDataParallel(train_model, device_ids=[device.index] if device.type == "cuda" else None,
                                              broadcast_buffers=False)
    monitor = Monitor(run_dir, enabled=main, purge_step=global_step + 1)  # hide what a killed run logged after this
    strategies = StrategyLog(mcfg.modalities, device)
    samples_log = _open_samples_log(run_dir / f"samples-rank{distributed.rank}.jsonl", position) if cfg.log_samples else None
    bar = tqdm(total=cfg.epochs * steps_per_epoch // cfg.accum_steps, initial=global_step, unit="step",
               disable=not (main and show_progress), dynamic_ncols=True)

    def progress_at(epoch: int, step: int) -> float:
        """Fractional training progress in [0, 1] at micro-step `step` of `epoch` (what the schedules read)."""
        if epoch not in epoch_steps:
            epoch_steps[epoch] = loader.stream.plan(epoch).steps if epoch < cfg.epochs else 1
        return (epoch + step / epoch_steps[epoch]) / cfg.epochs

    def save(epoch: int, step: int) -> Path | None:
        """Checkpoint the run at data position (epoch, step); returns the file on rank 0."""
        states = gather(ckpt.rng_state(), distributed)
        if main:
            progress = progress_at(epoch, step)
            weights = torch.as_tensor(curriculum.weights(progress), dtype=torch.float64).tolist()
            return ckpt.save_checkpoint({
                "model": model.state_dict(), "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(),
                "schedule": {"lr": optimizer.param_groups[0]["lr"], "peak_lr": peak_lr},
                "curriculum": {"progress": progress, "weights": weights, "adaptive": curriculum.state_dict()},
                "position": {"epoch": epoch, "step": step}, "global_step": global_step, "rng": states,
                "config": json.dumps(to_dict(cfg)), "run": json.dumps(run_info), "last": last,
            }, run_dir, global_step, cfg.keep_checkpoints)
        return None

    def keeps(position: tuple[int, int]) -> bool:
        """Whether (epoch, step) ends an epoch whose checkpoint is kept for good (keep_every_epochs)."""
        return cfg.keep_every_epochs > 0 and position[1] == 0 and position[0] > 0 \
            and position[0] % cfg.keep_every_epochs == 0

    if resumed is not None and main and keeps(position) and not ckpt.kept_path(run_dir, position[0]).exists():
        ckpt.keep_checkpoint(latest, ckpt.kept_path(run_dir, position[0]))  # the run was stopped before keeping it

    meter: LossMeter | None = None  # made at the first step, when the model has named its loss terms

    def check_losses() -> None:
        """Read the losses since the last check (one sync), write the samples log, stop on a non-finite one."""
        nonlocal last
        try:
            steps = meter.check(lambda values: mean_over_ranks(values, distributed)) if meter is not None else []
        except NonFiniteLoss as err:
            raise RunError(f"{err}. The run stopped; lower optim.lr or use precision=fp32, then rerun to resume "
                           "from the last checkpoint.") from None
        if samples_log is not None and steps:
            with writing(samples_log.name):
                for s in steps:
                    samples_log.write(json.dumps({"epoch": s.epoch, "step": s.batch, "index": s.index,
                                                  "loss": dict(zip(meter.names, s.values))}) + "\n")
        if steps:
            last = dict(meter.last)
            bar.set_postfix(epoch=steps[-1].epoch, loss=f"{last['loss']:.4f}", lr=f"{lr:.2e}", refresh=False)

    model.train()
    window = {"samples": 0, "wait": 0.0, "start": time.perf_counter()}
    last, saved_at = {}, global_step
    epoch_steps = {}
    waited_from = time.perf_counter()
    for batch in DevicePrefetcher(loader, device):  # the next batch's copy overlaps this step on a GPU
        epoch, step = batch.epoch, batch.step
        micro = step % cfg.accum_steps
        if micro == 0:  # the optimizer step's learning rate and masking weights, from its fractional epoch
            progress = progress_at(epoch, step)
            lr = learning_rate(progress * cfg.epochs, peak_lr, cfg.optim.min_lr, cfg.optim.warmup_epochs, cfg.epochs)
            for group in optimizer.param_groups:
                group["lr"] = lr
            weights = curriculum.weights(progress)
            strategies.record_weights(global_step + 1, weights)
        inputs = batch.to(device, weights)
        window["wait"] += time.perf_counter() - waited_from
        last_micro = micro == cfg.accum_steps - 1
        sync = contextlib.nullcontext() if last_micro or distributed.world_size == 1 else train_model.no_sync()
        with sync:
            with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
                out = train_model(inputs)
            scaler.scale(out.loss / cfg.accum_steps).backward()
        strategies.add(out.strategy, inputs["strategy_requested"], out.sample_terms, out.sample_loss)

        if meter is None or meter.names[1:] != tuple(out.terms):
            check_losses()
            meter = LossMeter(["loss", *out.terms])
        # Kept on the device; read every log_every steps, before checkpoints and at the end (check_losses).
        meter.add(torch.stack([out.loss.detach().float(), *[t.detach().float() for t in out.terms.values()]]),
                  MicroStep(global_step + 1, epoch, step, inputs["index"] if samples_log is not None else None))
        window["samples"] += inputs["rgb"].shape[0] * distributed.world_size
        if not last_micro:
            waited_from = time.perf_counter()
            continue

        log_now = (global_step + 1) % cfg.log_every == 0
        if cfg.optim.clip_grad is not None or log_now:  # the norm before clipping, a device tensor read at log steps
            scaler.unscale_(optimizer)  # fp16: the true gradients (scaler.step does not unscale twice)
            # An infinite max norm only measures (the gradients are scaled by 1); any torch >= 2.3 has it.
            max_norm = cfg.optim.clip_grad if cfg.optim.clip_grad is not None else math.inf
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        step_loss, step_count = strategies.end_step()
        if curriculum.adaptive is not None:  # every rank sees the same sums, so all draw with the same weights
            curriculum.update(mean_over_ranks(step_loss, distributed), mean_over_ranks(step_count, distributed))
        global_step += 1
        position = (epoch, step + 1) if step + 1 < epoch_steps[epoch] else (epoch + 1, 0)
        bar.update(1)

        if log_now:
            check_losses()
            elapsed = time.perf_counter() - window["start"]
            mix, per_step = strategies.scalars()
            for logged_step, values in per_step:
                monitor.scalars(logged_step, values)
            grad_share = {}
            if cfg.log_grad_share and main and len(mcfg.modalities) > 1:
                with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
                    norms = model.term_gradient_norms(inputs).tolist()
                grad_share = {f"grad_share/{m}": n / max(sum(norms), 1e-30) for m, n in zip(mcfg.modalities, norms)}
            monitor.scalars(global_step, {
                **{f"loss/{n}": v for n, v in last.items()}, "lr": lr, **mix, **grad_share,
                **(step_scalars(grad_norm, scaler, device) if main else {}),
                "perf/images_per_s": window["samples"] / elapsed, "perf/data_wait_share": window["wait"] / elapsed,
                "epoch": epoch + (step + 1) / epoch_steps[epoch]})
            window = {"samples": 0, "wait": 0.0, "start": time.perf_counter()}
        if main and cfg.figure_every and global_step % cfg.figure_every == 0:
            recon = model.reconstruct(inputs, out)
            monitor.figure(global_step, reconstruction_figure(inputs, recon, model.visible_mask(out)))
        if global_step % cfg.checkpoint_every == 0 or keeps(position):
            check_losses()  # never save after a non-finite loss
            path = save(*position)
            saved_at = global_step
            if path is not None and keeps(position):
                ckpt.keep_checkpoint(path, ckpt.kept_path(run_dir, position[0]))
        if position[1] == 0 and hooks:  # an epoch just ended
            check_losses()
            for hook in hooks:
                hook(EpochEnd(epoch, global_step, model, dataset, monitor, distributed))
        waited_from = time.perf_counter()

    check_losses()
    bar.close()
    if saved_at != global_step:
        save(*position)
    hashes = gather(param_hash(model), distributed)
    summary = {"global_step": global_step, "position": list(position), "last": last, "param_sha256": hashes}
    if main:
        write_json(run_dir / "summary.json", summary)
    if samples_log is not None:
        samples_log.close()
    monitor.close()
    if len(set(hashes)) > 1:
        raise RunError("ranks ended with different parameters; DDP lost synchronisation (report this as a bug).")
    return summary


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
    parser.add_argument("--config", default="tiny", choices=sorted(RECIPES), metavar="NAME",
                        help=f"named recipe: {', '.join(RECIPES)} (default: tiny)")
    parser.add_argument("--output", required=True, help="run folder: config, checkpoints, logs, figures")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config field, e.g. --set data.batch_size=128 --set model_args.img_size=96")
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


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        cfg = apply_overrides(get_recipe(args.config), args.set)
        hooks = []
        if args.probe_data:
            from pretraining.evaluation.probe import PeriodicProbeConfig, probe_hook

            if args.probe_every < 1:
                raise ConfigError(f"--probe-every must be at least 1, got {args.probe_every}.")
            hooks.append(probe_hook(args.probe_data, cfg=PeriodicProbeConfig(every=args.probe_every,
                                                                           kind=args.probe_kind)))
        summary = train(cfg, args.data, args.output, hooks=hooks, progress=not args.no_progress, images=args.images,
                        new_data=args.new_data, init=args.init)
    except (ConfigError, DataError, RunError, ckpt.CheckpointError, StorageError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except ImageReferenceError as err:  # from a loader worker, its sentence is the message's last line
        print(f"error: {str(err).strip().splitlines()[-1].split('ImageReferenceError: ')[-1]}", file=sys.stderr)
        return 2
    if int(os.environ.get("RANK", "0")) != 0:
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

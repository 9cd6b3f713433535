"""A training run, built and held: `Trainer.__init__` sets the run up, its methods are the loop's steps.

`__init__`, in order: open the dataset; split the global batch for this world size
(training/allocation.py); take the newest readable checkpoint, if any, and check that the rerun
agrees with it, its `--amend`s recorded (training/resume.py; a finished run builds nothing:
`complete` holds its summary; a dry run stops here with the banner); build the model from the
config (on resume: the checkpoint's stored model config), start its encoder from --init on a fresh
run; the optimizer, grad scaler and curriculum, restored on resume; the loader from the data
position; write config.json, run.json (and init.json) on rank 0; print the banner; wrap in DDP,
then compile; TensorBoard, the sample log and the progress bar.

The loop that drives the methods is `pretraining.train.train_loop`; state lives in attributes
(`global_step`, `position`, `last`, ...), so the methods share it without closures.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import torch
from timm.optim import param_groups_weight_decay
from tqdm import tqdm

from pretraining.data.loader import DataConfig, Layout, PretrainingLoader, SampleSpec, open_labeled_dataset
from pretraining.models.autoencoder import ModelConfig, PretrainOutput
from pretraining.models.curriculum import Curriculum
from pretraining.training import checkpoint as ckpt
from pretraining.training.allocation import allocate, banner, peak_lr
from pretraining.training.config import TrainConfig, to_dict
from pretraining.training.distributed import Distributed, gather, mean_over_ranks, parallelize, param_hash
from pretraining.training.init_weights import InitReport, initialize
from pretraining.training.loss_meter import LossMeter, MicroStep, NonFiniteLoss
from pretraining.training.monitor import Monitor, reconstruction_figure, step_scalars
from pretraining.training.resume import (
    DivergedError,
    RunError,
    check_resume,
    complete_summary,
    dataset_fingerprint,
)
from pretraining.training.run_folder import (
    CONFIG_FILE,
    INIT_FILE,
    RUN_FILE,
    SUMMARY_FILE,
    build_model,
    open_samples_log,
    samples_log_path,
    stored_config,
)
from pretraining.training.storage import write_json, writing
from pretraining.training.strategy_log import StrategyLog


def saved_progress(state: dict, stored: TrainConfig, saved_run: dict) -> tuple[int, Layout | None]:
    """(optimizer steps done in the checkpoint's epoch, the layout that epoch is dealt in; None at its start).
    Checkpoints written before the position held global samples and a layout: their run's own split."""
    position = state["position"]
    split = allocate(stored.global_batch, stored.data.batch_size, saved_run["world_size"])
    if "samples" in position:
        done, layout = position["samples"] // split.global_batch, Layout(**position["layout"])
    else:
        done = position["step"] // split.accum
        layout = Layout(split.world_size, max(1, stored.data.num_workers), split.per_gpu, split.accum)
    return done, layout if done > 0 else None


def allocations(saved_run: dict, run_info: dict, step: int) -> list[dict]:
    """run.json's "allocations" on resume at optimizer `step`: the saved ones, and this one if it differs."""
    keys = ("world_size", "per_gpu_batch", "accum_steps")
    saved = saved_run.get("allocations") or [{"step": 0, **{k: saved_run.get(k) for k in keys}}]
    now = {k: run_info[k] for k in keys}
    return saved if {k: saved[-1][k] for k in keys} == now else [*saved, {"step": step, **now}]


class Trainer:
    """One run: built by `__init__` (see the module's docstring), stepped by `pretraining.train.train_loop`."""

    def __init__(self, cfg: TrainConfig, data: str, run_dir: Path, distributed: Distributed,
                 images: str | None = None, new_data: bool = False, init: str | None = None,
                 show_progress: bool = True, amend: Sequence[str] = (), dry_run: bool = False):
        self.run_dir, self.distributed = run_dir, distributed
        self.device, self.main = device, main = distributed.device, distributed.main
        self.dataset = dataset = open_labeled_dataset(data, images)
        num_classes = dataset.metadata.num_semantic_classes  # the model's semantic head follows the data
        cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, num_semantic_classes=num_classes))
        # The recipe's global batch, split for this world size; the peak lr follows the global batch only.
        self.allocation = alloc = allocate(cfg.global_batch, cfg.data.batch_size, distributed.world_size)
        self.accum_steps = alloc.accum
        self.peak_lr = peak_lr(cfg.optim.lr, cfg.optim.base_lr, alloc.global_batch)
        self.run_info = {"data": str(data), "world_size": distributed.world_size, "global_batch": alloc.global_batch,
                         "per_gpu_batch": alloc.per_gpu, "accum_steps": alloc.accum, "lr": self.peak_lr,
                         "dataset_rows": dataset.num_rows, "num_semantic_classes": num_classes,
                         "dataset": dataset_fingerprint(dataset),
                         "init": None,  # --init's source and sha256, when the run started from another checkpoint
                         "amendments": [],  # every --amend of a resume: {"step", "key", "from", "to"}
                         # every split the run trained in, from its optimizer step on
                         "allocations": [{"step": 0, "world_size": alloc.world_size, "per_gpu_batch": alloc.per_gpu,
                                          "accum_steps": alloc.accum}]}
        # The newest readable checkpoint binds the run (config, processes, data); an unreadable newer one is moved aside.
        self.complete: dict | None = None
        epoch_layout = None  # the layout of the epoch a resume continues (None: this allocation's own)
        resumed = ckpt.load_newest_readable(run_dir, move_aside=main and not dry_run, warn=self.say)
        position = saved_position = (0, 0)  # the data position to load next: the checkpoint's, in this split
        if resumed is not None:
            latest, state = resumed
            stored, saved_run = stored_config(state)
            position = saved_position = (state["position"]["epoch"], state["position"]["step"])
            plan = check_resume(latest, to_dict(stored), saved_run, cfg, self.run_info, position, new_data, amend,
                                state["global_step"])
            if plan.complete:  # a rerun of a finished run: say so and change nothing
                self.complete = {**complete_summary(run_dir, state), "complete": True}
                return
            self.run_info["amendments"] = saved_run.get("amendments", []) + plan.amendments
            self.run_info["allocations"] = allocations(saved_run, self.run_info, state["global_step"])
            # What the run was built with, not today's defaults; an amended field (a loss weight) is this rerun's.
            model_amended = {k.split(".", 1)[1]: getattr(cfg.model, k.split(".", 1)[1])
                             for k in amend if k.startswith("model.")}
            cfg = dataclasses.replace(cfg, model=dataclasses.replace(stored.model, **model_amended))
            # Checkpoints lie between optimizer steps: optimizer step k of the epoch, in this split's micro-steps;
            # the epoch in progress keeps the layout it was dealt in (another allocation's, maybe).
            done, epoch_layout = saved_progress(state, stored, saved_run)
            position = (position[0], done * alloc.accum)
        elif amend:
            self.say(f"no checkpoint in {run_dir} to amend: --amend {' '.join(amend)} applies to this fresh start "
                     "as --set would.")
        self.cfg = cfg
        if dry_run:  # the banner (and any refusal above), nothing built, nothing written
            loader = PretrainingLoader(dataset, self._sample_spec(cfg.model), self._data_config(), distributed.rank,
                                       distributed.world_size, position, alloc.accum, epoch_layout=epoch_layout)
            self.show(self.banner(loader.steps_per_epoch))
            self.complete = {"dry_run": True}
            return

        torch.manual_seed(cfg.seed)  # the same initial weights on every rank
        self.model = model = build_model(cfg.model)
        init_report = None
        if resumed is not None:  # the checkpoint's weights win; run.json keeps where the run's first weights came from
            self.run_info["init"] = saved_run.get("init")
            if init is not None:
                started = self.run_info["init"]["source"] if self.run_info["init"] else "its own initialisation"
                self.say(f"--init {init} ignored: resuming from {latest}, whose weights win (the run started from "
                         f"{started}).")
        elif init is not None:  # weights only: the optimizer and the schedules start fresh
            init_report = initialize(model, init)
            self.run_info["init"] = init_report.provenance()
        model.to(device)
        no_decay = model.no_weight_decay() if hasattr(model, "no_weight_decay") else ()
        groups = param_groups_weight_decay(model, cfg.optim.weight_decay, no_weight_decay_list=no_decay)
        self.optimizer = torch.optim.AdamW(groups, lr=self.peak_lr, betas=cfg.optim.betas, fused=device.type == "cuda")
        self.autocast_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.precision) \
            if device.type == "cuda" else None
        self.scaler = torch.amp.GradScaler(device.type, enabled=self.autocast_dtype == torch.float16)  # bf16: no scaling
        if device.type == "cuda":  # under autocast the fp32 matmuls left (the fp32 semantic head) may use TF32:
            # fp32 logits at tensor-core speed (docs/DESIGN.md); precision=fp32 keeps full fp32.
            torch.set_float32_matmul_precision("high" if self.autocast_dtype is not None else "highest")

        self.curriculum = Curriculum(model.cfg.masking.curriculum, device)
        self.global_step, self.position = 0, position  # optimizer steps done; next (epoch, micro-step) to load
        if resumed is not None:
            self._restore(latest, state, plan.notes)

        mcfg = model.cfg
        self.loader = PretrainingLoader(dataset, self._sample_spec(mcfg), self._data_config(), distributed.rank,
                                        distributed.world_size, self.position, alloc.accum,
                                        pin_memory=device.type == "cuda", epoch_layout=epoch_layout)
        steps_per_epoch = self.loader.steps_per_epoch  # micro-steps of epoch 0; later epochs may differ slightly
        self.run_info["steps_per_epoch"] = steps_per_epoch // alloc.accum
        if main:  # only now: a start refused above leaves nothing behind
            self._write_run_files(init_report)
        self.show(self.banner(steps_per_epoch))
        self.train_model = parallelize(model, distributed, cfg.compile)  # DDP, then compile
        # purge_step hides what a killed run logged after the checkpoint resumed from.
        self.monitor = Monitor(run_dir, enabled=main, purge_step=self.global_step + 1)
        self.strategies = StrategyLog(mcfg.modalities, device)
        self.samples_log = open_samples_log(samples_log_path(run_dir, distributed.rank), self.global_step,
                                            saved_position) \
            if cfg.log_samples else None
        if main and cfg.log_samples:  # the log of a rank this allocation lacks ends at the checkpoint too
            for path in run_dir.glob("samples-rank*.jsonl"):
                if int(path.stem.removeprefix("samples-rank")) >= distributed.world_size:
                    open_samples_log(path, self.global_step, saved_position).close()
        self.bar = tqdm(total=cfg.epochs * steps_per_epoch // alloc.accum, initial=self.global_step, unit="step",
                        disable=not (main and show_progress), dynamic_ncols=True)
        if resumed is not None and main and self.keeps(self.position) \
                and not ckpt.kept_path(run_dir, self.position[0]).exists():
            ckpt.keep_checkpoint(latest, ckpt.kept_path(run_dir, self.position[0]))  # stopped before keeping it

        self.meter: LossMeter | None = None  # made at the first step, when the model has named its loss terms
        self.window = {"samples": 0, "wait": 0.0, "start": time.perf_counter()}  # what perf/* averages over
        self.last, self.saved_at, self.lr = {}, self.global_step, self.peak_lr
        self.saved_time = time.monotonic()  # when the last checkpoint was taken (checkpoint_minutes)
        self.writer = ckpt.CheckpointWriter(cfg.checkpoint_async and main)  # rank 0 writes
        self.epoch_steps: dict[int, int] = {}  # micro-steps of each epoch, as the loader plans it

    def _restore(self, latest: Path, state: dict, notes: list[str]) -> None:
        """Continue from checkpoint `latest`: weights, optimizer, scaler, curriculum, position, this rank's RNG."""
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        if state["scaler"]:  # empty when saved without fp16 (precision may be amended): a fresh scale then
            self.scaler.load_state_dict(state["scaler"])
        self.curriculum.load_state_dict(state["curriculum"].get("adaptive", {}))
        self.global_step = state["global_step"]  # self.position: the checkpoint's, in this split's micro-steps
        # On more processes than saved, rank r takes rank r mod saved's states (the data's randomness is per sample).
        ckpt.set_rng_state(state["rng"][self.distributed.rank % len(state["rng"])])
        self.say(f"resuming from {latest}: optimizer step {self.global_step}, epoch {self.position[0]}, "
                 f"batch {self.position[1]}")
        for note in notes:
            self.say(note)

    def _write_run_files(self, init_report: InitReport | None) -> None:
        """config.json, run.json and, after --init, init.json (rank 0)."""
        write_json(self.run_dir / CONFIG_FILE, to_dict(self.cfg))
        write_json(self.run_dir / RUN_FILE, self.run_info)
        if init_report is not None:
            write_json(self.run_dir / INIT_FILE, dataclasses.asdict(init_report))
            for line in [*init_report.lines(), f"init: the report is in {self.run_dir / INIT_FILE}"]:
                self.say(line)

    def _sample_spec(self, mcfg: ModelConfig) -> SampleSpec:
        cfg, metadata = self.cfg, self.dataset.metadata
        return SampleSpec(img_size=mcfg.img_size, patch_size=mcfg.patch_size, modalities=mcfg.modalities,
                          masking=mcfg.masking, augment=cfg.data.augment, ignore_value=metadata.ignore_value,
                          seed=cfg.seed, epochs=cfg.epochs, instance_offset_unit=mcfg.offset_unit_pixels,
                          num_semantic_classes=metadata.num_semantic_classes)

    def _data_config(self) -> DataConfig:
        """The loader's config: data.batch_size is the allocation's per-process micro-batch."""
        return dataclasses.replace(self.cfg.data, batch_size=self.allocation.per_gpu)

    def banner(self, steps_per_epoch: int) -> str:
        """What this start trains with (training/allocation.py); `steps_per_epoch` in micro-steps."""
        cfg, alloc = self.cfg, self.allocation
        rule = "optim.lr, fixed" if cfg.optim.lr is not None else \
            f"base_lr {cfg.optim.base_lr:g} x {alloc.global_batch} / 256"
        if self.device.type != "cuda":
            precision = "fp32 (no autocast off a GPU)"
        else:
            precision = f"{cfg.precision}" + (" autocast" if cfg.precision != "fp32" else "") + \
                (", semantic head in fp32" if cfg.precision != "fp32" and cfg.model.semantic_head_fp32 else "")
        clip = f"gradient norm clipped at {cfg.optim.clip_grad:g}" if cfg.optim.clip_grad is not None \
            else "no gradient clipping"
        return banner(cfg.name, alloc, self.peak_lr, rule, cfg.optim.warmup_epochs, cfg.epochs,
                      steps_per_epoch // alloc.accum, cfg.data.num_workers, f"{precision}; {clip}")

    def say(self, line: str) -> None:
        """A line for the user on stderr (rank 0 only), beside the progress bar."""
        if self.main:
            tqdm.write(line, file=sys.stderr)

    def show(self, block: str) -> None:
        """The start's banner on stdout (rank 0 only): stderr keeps warnings and the one-sentence errors."""
        if self.main:
            tqdm.write(block, file=sys.stdout)

    # Schedule ------------------------------------------------------------------------------------

    def progress_at(self, epoch: int, step: int) -> float:
        """Fractional training progress in [0, 1] at micro-step `step` of `epoch` (what the schedules read)."""
        if epoch not in self.epoch_steps:
            self.epoch_steps[epoch] = self.loader.stream.steps(epoch) if epoch < self.cfg.epochs else 1
        return (epoch + step / self.epoch_steps[epoch]) / self.cfg.epochs

    def set_lr(self, lr: float) -> None:
        self.lr = lr
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    def masking_weights(self, progress: float) -> torch.Tensor:
        """The curriculum's strategy weights for the next optimizer step (logged with it)."""
        weights = self.curriculum.weights(progress)
        self.strategies.record_weights(self.global_step + 1, weights)
        return weights

    # Step ----------------------------------------------------------------------------------------

    def forward_backward(self, inputs: dict[str, torch.Tensor], sync: bool) -> PretrainOutput:
        """Forward and backward one micro-batch; DDP syncs the gradients only when `sync` (the step's last)."""
        no_sync = self.train_model.no_sync() if not sync and self.distributed.world_size > 1 \
            else contextlib.nullcontext()
        with no_sync:
            with torch.autocast(self.device.type, dtype=self.autocast_dtype, enabled=self.autocast_dtype is not None):
                out = self.train_model(inputs)
            self.scaler.scale(out.loss / self.accum_steps).backward()
        return out

    def keep_losses(self, out: PretrainOutput, inputs: dict[str, torch.Tensor], epoch: int, step: int) -> None:
        """Keep the micro-batch's loss terms on the device (read every log_every steps, before checkpoints
        and at the end: `check_losses`), with its per-strategy losses for the logs and the curriculum."""
        self.strategies.add(out.strategy, inputs["strategy_requested"], out.sample_terms, out.sample_loss)
        if self.meter is None or self.meter.names[1:] != tuple(out.terms):
            self.check_losses()
            self.meter = LossMeter(["loss", *out.terms])
        self.meter.add(torch.stack([out.loss.detach().float(), *[t.detach().float() for t in out.terms.values()]]),
                       MicroStep(self.global_step + 1, epoch, step,
                                 inputs["index"] if self.samples_log is not None else None))
        self.window["samples"] += inputs["rgb"].shape[0] * self.distributed.world_size

    def optimizer_step(self, measure_norm: bool) -> torch.Tensor | None:
        """Step the optimizer; returns the gradient norm before clipping (a device tensor) when clipping or
        `measure_norm` asks for it, else None. An adaptive curriculum then sees the step's losses."""
        grad_norm, clip = None, self.cfg.optim.clip_grad
        if clip is not None or measure_norm:
            self.scaler.unscale_(self.optimizer)  # fp16: the true gradients (scaler.step does not unscale twice)
            # An infinite max norm only measures (the gradients are scaled by 1); any torch >= 2.3 has it.
            grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), clip if clip is not None else math.inf)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        step_loss, step_count = self.strategies.end_step()
        if self.curriculum.adaptive is not None:  # every rank sees the same sums, so all draw with the same weights
            self.curriculum.update(mean_over_ranks(step_loss, self.distributed),
                                   mean_over_ranks(step_count, self.distributed))
        return grad_norm

    def advance(self, epoch: int, step: int) -> None:
        """Count the optimizer step that ended at micro-step `step` of `epoch`; the next position to load."""
        self.global_step += 1
        self.position = (epoch, step + 1) if step + 1 < self.epoch_steps[epoch] else (epoch + 1, 0)
        self.bar.update(1)

    # Logs ----------------------------------------------------------------------------------------

    def check_losses(self) -> None:
        """Read the losses since the last check (one sync), write the samples log, stop on a non-finite one."""
        try:
            steps = self.meter.check(lambda values: mean_over_ranks(values, self.distributed)) \
                if self.meter is not None else []
        except NonFiniteLoss as err:  # the amendments that resume it more carefully: half the lr, in fp32
            optim, fp32 = self.cfg.optim, self.cfg.precision == "fp32"
            amend = [f"optim.lr={optim.lr / 2:g}" if optim.lr is not None else f"optim.base_lr={optim.base_lr / 2:g}",
                     *([] if fp32 else ["precision=fp32"])]
            raise DivergedError(f"{err}. The run stopped: nothing was saved after its last checkpoint, which "
                                f"can go on at half the learning rate{'' if fp32 else ' in fp32'}", amend) from None
        if self.samples_log is not None and steps:
            with writing(self.samples_log.name):
                for s in steps:
                    self.samples_log.write(json.dumps({"optimizer_step": s.optimizer_step, "epoch": s.epoch,
                                                       "step": s.batch, "index": s.index,
                                                       "loss": dict(zip(self.meter.names, s.values))}) + "\n")
        if steps:
            self.last = dict(self.meter.last)
            self.bar.set_postfix(epoch=steps[-1].epoch, loss=f"{self.last['loss']:.4f}", lr=f"{self.lr:.2e}",
                                 refresh=False)

    def log(self, epoch: int, step: int, inputs: dict[str, torch.Tensor], grad_norm: torch.Tensor) -> None:
        """TensorBoard scalars of the steps since the last log: losses, lr, strategy mix, speed."""
        self.check_losses()
        elapsed = time.perf_counter() - self.window["start"]
        mix, per_step = self.strategies.scalars()
        for logged_step, values in per_step:
            self.monitor.scalars(logged_step, values)
        self.monitor.scalars(self.global_step, {
            **{f"loss/{n}": v for n, v in self.last.items()}, "lr": self.lr, **mix,
            **(step_scalars(grad_norm, self.scaler, self.device) if self.main else {}),
            "perf/images_per_s": self.window["samples"] / elapsed, "perf/data_wait_share": self.window["wait"] / elapsed,
            "epoch": epoch + (step + 1) / self.epoch_steps[epoch]})
        self.window = {"samples": 0, "wait": 0.0, "start": time.perf_counter()}

    def grad_share_due(self) -> bool:
        """Whether this optimizer step logs gradient shares: every grad_share_every steps (0: every log step)."""
        cfg = self.cfg
        return cfg.log_grad_share and self.global_step % (cfg.grad_share_every or cfg.log_every) == 0

    def log_grad_share(self, inputs: dict[str, torch.Tensor]) -> None:
        """Each weighted loss term's share of the gradient on the encoder's output tokens, on the step's last
        micro-batch (rank 0: a decoder forward and one decoder backward per term; the other ranks wait for it at
        the next step's all-reduce, so it costs the whole run that time: docs/training.md, Cadence)."""
        modalities = self.model.cfg.modalities
        if not self.main or len(modalities) < 2:
            return
        with torch.autocast(self.device.type, dtype=self.autocast_dtype, enabled=self.autocast_dtype is not None):
            norms = self.model.term_gradient_norms(inputs).tolist()
        self.monitor.scalars(self.global_step, {f"grad_share/{m}": n / max(sum(norms), 1e-30)
                                                for m, n in zip(modalities, norms)})

    def figure(self, inputs: dict[str, torch.Tensor], out: PretrainOutput) -> None:
        recon = self.model.reconstruct(inputs, out)
        self.monitor.figure(self.global_step, reconstruction_figure(inputs, recon, self.model.visible_mask(out)))

    # Checkpoints -----------------------------------------------------------------------------------

    def keeps(self, position: tuple[int, int]) -> bool:
        """Whether (epoch, step) ends an epoch whose checkpoint is kept for good (keep_every_epochs)."""
        every = self.cfg.keep_every_epochs
        return every > 0 and position[1] == 0 and position[0] > 0 and position[0] % every == 0

    def position_state(self, epoch: int, step: int) -> dict:
        """The data position (epoch, micro-`step` of this split) as a checkpoint holds it: also in global samples
        done in the epoch, with the layout the epoch is dealt in, which any allocation of the global batch reads."""
        layout = self.loader.stream.layout_of(epoch)
        return {"epoch": epoch, "step": step, "samples": step // self.accum_steps * self.allocation.global_batch,
                "layout": dataclasses.asdict(layout)}

    def save(self, epoch: int, step: int) -> Path | None:
        """Checkpoint the run at data position (epoch, step) (in the background with checkpoint_async), and keep
        it for good if the position ends a kept epoch; returns the file on rank 0."""
        states = gather(ckpt.rng_state(), self.distributed)
        self.saved_at, self.saved_time = self.global_step, time.monotonic()
        if not self.main:
            return None
        kept = ckpt.kept_path(self.run_dir, epoch) if self.keeps((epoch, step)) else None
        progress = self.progress_at(epoch, step)
        weights = torch.as_tensor(self.curriculum.weights(progress), dtype=torch.float64).tolist()
        return self.writer.save({
            "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict(), "schedule": {"lr": self.optimizer.param_groups[0]["lr"],
                                                             "peak_lr": self.peak_lr},
            "curriculum": {"progress": progress, "weights": weights, "adaptive": self.curriculum.state_dict()},
            "position": self.position_state(epoch, step), "global_step": self.global_step, "rng": states,
            "config": json.dumps(to_dict(self.cfg)), "run": json.dumps(self.run_info), "last": self.last,
        }, self.run_dir, self.global_step, self.cfg.keep_checkpoints,
            then=(lambda path: ckpt.keep_checkpoint(path, kept)) if kept is not None else None)

    def checkpoint(self) -> None:
        """Check the losses (never save after a non-finite one), save at the current position, keep an epoch's."""
        self.check_losses()
        self.save(*self.position)

    def checkpoint_due(self) -> bool:
        """Whether checkpoint_minutes have passed since the last checkpoint, by rank 0's clock (every rank
        gets its answer: the loop asks at log steps, where the ranks already synchronise)."""
        minutes = self.cfg.checkpoint_minutes
        return minutes > 0 and gather(time.monotonic() - self.saved_time >= 60 * minutes, self.distributed)[0]

    def finish(self) -> dict:
        """After the last step: read the last losses, save unless just saved, write summary.json, close the logs;
        returns the summary. Ranks whose parameters differ (DDP lost synchronisation) raise RunError."""
        self.check_losses()
        self.bar.close()
        if self.saved_at != self.global_step:
            self.save(*self.position)
        self.writer.close()  # the last checkpoint is on disk before the summary says the run is done
        hashes = gather(param_hash(self.model), self.distributed)
        summary = {"global_step": self.global_step, "position": list(self.position), "last": self.last,
                   "param_sha256": hashes}
        if self.main:
            write_json(self.run_dir / SUMMARY_FILE, summary)
        if self.samples_log is not None:
            self.samples_log.close()
        self.monitor.close()
        if len(set(hashes)) > 1:
            raise RunError("ranks ended with different parameters; DDP lost synchronisation (report this as a bug).")
        return summary

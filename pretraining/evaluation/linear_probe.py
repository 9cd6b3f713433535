"""MAE's linear-probe protocol: a head on the frozen encoder, trained on augmented images.

As MAE's `main_linprobe.py`: the encoder is frozen and in eval mode; its class token after the
final norm (`pool="avg"`: the mean patch token) goes through BatchNorm without affine and a linear
layer (weights N(0, 0.01)); every epoch draws new RandomResizedCrop + flip views; LARS (weight
decay 0, momentum 0.9) at lr 0.1 x batch / 256 with a global batch of 16384, 10 warm-up epochs,
then cosine to 0 per step; 90 epochs; top-1 on the evaluation transform (resize 256, centre crop
224). Resumable like fine-tuning: `checkpoint.pt` holds the head and optimiser after every epoch
and a rerun continues from it. `probe.py` keeps the fast cached-feature variant.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import asdict, dataclass

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from timm.data import create_transform
from timm.scheduler import CosineLRScheduler
from torch.utils.data import DataLoader, DistributedSampler, RandomSampler
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm

from pretraining.evaluation.finetune import (
    CHECKPOINT,
    RunError,
    evaluate_classifier,
    load_checkpoint,
    model_data_config,
    rank_world,
    save_checkpoint,
    seed_epoch,
)
from pretraining.evaluation.folders import ClassificationSet, EvalData, Subset
from pretraining.evaluation.probe import head_optimizer, linear_head
from pretraining.evaluation.transforms import linear_probe_transform


@dataclass(frozen=True)
class MaeProbeConfig:
    """Defaults: MAE's linear probe of a ViT-B (`main_linprobe.py`)."""

    epochs: int = 90
    batch_size: int = 16384  # global: per device x devices x accum_steps
    accum_steps: int = 1
    base_lr: float = 0.1  # lr = base_lr * batch_size / 256
    optimizer: str = "lars"  # or "sgd"
    weight_decay: float = 0.0
    momentum: float = 0.9
    warmup_epochs: int = 10
    pool: str = "token"  # "token": class token after the final norm (MAE's for ViT); "avg": mean patch token
    seed: int = 0
    num_workers: int = 10


def mae() -> MaeProbeConfig:
    return MaeProbeConfig()


def tiny() -> MaeProbeConfig:
    """CPU twin: 20 epochs of batch 8 with LARS at MAE's lr (6.4), so the trust ratio moves the head."""
    return MaeProbeConfig(epochs=20, batch_size=8, base_lr=6.4 * 256 / 8, warmup_epochs=2, num_workers=0)


RECIPES = {"mae": mae, "tiny": tiny}


class FrozenEncoderProbe(nn.Module):
    """images (B, 3, H, W) -> logits (B, C): a frozen timm encoder (pooled features (B, D), no
    gradients, always in eval mode) under MAE's probe head."""

    def __init__(self, encoder: nn.Module, num_classes: int):
        super().__init__()
        self.encoder = encoder.requires_grad_(False)
        self.head = linear_head(encoder.num_features, num_classes)

    def train(self, mode: bool = True):
        super().train(mode)
        self.encoder.eval()
        return self

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            feats = self.encoder(images)  # (B, D)
        return self.head(feats.float())


def train_frozen_probe(model: FrozenEncoderProbe, data: EvalData, cfg: MaeProbeConfig, output: str | None,
                       device: torch.device, progress: bool = True) -> dict:
    """Train `model.head` for cfg.epochs on data.train (resuming from `output` when given) and return
    top-1 / top-5 (percent) on data.val."""
    rank, world = rank_world()
    if cfg.batch_size % (world * cfg.accum_steps):
        raise RunError(f"batch_size {cfg.batch_size} is not divisible by devices x accum_steps = "
                       f"{world * cfg.accum_steps}; change --set batch_size or accum_steps")
    local_batch = cfg.batch_size // (world * cfg.accum_steps)
    data_config = model_data_config(model.encoder)
    train_set = ClassificationSet(data.train, linear_probe_transform(data_config["input_size"][-1],
                                                                      data_config["mean"], data_config["std"]))
    val_set = ClassificationSet(Subset(data.val, range(rank, len(data.val), world)),
                                create_transform(**data_config, is_training=False))
    generator = torch.Generator()
    sampler = (DistributedSampler(train_set, world, rank, shuffle=True, seed=cfg.seed, drop_last=True)
               if world > 1 else RandomSampler(train_set, generator=generator))
    train_loader = DataLoader(train_set, local_batch, sampler=sampler, num_workers=cfg.num_workers, drop_last=True,
                              pin_memory=device.type == "cuda", generator=generator)
    val_loader = DataLoader(val_set, min(local_batch, 256), num_workers=cfg.num_workers)
    updates_per_epoch = len(train_loader) // cfg.accum_steps
    if updates_per_epoch == 0:
        raise RunError(f"{len(train_set)} training images make no batch of {cfg.batch_size}; lower --set batch_size")

    model.to(device)
    optimizer = head_optimizer(model.head, cfg.optimizer, cfg.base_lr * cfg.batch_size / 256, cfg.momentum,
                               cfg.weight_decay)
    warmup = cfg.warmup_epochs * updates_per_epoch
    scheduler = CosineLRScheduler(optimizer, t_initial=max(1, cfg.epochs * updates_per_epoch - warmup), lr_min=0.0,
                                  warmup_t=warmup, warmup_lr_init=0.0, warmup_prefix=True, t_in_epochs=False)
    config = {**asdict(cfg), "classes": len(data.class_names), "train_samples": len(data.train)}
    start = 0
    path = os.path.join(output, CHECKPOINT) if output else None
    if path:
        os.makedirs(output, exist_ok=True)
        state = load_checkpoint(path, config)
        if state is not None:
            model.head.load_state_dict(state["head"])
            optimizer.load_state_dict(state["optimizer"])
            start = state["epoch"]
    net = nn.parallel.DistributedDataParallel(model) if world > 1 else model
    writer = SummaryWriter(os.path.join(output, "tb")) if output and rank == 0 else None
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")
    for epoch in range(start, cfg.epochs):
        seed_epoch(cfg.seed, epoch, rank)
        generator.manual_seed(cfg.seed + epoch)
        if world > 1:
            sampler.set_epoch(epoch)
        net.train()
        total = 0.0
        bar = tqdm(train_loader, desc=f"linear probe {epoch + 1}/{cfg.epochs}", leave=False,
                   disable=not (progress and rank == 0))
        for i, (images, labels) in enumerate(bar):
            step = epoch * updates_per_epoch + i // cfg.accum_steps
            if step >= (epoch + 1) * updates_per_epoch:
                break  # a trailing partial accumulation group
            last_micro = (i + 1) % cfg.accum_steps == 0
            with autocast, (net.no_sync() if world > 1 and not last_micro else contextlib.nullcontext()):
                loss = F.cross_entropy(net(images.to(device, non_blocking=True)), labels.to(device))
                (loss / cfg.accum_steps).backward()
            if last_micro:
                scheduler.step_update(step)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            total += loss.item()
        if writer is not None:
            writer.add_scalar("train/loss", total / max(len(train_loader), 1), epoch + 1)
            writer.add_scalar("train/lr", optimizer.param_groups[0]["lr"], epoch + 1)
        if path and rank == 0:
            save_checkpoint(path, {"head": model.head.state_dict(), "optimizer": optimizer.state_dict(),
                                   "epoch": epoch + 1, "config": config})
        if world > 1:
            dist.barrier()
    metrics = evaluate_classifier(model, val_loader, device)
    if writer is not None:
        writer.add_scalar("val/top1", metrics["top1"], cfg.epochs)
        writer.close()
    return {"top1": metrics["top1"], "top5": metrics["top5"], "epochs": cfg.epochs}

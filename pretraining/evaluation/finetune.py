"""End-to-end classification fine-tuning of a timm ViT with MAE's recipe, resumable, single device or DDP.

Everything comes from timm: layer-wise lr decay (`create_optimizer_v2(layer_decay=...)`), RandAugment
and random erasing (`create_transform`), mixup/cutmix with label smoothing (`Mixup` +
`SoftTargetCrossEntropy`), per-step cosine schedule with warm-up (`CosineLRScheduler`), drop path
(`drop_path_rate` at model creation). The run directory holds `checkpoint.pt` (written atomically
after every epoch; rerunning the same command resumes from it), `config.json`, TensorBoard logs under
`tb/`, `metrics.json` and the fine-tuned classifier as a timm folder in `model/`.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
from PIL import ImageOps
from timm.data import Mixup, create_transform, resolve_data_config
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from timm.models import save_for_hf
from timm.optim import create_optimizer_v2
from timm.scheduler import CosineLRScheduler
from torch.utils.data import DataLoader, DistributedSampler, RandomSampler
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm

from pretraining.evaluation.folders import ClassificationSet, EvalData, Subset


@dataclass(frozen=True)
class FinetuneConfig:
    """Defaults: MAE's ViT-B ImageNet fine-tuning recipe."""

    epochs: int = 100
    batch_size: int = 1024  # global: per device x devices x accum_steps
    accum_steps: int = 1
    base_lr: float = 5e-4  # lr = base_lr * batch_size / 256
    min_lr: float = 1e-6
    warmup_epochs: int = 5
    weight_decay: float = 0.05
    beta1: float = 0.9
    beta2: float = 0.999
    layer_decay: float = 0.65
    drop_path: float = 0.1
    mixup: float = 0.8
    cutmix: float = 1.0
    label_smoothing: float = 0.1
    auto_augment: str = "rand-m9-mstd0.5-inc1"
    reprob: float = 0.25
    global_pool: str = "avg"  # MAE fine-tunes on the mean patch token (with a fresh fc_norm)
    head_init_std: float = 2e-5  # the new classifier's weights: truncated normal of this std, bias 0 (MAE's)
    img_size: int = 224
    clip_grad: float = 0.0  # 0 = no clipping (MAE's default)
    seed: int = 0
    num_workers: int = 10


def finetune_vit_base() -> FinetuneConfig:
    return FinetuneConfig()


def finetune_vit_large() -> FinetuneConfig:
    return FinetuneConfig(epochs=50, base_lr=1e-3, layer_decay=0.75, drop_path=0.2)


def finetune_tiny() -> FinetuneConfig:
    """CPU twin: a few epochs of batch 16 at 32 px."""
    return FinetuneConfig(epochs=2, batch_size=16, base_lr=1e-3, warmup_epochs=1, layer_decay=0.75,
                          img_size=32, num_workers=0)


RECIPES = {"vit_base": finetune_vit_base, "vit_large": finetune_vit_large, "tiny": finetune_tiny}

CHECKPOINT = "checkpoint.pt"


class RunError(ValueError):
    """A run that cannot start as configured; the message says what to change."""

# Settings that may change between a run and its resumption without changing the result.
RESUMABLE_CHANGES = ("num_workers",)
# Settings added after runs were written, with the value those runs had: an older checkpoint is read as
# having run with it, so resuming it under today's default is refused, and `--set KEY=OLD` resumes it.
ADDED_SETTINGS = {"head_init_std": 0.02, "roi_aligned": False}


def save_checkpoint(path: str, state: dict) -> None:
    """torch.save to a temporary sibling, then rename: a crash never leaves a half-written checkpoint."""
    tmp = os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def load_checkpoint(path: str, config: dict) -> dict | None:
    """The checkpoint at `path` if there is one, after checking it was written with `config`."""
    if not os.path.isfile(path):
        return None
    state = torch.load(path, map_location="cpu", weights_only=True)
    written = {**{k: v for k, v in ADDED_SETTINGS.items() if k in config}, **state["config"]}
    changed = [k for k, v in config.items() if k not in RESUMABLE_CHANGES and written.get(k) != v]
    if changed:
        k = changed[0]
        before = f" (it predates the setting; --set {k}={written[k]} resumes it)" if k not in state["config"] else ""
        raise RunError(f"{path} was written with {k}={written.get(k)!r}, not {config[k]!r}{before}; rerun with "
                       f"the same settings to resume, or pass a new --output")
    return state


def model_data_config(model: nn.Module) -> dict:
    """timm's preprocessing config (mean, std, interpolation, crop_pct) at the size the model was built
    for (the saved config may name another size)."""
    config = resolve_data_config(model=model)
    size = getattr(getattr(model, "patch_embed", None), "img_size", None)
    if size is not None:
        config["input_size"] = (3, *size)
    return config


def _posterize(img, bits_to_keep, **_):
    """timm's posterize, with Pillow < 13's answer (a black image) for 0 bits, which Pillow 13 refuses."""
    return img.point(lambda _: 0) if bits_to_keep <= 0 else ImageOps.posterize(img, min(int(bits_to_keep), 8))


def pillow13_safe(transform):
    """Point the RandAugment posterize ops of a timm transform at `_posterize`: at magnitude 10,
    "inc1" RandAugment (MAE's) asks for 0 bits, which makes Pillow >= 13 raise mid-epoch."""
    for t in getattr(transform, "transforms", ()):
        for op in getattr(t, "ops", ()):
            if op.name.startswith("Posterize"):
                op.aug_fn = _posterize
    return transform


def rank_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def seed_epoch(seed: int, epoch: int, rank: int) -> None:
    """Seed every RNG an epoch draws from (mixup: numpy; drop path, augmentation: torch/random), so a
    resumed run repeats exactly what an uninterrupted one does."""
    s = seed + 1000 * epoch + rank
    torch.manual_seed(s)
    np.random.seed(s % 2**32)  # noqa: NPY002 (timm's Mixup draws from the legacy global RNG)
    random.seed(s)


@torch.no_grad()
def evaluate_classifier(model: nn.Module, loader: DataLoader, device: torch.device) -> dict[str, float]:
    """Top-1 / top-5 (percent) over the loader, summed over all ranks."""
    model.eval()
    counts = torch.zeros(3, dtype=torch.float64, device=device)  # top-1 hits, top-5 hits, samples
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")
    for images, labels in loader:
        with autocast:
            logits = model(images.to(device, non_blocking=True))
        labels = labels.to(device)
        top = logits.topk(min(5, logits.shape[1]), dim=1).indices
        counts += torch.stack([(top[:, 0] == labels).sum(), (top == labels[:, None]).any(1).sum(),
                               torch.tensor(len(labels), device=device)]).double()
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(counts)
    n = max(counts[2].item(), 1.0)
    return {"top1": 100.0 * counts[0].item() / n, "top5": 100.0 * counts[1].item() / n, "samples": counts[2].item()}


def make_optimizer(model: nn.Module, cfg: FinetuneConfig) -> torch.optim.Optimizer:
    """AdamW with timm's layer-wise lr decay, which gives MAE's scales for a ViT: patch / position embeddings
    and class token decay^(depth + 1), block i decay^(depth - i), fc_norm and head 1; no weight decay on
    1-d parameters, pos_embed and cls_token. Each group's `lr_scale` is applied by timm's scheduler."""
    return create_optimizer_v2(model, "adamw", lr=cfg.base_lr * cfg.batch_size / 256, weight_decay=cfg.weight_decay,
                               layer_decay=cfg.layer_decay, betas=(cfg.beta1, cfg.beta2))


def finetune(model: nn.Module, data: EvalData, cfg: FinetuneConfig, output: str, device: torch.device,
             progress: bool = True) -> dict[str, float]:
    """Fine-tune `model` (a timm classifier with data.class_names outputs) on data.train and score
    it on data.val after every epoch; resumes from `output`/checkpoint.pt when present."""
    rank, world = rank_world()
    if cfg.batch_size % (world * cfg.accum_steps):
        raise RunError(f"batch_size {cfg.batch_size} is not divisible by devices x accum_steps = "
                       f"{world * cfg.accum_steps}; change --set batch_size or accum_steps")
    local_batch = cfg.batch_size // (world * cfg.accum_steps)
    if (cfg.mixup > 0 or cfg.cutmix > 0) and local_batch % 2:
        raise RunError(f"mixup pairs images within a batch, but each device gets {local_batch}; make "
                       f"batch_size / (devices x accum_steps) even")
    num_classes = len(data.class_names)
    data_config = model_data_config(model)
    train_tf = pillow13_safe(create_transform(
        data_config["input_size"], is_training=True, auto_augment=cfg.auto_augment or None, interpolation="bicubic",
        re_prob=cfg.reprob, re_mode="pixel", re_count=1, mean=data_config["mean"], std=data_config["std"]))
    eval_tf = create_transform(**data_config, is_training=False)
    train_set = ClassificationSet(data.train, train_tf)
    val_set = ClassificationSet(Subset(data.val, range(rank, len(data.val), world)), eval_tf)
    generator = torch.Generator()
    sampler = (DistributedSampler(train_set, world, rank, shuffle=True, seed=cfg.seed, drop_last=True)
               if world > 1 else RandomSampler(train_set, generator=generator))
    train_loader = DataLoader(train_set, local_batch, sampler=sampler, num_workers=cfg.num_workers, drop_last=True,
                              pin_memory=device.type == "cuda", generator=generator,
                              persistent_workers=False)  # fresh worker seeds per epoch: exact resume
    val_loader = DataLoader(val_set, local_batch, num_workers=cfg.num_workers, pin_memory=device.type == "cuda")
    updates_per_epoch = len(train_loader) // cfg.accum_steps
    if updates_per_epoch == 0:
        raise RunError(f"{len(train_set)} training images make no full batch of {cfg.batch_size}; lower "
                       f"--set batch_size")

    model.to(device)
    optimizer = make_optimizer(model, cfg)
    warmup = cfg.warmup_epochs * updates_per_epoch
    scheduler = CosineLRScheduler(optimizer, t_initial=max(1, cfg.epochs * updates_per_epoch - warmup),
                                  lr_min=cfg.min_lr, warmup_t=warmup, warmup_lr_init=0.0, warmup_prefix=True,
                                  t_in_epochs=False)
    mixing = cfg.mixup > 0 or cfg.cutmix > 0
    mixup = Mixup(mixup_alpha=cfg.mixup, cutmix_alpha=cfg.cutmix, label_smoothing=cfg.label_smoothing,
                  num_classes=num_classes) if mixing else None
    criterion = (SoftTargetCrossEntropy() if mixing else LabelSmoothingCrossEntropy(cfg.label_smoothing)
                 if cfg.label_smoothing > 0 else nn.CrossEntropyLoss())

    os.makedirs(output, exist_ok=True)
    config = {**asdict(cfg), "num_classes": num_classes, "train_samples": len(data.train)}
    start_epoch, best = 0, 0.0
    state = load_checkpoint(os.path.join(output, CHECKPOINT), config)
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        start_epoch, best = state["epoch"], state["best_top1"]
    if rank == 0:
        with open(os.path.join(output, "config.json"), "w") as f:
            json.dump(config, f, indent=2)
    net = nn.parallel.DistributedDataParallel(model) if world > 1 else model
    writer = SummaryWriter(os.path.join(output, "tb")) if rank == 0 else None
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")
    metrics = {"top1": float("nan"), "top5": float("nan")}

    for epoch in range(start_epoch, cfg.epochs):
        seed_epoch(cfg.seed, epoch, rank)
        generator.manual_seed(cfg.seed + epoch)
        if world > 1:
            sampler.set_epoch(epoch)
        net.train()
        total, count = 0.0, 0
        bar = tqdm(train_loader, desc=f"epoch {epoch + 1}/{cfg.epochs}", disable=not (progress and rank == 0),
                   leave=False)
        for i, (images, labels) in enumerate(bar):
            step = epoch * updates_per_epoch + i // cfg.accum_steps
            if step >= (epoch + 1) * updates_per_epoch:
                break  # a trailing partial accumulation group
            images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
            if mixup is not None:
                images, labels = mixup(images, labels)
            last_micro = (i + 1) % cfg.accum_steps == 0
            # DDP all-reduces gradients only on the micro-batch that completes an update.
            with autocast, (net.no_sync() if world > 1 and not last_micro else contextlib.nullcontext()):
                loss = criterion(net(images), labels)
                (loss / cfg.accum_steps).backward()
            if last_micro:
                if cfg.clip_grad > 0:
                    nn.utils.clip_grad_norm_(model.parameters(), cfg.clip_grad)
                scheduler.step_update(step)  # lr for this update (timm applies each group's layer-decay scale)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            total, count = total + loss.item(), count + 1
            bar.set_postfix(loss=f"{loss.item():.3f}")
        metrics = evaluate_classifier(model, val_loader, device)
        best = max(best, metrics["top1"])
        if rank == 0:
            writer.add_scalar("train/loss", total / max(count, 1), epoch + 1)
            writer.add_scalar("train/lr", max(g["lr"] for g in optimizer.param_groups), epoch + 1)
            writer.add_scalar("val/top1", metrics["top1"], epoch + 1)
            writer.add_scalar("val/top5", metrics["top5"], epoch + 1)
            writer.flush()
            print(f"epoch {epoch + 1}/{cfg.epochs}: loss {total / max(count, 1):.4f}  "
                  f"val top-1 {metrics['top1']:.2f}  top-5 {metrics['top5']:.2f}", flush=True)
            save_checkpoint(os.path.join(output, CHECKPOINT), {
                "model": model.state_dict(), "optimizer": optimizer.state_dict(), "epoch": epoch + 1,
                "best_top1": best, "config": config, "metrics": metrics})
        if world > 1:
            dist.barrier()
    if state is not None and start_epoch == cfg.epochs:
        metrics = evaluate_classifier(model, val_loader, device)  # a finished run, asked again
    result = {"top1": metrics["top1"], "top5": metrics["top5"], "best_top1": best, "epochs": cfg.epochs}
    if rank == 0:
        save_for_hf(model, os.path.join(output, "model"), safe_serialization=True)
        with open(os.path.join(output, "metrics.json"), "w") as f:
            json.dump(result, f, indent=2)
        writer.close()
    return result

"""Semantic segmentation probe: a light head on a ViT's patch features, scored by mIoU.

The head is BatchNorm + a 1x1 convolution over the concatenated patch tokens of the encoder's last
`layers` blocks, upsampled bilinearly to the image (the linear probe of dense features). The encoder
stays frozen, or is fine-tuned with layer-wise lr decay (`finetune_encoder`). Evaluation slides
crop-sized windows over each image resized to a short side of `crop_size` and scores the prediction
at the label's own resolution. Runs are resumable: the run directory holds `checkpoint.pt`.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from timm.optim import create_optimizer_v2, param_groups_layer_decay, param_groups_weight_decay
from timm.scheduler import CosineLRScheduler
from torch.utils.data import DataLoader
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm

from pretraining.evaluation.finetune import (
    CHECKPOINT,
    RunError,
    load_checkpoint,
    model_data_config,
    rank_world,
    save_checkpoint,
    seed_epoch,
)
from pretraining.evaluation.folders import EvalData, SegmentationSet, Subset, segmentation_transform


@dataclass(frozen=True)
class SegmentConfig:
    crop_size: int = 512
    iterations: int = 40000
    batch_size: int = 16  # global
    lr: float = 1e-3
    min_lr: float = 0.0
    weight_decay: float = 1e-4
    warmup_iters: int = 1500
    layers: int = 4  # patch tokens of the last `layers` blocks, concatenated
    finetune_encoder: bool = False
    layer_decay: float = 0.65  # only with finetune_encoder
    scale_min: float = 0.5  # random rescale of the short side, relative to crop_size
    scale_max: float = 2.0
    checkpoint_every: int = 1000
    eval_every: int = 0  # also score mIoU every N iterations (a multiple of checkpoint_every); 0: only at the end
    seed: int = 0
    num_workers: int = 8


def segment_linear() -> SegmentConfig:
    """Frozen encoder, linear head: ADE20K at 512 px, 40k iterations of batch 16."""
    return SegmentConfig()


def segment_finetune() -> SegmentConfig:
    """Encoder fine-tuned with layer decay 0.65 under the same light head."""
    return SegmentConfig(lr=1e-4, weight_decay=0.05, finetune_encoder=True)


def segment_tiny() -> SegmentConfig:
    return SegmentConfig(crop_size=64, iterations=60, batch_size=8, lr=1e-2, warmup_iters=5, layers=2,
                         checkpoint_every=30, num_workers=0)


RECIPES = {"linear": segment_linear, "finetune": segment_finetune, "tiny": segment_tiny}


def confusion_matrix(pred: torch.Tensor, target: torch.Tensor, num_classes: int,
                     ignore_index: int = -1) -> torch.Tensor:
    """pred, target: integer maps of the same shape -> (C, C) int64 counts, rows = truth, columns =
    prediction. Pixels whose target is `ignore_index` are skipped."""
    keep = target != ignore_index
    t, p = target[keep].long(), pred[keep].long()
    if t.numel() and (t.min() < 0 or t.max() >= num_classes or p.min() < 0 or p.max() >= num_classes):
        raise ValueError(f"class ids must lie in [0, {num_classes}) or equal the ignore value {ignore_index}; "
                         f"got targets in [{t.min()}, {t.max()}] and predictions in [{p.min()}, {p.max()}]")
    return torch.bincount(t * num_classes + p, minlength=num_classes**2).reshape(num_classes, num_classes)


def class_iou(conf: torch.Tensor) -> torch.Tensor:
    """(C, C) confusion -> (C,) IoU = TP / (TP + FP + FN), NaN for a class absent from both truth
    and prediction (it has no union, so no IoU)."""
    conf = conf.double()
    tp = conf.diag()
    union = conf.sum(0) + conf.sum(1) - tp
    return torch.where(union > 0, tp / union.clamp(min=1), torch.full_like(tp, float("nan")))


def mean_iou(conf: torch.Tensor) -> float:
    """mIoU in percent over the classes that have a union (present in truth or prediction)."""
    iou = class_iou(conf)
    return 100.0 * iou.nanmean().item() if not iou.isnan().all() else float("nan")


def pixel_accuracy(conf: torch.Tensor) -> float:
    return 100.0 * conf.diag().sum().item() / max(conf.sum().item(), 1)


class SegmentationProbe(nn.Module):
    """images (B, 3, H, W) -> logits (B, C, H, W) from a timm ViT's patch tokens."""

    def __init__(self, encoder: nn.Module, num_classes: int, layers: int = 4, frozen: bool = True):
        super().__init__()
        self.encoder, self.layers, self.frozen = encoder, layers, frozen
        dim = encoder.embed_dim * layers
        self.head = nn.Sequential(nn.BatchNorm2d(dim), nn.Conv2d(dim, num_classes, kernel_size=1))
        if frozen:
            self.encoder.requires_grad_(False)
        for unused in ("fc_norm", "head"):  # a fine-tuned classifier's pooling norm and head play no part here
            if isinstance(getattr(encoder, unused, None), nn.Module):
                getattr(encoder, unused).requires_grad_(False)

    def train(self, mode: bool = True):
        super().train(mode)
        if self.frozen:
            self.encoder.eval()  # no drop path or dropout in a frozen encoder
        return self

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """images (B, 3, H, W) -> logits (B, C, H, W)."""
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.frozen):
            feats = self.encoder.forward_intermediates(images, indices=self.layers, norm=True, output_fmt="NCHW",
                                                       intermediates_only=True)  # layers x (B, D, h, w)
        logits = self.head(torch.cat(feats, dim=1))  # (B, C, h, w)
        return F.interpolate(logits, size=images.shape[-2:], mode="bilinear", align_corners=False)


def window_starts(length: int, crop: int, stride: int) -> list[int]:
    """Start offsets of crop-sized windows covering [0, length) (the last one flush with the end)."""
    n = max(math.ceil((length - crop) / stride), 0) + 1
    return sorted({min(i * stride, length - crop) for i in range(n)})


@torch.no_grad()
def slide_logits(model: nn.Module, image: torch.Tensor, crop: int, stride: int) -> torch.Tensor:
    """image (1, 3, H, W) -> logits (1, C, H, W): resize to short side `crop`, average the logits of
    overlapping crop x crop windows, resize back."""
    h, w = image.shape[-2:]
    s = crop / min(h, w)
    hh, ww = max(crop, round(h * s)), max(crop, round(w * s))
    x = F.interpolate(image, size=(hh, ww), mode="bilinear", align_corners=False)
    boxes = [(y, x0) for y in window_starts(hh, crop, stride) for x0 in window_starts(ww, crop, stride)]
    out = model(torch.cat([x[..., y:y + crop, x0:x0 + crop] for y, x0 in boxes]))  # (windows, C, crop, crop)
    logits = out.new_zeros(1, out.shape[1], hh, ww)
    count = out.new_zeros(1, 1, hh, ww)
    for (y, x0), win in zip(boxes, out):
        logits[0, :, y:y + crop, x0:x0 + crop] += win
        count[..., y:y + crop, x0:x0 + crop] += 1
    return F.interpolate(logits / count, size=(h, w), mode="bilinear", align_corners=False)


@torch.no_grad()
def evaluate_segmentation(model: nn.Module, loader: DataLoader, num_classes: int, crop: int,
                          device: torch.device, progress: bool = False) -> torch.Tensor:
    """Confusion matrix (C, C) over every (image, mask) of the loader (batch size 1), summed over ranks."""
    model.eval()
    conf = torch.zeros(num_classes, num_classes, dtype=torch.int64, device=device)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")
    for image, mask in tqdm(loader, desc="mIoU", disable=not progress, leave=False):
        with autocast:
            logits = slide_logits(model, image.to(device), crop, max(1, crop * 2 // 3))
        conf += confusion_matrix(logits.argmax(1), mask.to(device), num_classes)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(conf)
    return conf.cpu()


def _batches(n: int, batch: int, seed: int, rank: int, world: int, start: int, stop: int) -> list[list[int]]:
    """This rank's batches for iterations [start, stop): epoch e is a permutation seeded by seed + e,
    cut into world x batch slices (the last partial one dropped)."""
    per_epoch = n // (batch * world)
    out, perms = [], {}
    for it in range(start, stop):
        epoch, pos = divmod(it, per_epoch)
        if epoch not in perms:
            perms[epoch] = torch.randperm(n, generator=torch.Generator().manual_seed(seed + epoch)).tolist()
        first = (pos * world + rank) * batch
        out.append(perms[epoch][first:first + batch])
    return out


def train_segmentation(probe: SegmentationProbe, data: EvalData, cfg: SegmentConfig, output: str,
                       device: torch.device, progress: bool = True) -> dict:
    """Train `probe` on data.train for cfg.iterations, resuming from `output`; return mIoU metrics on data.val."""
    rank, world = rank_world()
    if cfg.batch_size % world:
        raise RunError(f"batch_size {cfg.batch_size} is not divisible by the {world} devices")
    local_batch, num_classes = cfg.batch_size // world, data.num_semantic_classes
    if len(data.train) < cfg.batch_size:
        raise RunError(f"{len(data.train)} training images make no batch of {cfg.batch_size}; lower --set batch_size")
    data_config = model_data_config(probe.encoder)
    mean, std = data_config["mean"], data_config["std"]
    train_set = SegmentationSet(data.train, segmentation_transform(cfg.crop_size, mean, std, train=True,
                                                                   scale=(cfg.scale_min, cfg.scale_max)))
    val_set = SegmentationSet(Subset(data.val, range(rank, len(data.val), world)),
                              segmentation_transform(cfg.crop_size, mean, std, train=False))
    val_loader = DataLoader(val_set, batch_size=1, num_workers=cfg.num_workers)

    probe.to(device)
    groups = param_groups_weight_decay(probe.head, cfg.weight_decay)
    if cfg.finetune_encoder:
        groups += param_groups_layer_decay(probe.encoder, cfg.weight_decay, probe.encoder.no_weight_decay(),
                                           layer_decay=cfg.layer_decay)
    optimizer = create_optimizer_v2(groups, "adamw", lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = CosineLRScheduler(optimizer, t_initial=max(1, cfg.iterations - cfg.warmup_iters), lr_min=cfg.min_lr,
                                  warmup_t=cfg.warmup_iters, warmup_lr_init=0.0, warmup_prefix=True,
                                  t_in_epochs=False)
    os.makedirs(output, exist_ok=True)
    config = {**asdict(cfg), "num_classes": num_classes, "train_samples": len(data.train)}
    start = 0
    state = load_checkpoint(os.path.join(output, CHECKPOINT), config)
    if state is not None:
        probe.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        start = state["iteration"]
    net = nn.parallel.DistributedDataParallel(probe) if world > 1 else probe
    writer = SummaryWriter(os.path.join(output, "tb")) if rank == 0 else None
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")
    bar = tqdm(total=cfg.iterations, initial=start, desc="segmentation", disable=not (progress and rank == 0))
    it = start
    while it < cfg.iterations:
        # Iterations between checkpoints are one chunk with its own seeds: a resumed run repeats them.
        stop = min(cfg.iterations, (it // cfg.checkpoint_every + 1) * cfg.checkpoint_every)
        seed_epoch(cfg.seed, it, rank)
        generator = torch.Generator().manual_seed(cfg.seed + it)
        loader = DataLoader(train_set, batch_sampler=_batches(len(train_set), local_batch, cfg.seed, rank, world, it,
                                                              stop), num_workers=cfg.num_workers, generator=generator)
        net.train()
        for images, masks in loader:
            scheduler.step_update(it)
            with autocast:
                loss = F.cross_entropy(net(images.to(device)), masks.to(device), ignore_index=-1)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            it += 1
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.3f}")
            if writer is not None and it % 10 == 0:
                writer.add_scalar("train/loss", loss.item(), it)
        if cfg.eval_every and it % cfg.eval_every == 0 and it < cfg.iterations:
            conf = evaluate_segmentation(probe, val_loader, num_classes, cfg.crop_size, device)
            if writer is not None:
                writer.add_scalar("val/mIoU", mean_iou(conf), it)
        if rank == 0:
            save_checkpoint(os.path.join(output, CHECKPOINT), {"model": probe.state_dict(),
                                                               "optimizer": optimizer.state_dict(), "iteration": it,
                                                               "config": config})
        if world > 1:
            dist.barrier()
    bar.close()
    conf = evaluate_segmentation(probe, val_loader, num_classes, cfg.crop_size, device, progress and rank == 0)
    result = {"mIoU": mean_iou(conf), "pixel_accuracy": pixel_accuracy(conf),
              "class_iou": [None if math.isnan(v) else 100.0 * v for v in class_iou(conf).tolist()],
              "iterations": cfg.iterations}
    if rank == 0:
        writer.add_scalar("val/mIoU", result["mIoU"], cfg.iterations)
        writer.close()
        with open(os.path.join(output, "metrics.json"), "w") as f:
            json.dump(result, f, indent=2)
    return result

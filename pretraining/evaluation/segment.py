"""Semantic segmentation of an exported encoder, scored by mIoU: MAE's ADE20K protocol by default.

Two heads share one resumable, iteration-based loop (`loop.py`) and one evaluation:
- `--config upernet` (the default): MAE's ADE20K protocol, BEiT's UperNet on four blocks of the
  fine-tuned encoder, 512 crops, 160k iterations of batch 16, AdamW, layer-wise lr decay 0.65,
  poly schedule (`segmenters.UperNetSegmenter`);
- `--config linear`: the fast probe, BatchNorm + 1x1 convolution on the frozen encoder's last four
  blocks, 40k iterations (`segmenters.LinearSegmenter`).
Evaluation resizes each image to a short side of `crop_size`, averages the logits of crop-sized
windows at stride 2/3 crop (single scale, as mmsegmentation's `slide` mode), and scores the
prediction at the label's own resolution; the confusion matrix is summed over the split and ranks.
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
from timm.optim import create_optimizer_v2, param_groups_weight_decay
from timm.scheduler import CosineLRScheduler, PolyLRScheduler
from torch.utils.data import DataLoader
from tqdm import tqdm

from pretraining.evaluation.finetune import RunError, model_data_config, rank_world
from pretraining.evaluation.folders import EvalData, SegmentationSet, Subset
from pretraining.evaluation.loop import layer_decay_groups, train_iterations
from pretraining.evaluation.segmenters import LinearSegmenter, UperNetSegmenter, parse_blocks
from pretraining.evaluation.transforms import segmentation_transform


@dataclass(frozen=True)
class SegmentConfig:
    """Defaults: MAE's ADE20K recipe (mmsegmentation's `upernet_mae` config for ViT-B)."""

    head: str = "upernet"  # "upernet" (MAE's protocol) or "linear" (the fast probe)
    blocks: str = "3,5,7,11"  # encoder blocks feeding the head; negative counts from the end
    crop_size: int = 512
    iterations: int = 160000
    batch_size: int = 16  # global
    lr: float = 1e-4
    min_lr: float = 0.0
    weight_decay: float = 0.05
    warmup_iters: int = 1500
    schedule: str = "poly"  # "poly" (power 1, as mmsegmentation) or "cosine"
    finetune_encoder: bool = True
    layer_decay: float = 0.65  # only with finetune_encoder
    drop_path: float = 0.1  # only with finetune_encoder
    channels: int = 768  # UperNet width
    aux_channels: int = 256  # auxiliary FCN head width
    aux_weight: float = 0.4
    dropout: float = 0.1  # before the classifiers
    scale_min: float = 0.5  # random rescale of the short side, relative to crop_size
    scale_max: float = 2.0
    cat_max_ratio: float = 0.75  # re-draw crops that one class fills beyond this share (1: off)
    photometric: bool = True  # mmsegmentation's PhotoMetricDistortion
    checkpoint_every: int = 2000
    eval_every: int = 0  # also score mIoU every N iterations (a multiple of checkpoint_every); 0: only at the end
    seed: int = 0
    num_workers: int = 8


def segment_upernet() -> SegmentConfig:
    """MAE's ADE20K protocol (ViT-B): UperNet, 512 crops, 160k x 16, AdamW 1e-4, layer decay 0.65."""
    return SegmentConfig()


def segment_linear() -> SegmentConfig:
    """The fast probe: frozen encoder, BatchNorm + 1x1 conv on its last 4 blocks, 40k x 16."""
    return SegmentConfig(head="linear", blocks="-4,-3,-2,-1", iterations=40000, lr=1e-3, weight_decay=1e-4,
                         schedule="cosine", finetune_encoder=False, drop_path=0.0, cat_max_ratio=1.0,
                         photometric=False, checkpoint_every=1000)


def segment_tiny() -> SegmentConfig:
    """CPU twin of `upernet`: 64 px crops, 40 iterations of batch 8, a 32-wide UperNet."""
    return SegmentConfig(blocks="0,0,1,1", crop_size=64, iterations=40, batch_size=8, lr=1e-3, warmup_iters=5,
                         channels=32, aux_channels=16, checkpoint_every=20, num_workers=0)


def segment_linear_tiny() -> SegmentConfig:
    return SegmentConfig(**{**asdict(segment_linear()), "blocks": "-2,-1", "crop_size": 64, "iterations": 40,
                            "batch_size": 8, "lr": 1e-2, "warmup_iters": 5, "checkpoint_every": 20,
                            "num_workers": 0})


RECIPES = {"upernet": segment_upernet, "linear": segment_linear, "tiny": segment_tiny,
           "linear_tiny": segment_linear_tiny}


def build_segmenter(encoder: nn.Module, num_classes: int, cfg: SegmentConfig) -> nn.Module:
    """The head `cfg.head` on `encoder` (a timm ViT built with drop path cfg.drop_path)."""
    try:
        blocks = parse_blocks(cfg.blocks, len(encoder.blocks))
    except ValueError as err:
        raise RunError(str(err)) from err
    if cfg.head == "upernet":
        if len(blocks) != 4:
            raise RunError(f"UperNet takes 4 blocks (strides 4, 8, 16, 32); --set blocks={cfg.blocks} names "
                           f"{len(blocks)}")
        model = UperNetSegmenter(encoder, num_classes, blocks, cfg.channels, cfg.aux_channels, cfg.aux_weight,
                                 cfg.dropout)
        if not cfg.finetune_encoder:
            model.encoder.requires_grad_(False)
        return model
    if cfg.head == "linear":
        return LinearSegmenter(encoder, num_classes, blocks, frozen=not cfg.finetune_encoder)
    raise RunError(f"--set head={cfg.head!r}: choose upernet or linear")


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


def _scheduler(optimizer, cfg: SegmentConfig):
    if cfg.schedule == "poly":  # mmsegmentation: linear warm-up from 1e-6 x lr, then (1 - t / T) ** 1
        return PolyLRScheduler(optimizer, t_initial=max(1, cfg.iterations), power=1.0, lr_min=cfg.min_lr,
                               warmup_t=cfg.warmup_iters, warmup_lr_init=cfg.lr * 1e-6, t_in_epochs=False)
    if cfg.schedule == "cosine":
        return CosineLRScheduler(optimizer, t_initial=max(1, cfg.iterations - cfg.warmup_iters), lr_min=cfg.min_lr,
                                 warmup_t=cfg.warmup_iters, warmup_lr_init=0.0, warmup_prefix=True,
                                 t_in_epochs=False)
    raise RunError(f"--set schedule={cfg.schedule!r}: choose poly or cosine")


def optimizer_groups(model: nn.Module, weight_decay: float, layer_decay: float | None) -> list[dict]:
    """AdamW groups: the head at the full lr, the encoder with BEiT's layer-wise decay
    (`loop.layer_decay_groups`), or frozen when `layer_decay` is None."""
    groups = param_groups_weight_decay(model.head, weight_decay)
    return groups if layer_decay is None else groups + layer_decay_groups(model.encoder, weight_decay, layer_decay)


def train_segmentation(model: nn.Module, data: EvalData, cfg: SegmentConfig, output: str, device: torch.device,
                       progress: bool = True) -> dict:
    """Train `model` (a segmenter: `.encoder`, `.head`) on data.train for cfg.iterations, resuming
    from `output`; return mIoU metrics on data.val (also written to output/metrics.json)."""
    rank, world = rank_world()
    num_classes = data.num_semantic_classes
    data_config = model_data_config(model.encoder)
    mean, std = data_config["mean"], data_config["std"]
    train_set = SegmentationSet(data.train, segmentation_transform(
        cfg.crop_size, mean, std, train=True, scale=(cfg.scale_min, cfg.scale_max), cat_max_ratio=cfg.cat_max_ratio,
        photometric=cfg.photometric))
    val_set = SegmentationSet(Subset(data.val, range(rank, len(data.val), world)),
                              segmentation_transform(cfg.crop_size, mean, std, train=False))
    val_loader = DataLoader(val_set, batch_size=1, num_workers=cfg.num_workers)

    if world > 1:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)  # 2 images per GPU: statistics over the batch
    model.to(device)
    groups = optimizer_groups(model, cfg.weight_decay, cfg.layer_decay if cfg.finetune_encoder else None)
    optimizer = create_optimizer_v2(groups, "adamw", lr=cfg.lr, weight_decay=cfg.weight_decay)
    config = {**asdict(cfg), "num_classes": num_classes, "train_samples": len(data.train)}

    def evaluate() -> dict[str, float]:
        return {"mIoU": mean_iou(evaluate_segmentation(model, val_loader, num_classes, cfg.crop_size, device))}

    train_iterations(model, optimizer, _scheduler(optimizer, cfg), train_set,
                     lambda net, batch: net(batch[0].to(device, non_blocking=True), batch[1].to(device)),
                     iterations=cfg.iterations, batch_size=cfg.batch_size, checkpoint_every=cfg.checkpoint_every,
                     output=output, config=config, device=device, seed=cfg.seed, num_workers=cfg.num_workers,
                     eval_every=cfg.eval_every, evaluate=evaluate, name="segmentation", progress=progress)
    conf = evaluate_segmentation(model, val_loader, num_classes, cfg.crop_size, device, progress and rank == 0)
    result = {"mIoU": mean_iou(conf), "pixel_accuracy": pixel_accuracy(conf),
              "class_iou": [None if math.isnan(v) else 100.0 * v for v in class_iou(conf).tolist()],
              "iterations": cfg.iterations}
    if rank == 0:
        with open(os.path.join(output, "metrics.json"), "w") as f:
            json.dump(result, f, indent=2)
    return result

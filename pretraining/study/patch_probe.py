"""Per-patch linear probe for semantic segmentation on cached frozen features, scored by mIoU.

The linear counterpart of the image-level probe: a BatchNorm without affine (MAE's feature
whitening) and one linear map from each patch token to class logits, upsampled bilinearly to
the label map, trained with cross-entropy on cached features. It measures how linearly a frozen
encoder's patch tokens carry the scene's semantics (pretraining/study/ablations.py), and costs seconds.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from pretraining.evaluation.segment import confusion_matrix, mean_iou


@dataclass(frozen=True)
class PatchProbeConfig:
    epochs: int = 30
    batch_size: int = 64  # images per step
    lr: float = 1e-2  # AdamW, cosine to 0
    weight_decay: float = 1e-4
    seed: int = 0


def _logits(head: nn.Module, feats: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """feats (B, h, w, D) -> logits (B, C, H, W)."""
    B, h, w, D = feats.shape
    x = head[0](feats.reshape(-1, D))  # BatchNorm over all patches
    x = head[1](x).view(B, h, w, -1).permute(0, 3, 1, 2)  # (B, C, h, w)
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False)


def train_patch_probe(feats: torch.Tensor, labels: torch.Tensor, num_classes: int,
                      cfg: PatchProbeConfig = PatchProbeConfig()) -> nn.Sequential:
    """feats (N, h, w, D) patch tokens, labels (N, H, W) int64 with -1 = ignore -> the trained head (eval mode)."""
    generator = torch.Generator().manual_seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    D = feats.shape[-1]
    head = nn.Sequential(nn.BatchNorm1d(D, affine=False), nn.Linear(D, num_classes))
    nn.init.trunc_normal_(head[1].weight, std=0.01)
    nn.init.zeros_(head[1].bias)
    optimizer = torch.optim.AdamW(head.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    steps_per_epoch = max(1, len(feats) // cfg.batch_size)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, cfg.epochs * steps_per_epoch)
    head.train()
    for _ in range(cfg.epochs):
        order = torch.randperm(len(feats), generator=generator)
        for i in range(steps_per_epoch):
            idx = order[i * cfg.batch_size:(i + 1) * cfg.batch_size]
            loss = F.cross_entropy(_logits(head, feats[idx], labels.shape[-2:]), labels[idx], ignore_index=-1)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
    return head.eval()


@torch.no_grad()
def patch_probe_miou(train_feats: torch.Tensor, train_labels: torch.Tensor, val_feats: torch.Tensor,
                     val_labels: torch.Tensor, num_classes: int, cfg: PatchProbeConfig = PatchProbeConfig()) -> float:
    """mIoU (percent) on (val_feats (M, h, w, D), val_labels (M, H, W)) of a probe trained on the train pair."""
    with torch.enable_grad():
        head = train_patch_probe(train_feats, train_labels, num_classes, cfg)
    conf = torch.zeros(num_classes, num_classes, dtype=torch.int64)
    for i in range(0, len(val_feats), 256):
        pred = _logits(head, val_feats[i:i + 256], val_labels.shape[-2:]).argmax(1)
        conf += confusion_matrix(pred, val_labels[i:i + 256], num_classes)
    return mean_iou(conf)

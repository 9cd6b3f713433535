"""Cached-feature classification probes, the fast options: weighted k-NN and a linear probe.

Features are extracted once with the evaluation transform and cached (N, D); both probes then
run on the cached matrices, so a probe takes minutes instead of 90 epochs of encoder forwards.
The linear probe here has MAE's head and optimiser but no augmentation, so its numbers sit near,
not on, MAE's; `linear_probe.py` is MAE's protocol itself (`linear-probe --config mae`), and this
one is `linear-probe --config cached`. `knn_accuracy` and `linear_probe_accuracy` are pure
functions of feature matrices: the pretraining loop calls them every N epochs on a held-out split.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.optim import Lars
from timm.scheduler import CosineLRScheduler
from tqdm import tqdm

from pretraining.evaluation.folders import probe_loaders


@dataclass(frozen=True)
class KnnConfig:
    k: int = 20
    temperature: float = 0.07  # DINO's weighted vote: exp(cos / T)
    pool: str = "token"  # "token" (class token after the final norm) or "avg" (mean of patch tokens)
    batch_size: int = 256  # feature extraction
    num_workers: int = 8


@dataclass(frozen=True)
class LinearProbeConfig:
    """The cached-feature linear probe: MAE's head (BatchNorm without affine, then a linear layer),
    LARS, cosine after warm-up, on features of un-augmented images."""

    epochs: int = 90
    batch_size: int = 16384
    optimizer: str = "lars"  # or "sgd" (momentum): LARS' trust ratio (0.001) needs MAE's large lr to move
    base_lr: float = 0.1  # lr = base_lr * batch_size / 256
    weight_decay: float = 0.0
    momentum: float = 0.9
    warmup_epochs: int = 10
    seed: int = 0
    pool: str = "token"
    extract_batch_size: int = 256
    num_workers: int = 8


def knn_mae() -> KnnConfig:
    return KnnConfig()


def knn_tiny() -> KnnConfig:
    return KnnConfig(k=10, batch_size=32, num_workers=0)


def linear_probe_mae() -> LinearProbeConfig:
    return LinearProbeConfig()


def linear_probe_tiny() -> LinearProbeConfig:
    return LinearProbeConfig(epochs=100, batch_size=64, optimizer="sgd", base_lr=1.0, warmup_epochs=5,
                             extract_batch_size=32, num_workers=0)


KNN_RECIPES = {"mae": knn_mae, "tiny": knn_tiny}
CACHED_LINEAR_PROBE_RECIPES = {"cached": linear_probe_mae, "cached_tiny": linear_probe_tiny}
LINEAR_PROBE_RECIPES = {"mae": linear_probe_mae, "tiny": linear_probe_tiny}  # the same, under the old names


@torch.no_grad()
def extract_features(encode: Callable[[torch.Tensor], torch.Tensor], batches: Iterable, device: torch.device,
                     progress: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Run `encode` (images (B, 3, H, W) -> features (B, D)) over (images, labels) batches.

    Returns (features (N, D) float32, labels (N,) int64), both on the CPU, in batch order.
    """
    feats, labels = [], []
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")
    for images, y in tqdm(batches, desc="features", disable=not progress, leave=False):
        with autocast:
            out = encode(images.to(device, non_blocking=True))
        feats.append(out.float().cpu())
        labels.append(torch.as_tensor(y))
    if not feats:
        return torch.zeros(0, 0), torch.zeros(0, dtype=torch.int64)
    return torch.cat(feats), torch.cat(labels).long()


def gather_strided(part: torch.Tensor, total: int, device: torch.device) -> torch.Tensor:
    """Rank r holds rows r, r + W, r + 2W, ... of a (total, ...) tensor; return the whole tensor on
    every rank (the identity without torch.distributed)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return part
    world = dist.get_world_size()
    rows = math.ceil(total / world)
    padded = torch.zeros(rows, *part.shape[1:], dtype=part.dtype, device=device)
    padded[: len(part)] = part.to(device)
    pieces = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(pieces, padded)
    out = torch.empty(total, *part.shape[1:], dtype=part.dtype)
    for r, piece in enumerate(pieces):
        out[r::world] = piece[: len(range(r, total, world))].cpu()
    return out


def knn_scores(train_feats: torch.Tensor, train_labels: torch.Tensor, val_feats: torch.Tensor,
               num_classes: int, k: int = 20, temperature: float = 0.07, chunk: int = 256) -> torch.Tensor:
    """Weighted k-NN votes (DINO): cosine similarity to the k nearest training features, each
    voting exp(sim / T) for its label.

    train_feats (N, D), train_labels (N,), val_feats (M, D) -> class scores (M, C).
    """
    train = F.normalize(train_feats.float(), dim=1)
    val = F.normalize(val_feats.float(), dim=1).to(train.device)
    k = min(k, len(train))
    scores = []
    for start in range(0, len(val), chunk):
        sim, idx = (val[start:start + chunk] @ train.T).topk(k, dim=1)  # (m, k)
        votes = torch.zeros(len(sim), num_classes, device=train.device)
        votes.scatter_add_(1, train_labels.to(train.device)[idx], (sim / temperature).exp())
        scores.append(votes)
    return torch.cat(scores) if scores else torch.zeros(0, num_classes)


def topk_accuracy(scores: torch.Tensor, labels: torch.Tensor, ks: tuple[int, ...] = (1, 5)) -> list[float]:
    """Scores (M, C), labels (M,) -> [top-k accuracy in percent for k in ks] (k capped at C)."""
    ranked = scores.topk(min(max(ks), scores.shape[1]), dim=1).indices.cpu()  # (M, kmax)
    hit = ranked == labels.cpu()[:, None]
    return [100.0 * hit[:, :k].any(dim=1).float().mean().item() for k in ks]


def knn_accuracy(train_feats: torch.Tensor, train_labels: torch.Tensor, val_feats: torch.Tensor,
                 val_labels: torch.Tensor, k: int = 20) -> float:
    """Top-1 accuracy (percent) of the weighted k-NN classifier (T = 0.07) on held-out features.

    train_feats (N, D), train_labels (N,), val_feats (M, D), val_labels (M,); any device.
    """
    num_classes = int(max(train_labels.max(), val_labels.max())) + 1
    scores = knn_scores(train_feats, train_labels, val_feats, num_classes, k=k)
    return topk_accuracy(scores, val_labels, ks=(1,))[0]


def linear_head(dim: int, num_classes: int) -> nn.Sequential:
    """MAE's probe head: BatchNorm1d without affine (a feature whitening the head cannot undo), then
    a linear layer with weights ~ N(0, 0.01) and zero bias."""
    head = nn.Sequential(nn.BatchNorm1d(dim, affine=False, eps=1e-6), nn.Linear(dim, num_classes))
    nn.init.trunc_normal_(head[1].weight, std=0.01)
    nn.init.zeros_(head[1].bias)
    return head


def head_optimizer(head: nn.Sequential, name: str, lr: float, momentum: float,
                   weight_decay: float) -> torch.optim.Optimizer:
    """LARS as MAE's (the weight matrix always adapted by the trust ratio, the bias never), or SGD."""
    if name == "lars":
        return Lars([{"params": [head[1].weight], "always_adapt": True}, {"params": [head[1].bias]}],
                    lr=lr, momentum=momentum, weight_decay=weight_decay)
    if name == "sgd":
        return torch.optim.SGD(head.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)
    raise ValueError(f"optimizer must be 'lars' or 'sgd', got {name!r}")


def train_linear_probe(train_feats: torch.Tensor, train_labels: torch.Tensor, num_classes: int,
                       cfg: LinearProbeConfig, device: torch.device, progress: bool = False) -> nn.Sequential:
    """Train `linear_head` on cached features (N, D) with LARS (or SGD), linear warm-up then cosine
    decay per step. Deterministic given cfg.seed; returns the head in eval mode."""
    generator = torch.Generator().manual_seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    head = linear_head(train_feats.shape[1], num_classes).to(device)
    batch = min(cfg.batch_size, len(train_feats))
    steps_per_epoch = max(1, len(train_feats) // batch)  # drop the last partial batch, as MAE does
    optimizer = head_optimizer(head, cfg.optimizer, cfg.base_lr * batch / 256, cfg.momentum, cfg.weight_decay)
    warmup = cfg.warmup_epochs * steps_per_epoch
    scheduler = CosineLRScheduler(optimizer, t_initial=max(1, cfg.epochs * steps_per_epoch - warmup), lr_min=0.0,
                                  warmup_t=warmup, warmup_lr_init=0.0, warmup_prefix=True, t_in_epochs=False)
    x, y = train_feats.to(device), train_labels.to(device)
    head.train()
    step = 0
    for _ in tqdm(range(cfg.epochs), desc="linear probe", disable=not progress, leave=False):
        order = torch.randperm(len(x), generator=generator).to(device)
        for i in range(steps_per_epoch):
            idx = order[i * batch:(i + 1) * batch]
            scheduler.step_update(step)
            loss = F.cross_entropy(head(x[idx]), y[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
    return head.eval()


@torch.no_grad()
def head_scores(head: nn.Module, feats: torch.Tensor, device: torch.device, chunk: int = 8192) -> torch.Tensor:
    """(M, D) features -> (M, C) logits, on the CPU."""
    return torch.cat([head(feats[i:i + chunk].to(device)).cpu() for i in range(0, len(feats), chunk)])


def linear_probe_accuracy(train_feats: torch.Tensor, train_labels: torch.Tensor, val_feats: torch.Tensor,
                          val_labels: torch.Tensor, cfg: LinearProbeConfig | None = None) -> float:
    """Top-1 accuracy (percent) of a linear probe trained on (train_feats (N, D), train_labels (N,))
    and scored on (val_feats (M, D), val_labels (M,)). Runs on train_feats' device."""
    cfg = cfg or linear_probe_tiny()
    num_classes = int(max(train_labels.max(), val_labels.max())) + 1
    head = train_linear_probe(train_feats, train_labels, num_classes, cfg, train_feats.device)
    return topk_accuracy(head_scores(head, val_feats, train_feats.device), val_labels, ks=(1,))[0]


def periodic_probe(encode: Callable[[torch.Tensor], torch.Tensor], train_batches: Iterable, val_batches: Iterable,
                   device: torch.device, kind: str = "knn", k: int = 20) -> float:
    """Top-1 (percent) of a k-NN (`kind="knn"`) or linear (`"linear"`) probe on `encode`'s features:
    what the pretraining loop logs every N epochs. `encode`: images (B, 3, H, W) -> (B, D), e.g.
    `lambda x: model.encode_rgb(x)[:, 0]`; batches as `eval_data.probe_loaders` gives them."""
    if kind not in ("knn", "linear"):
        raise ValueError(f"kind must be 'knn' or 'linear', got {kind!r}")
    train_x, train_y = extract_features(encode, train_batches, device, progress=False)
    val_x, val_y = extract_features(encode, val_batches, device, progress=False)
    if kind == "knn":
        return knn_accuracy(train_x.to(device), train_y, val_x, val_y, k=k)
    return linear_probe_accuracy(train_x.to(device), train_y.to(device), val_x, val_y)


@dataclass(frozen=True)
class PeriodicProbeConfig:
    every: int = 10  # epochs between probes
    kind: str = "knn"  # or "linear"
    k: int = 20
    max_train: int = 10000  # images of the training split used (evenly spaced)
    max_val: int = 2000  # images of the held-out split
    val_fraction: float = 0.1
    batch_size: int = 128


def probe_hook(data: str, img_size: int | None = None, cfg: PeriodicProbeConfig | None = None) -> Callable[[Any], None]:
    """A hook for the pretraining loop (`train(..., hooks=[probe_hook(data, img_size)])`): after every
    `cfg.every`-th epoch, rank 0 scores a probe on the class token of `model.encode_rgb` over a fixed
    held-out split of the labeled folder `data` and logs it as `probe/{kind}_top1`. The hook receives
    the loop's epoch record (fields epoch, global_step, model, monitor, dist with rank and device);
    `img_size` defaults to the model's `cfg.img_size`."""
    cfg = cfg or PeriodicProbeConfig()
    loaders: list = []

    def hook(end) -> None:
        if (end.epoch + 1) % cfg.every or end.dist.rank != 0:
            return
        if not loaders:  # built on first use, so a run that never probes never reads the split
            size = img_size or end.model.cfg.img_size
            loaders.extend(probe_loaders(data, size, IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, cfg.batch_size,
                                         cfg.val_fraction, cfg.max_train, cfg.max_val))
        model, training = end.model, end.model.training
        model.eval()
        score = periodic_probe(lambda x: model.encode_rgb(x)[:, 0], *loaders, end.dist.device, cfg.kind, cfg.k)
        model.train(training)
        end.monitor.scalars(end.global_step, {f"probe/{cfg.kind}_top1": score})

    return hook

"""Per-modality reconstruction losses, on masked patches only, and the patchify they share.

Patch layout everywhere: a patch is flattened row by row, channels last: (P, P, C) -> P*P*C.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def patchify(images: torch.Tensor, patch_size: int) -> torch.Tensor:
    """(B, C, H, W) -> (B, N, P*P*C), patches row-major."""
    B, C, H, W = images.shape
    h, w, P = H // patch_size, W // patch_size, patch_size
    x = images.reshape(B, C, h, P, w, P).permute(0, 2, 4, 3, 5, 1)  # (B, h, w, P, P, C)
    return x.reshape(B, h * w, P * P * C)


def unpatchify(patches: torch.Tensor, patch_size: int, channels: int) -> torch.Tensor:
    """(B, N, P*P*C) -> (B, C, H, W) for a square grid; the inverse of `patchify`."""
    B, N, _ = patches.shape
    h = int(N**0.5)
    P = patch_size
    x = patches.reshape(B, h, h, P, P, channels).permute(0, 5, 1, 3, 2, 4)  # (B, C, h, P, w, P)
    return x.reshape(B, channels, h * P, h * P)


REDUCTIONS = ("sample", "token")  # what a model may use; "none" (per-sample means, (B,)) is for logs


def _mean_over(values: torch.Tensor, weights: torch.Tensor, reduction: str) -> torch.Tensor:
    """values: (B, K) per-item losses, weights: (B, K) 0/1 (which items count) -> a scalar.

    "sample": the mean over the batch of each sample's mean over its counted items (MultiMAE's
    reduction; a sample with nothing counted adds 0). Every sample weighs the same whatever the
    Dirichlet split or ignore pixels left it, so the mean of equal-sized micro-batches or ranks is
    exactly the mean over their union: DDP and gradient accumulation match one big batch.
    "token": one mean over all counted items of the batch (equal to "sample" when every sample
    counts the same number, as in MAE). "none": each sample's mean, (B,).
    """
    weights = weights.to(values.dtype)
    if reduction in ("sample", "none"):
        per_sample = (values * weights).sum(1) / weights.sum(1).clamp(min=1)  # (B,)
        return per_sample.mean() if reduction == "sample" else per_sample
    if reduction == "token":
        return (values * weights).sum() / weights.sum().clamp(min=1)
    raise ValueError(f"Unknown loss reduction {reduction!r}; use one of {REDUCTIONS} or none.")


def normalise_patches(target: torch.Tensor, eps: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-patch normalisation (MAE's norm_pix_loss): (B, N, K) -> (normalised, mean, std), each patch
    normalised over its pixels of each channel together (MAE's choice)."""
    mean = target.mean(dim=-1, keepdim=True)
    std = (target.var(dim=-1, keepdim=True) + eps).sqrt()
    return (target - mean) / std, mean, std


def rgb_loss(pred: torch.Tensor, images: torch.Tensor, masked: torch.Tensor, patch_size: int,
             norm_pix: bool = True, reduction: str = "sample") -> torch.Tensor:
    """MSE on (optionally per-patch normalised) pixels of masked patches.

    pred: (B, N, P*P*3), images: (B, 3, H, W), masked: (B, N) bool.
    """
    target = patchify(images, patch_size)  # (B, N, P*P*3)
    if norm_pix:
        target = normalise_patches(target)[0]
    return _mean_over((pred - target).pow(2).mean(dim=-1), masked, reduction)


def semantic_loss(pred: torch.Tensor, labels: torch.Tensor, masked: torch.Tensor, patch_size: int,
                  num_classes: int, reduction: str = "sample") -> torch.Tensor:
    """Cross-entropy over the label pixels of masked patches; ignore pixels (-1) are skipped.

    pred: (B, N, p*p*C) logits for p = patch size at label resolution; labels: (B, h*p, w*p) int64
    at label resolution; masked: (B, N) bool.
    """
    B, N, _ = pred.shape
    target = patchify(labels[:, None], patch_size)  # (B, N, p*p)
    target = torch.where(masked[..., None], target, -1).reshape(B, -1)  # (B, N*p*p); only masked patches count
    logits = pred.reshape(B * target.shape[1], num_classes)
    per_pixel = F.cross_entropy(logits, target.flatten(), ignore_index=-1, reduction="none").view(B, -1)
    return _mean_over(per_pixel, target >= 0, reduction)


OFFSET_LOSSES = ("l1", "mse")  # the instance offsets' loss (docs/model.md, Losses)


def instance_loss(pred: torch.Tensor, target: torch.Tensor, masked: torch.Tensor, patch_size: int,
                  reduction: str = "sample", offset_loss: str = "l1") -> torch.Tensor:
    """Binary cross-entropy on the boundary channel plus L1 (or squared error, `offset_loss="mse"`) on
    the centre offsets, masked patches only.

    pred: (B, N, P*P*3) (channel 0 boundary logits, 1-2 offsets), target: (B, 3, H, W) from
    `instance_representation`, masked: (B, N) bool.
    """
    if offset_loss not in OFFSET_LOSSES:
        raise ValueError(f"Unknown instance offset loss {offset_loss!r}; use one of {OFFSET_LOSSES}.")
    B, N, _ = pred.shape
    pred = pred.reshape(B, N, -1, 3)  # (B, N, P*P, 3)
    target = patchify(target, patch_size).reshape(B, N, -1, 3)
    boundary = F.binary_cross_entropy_with_logits(pred[..., 0], target[..., 0], reduction="none").mean(-1)  # (B, N)
    error = pred[..., 1:] - target[..., 1:]  # (B, N, P*P, 2)
    offsets = (error.abs() if offset_loss == "l1" else error.pow(2)).mean(dim=(-2, -1))  # (B, N)
    return _mean_over(boundary + offsets, masked, reduction)


def _weighted_median(values: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """(M, K) values, (M,) non-negative weights -> (K,): per column, a minimiser of sum_m w_m |x_m - c|."""
    order = values.argsort(dim=0)  # (M, K)
    cumulative = weights[order].cumsum(dim=0)  # (M, K)
    first = (cumulative < cumulative[-1:] / 2).sum(dim=0, keepdim=True)  # (1, K): where half the weight is reached
    return values.gather(0, order).gather(0, first.clamp(max=values.shape[0] - 1))[0]


def best_constant_instance_prediction(target: torch.Tensor, masked: torch.Tensor, patch_size: int,
                                      reduction: str = "sample", eps: float = 1e-6,
                                      offset_loss: str = "l1") -> torch.Tensor:
    """The input-independent prediction with the lowest `instance_loss` on these targets: (P*P*3,), one
    value per pixel of a patch and channel, the same for every patch of every image (what a head that
    learned nothing from its input could at best predict).

    target: (B, 3, H, W) from `instance_representation`, masked: (B, N) bool. Each masked patch weighs
    as the reduction weighs it (under "sample" 1 / its sample's masked count). Per pixel of a patch, the
    boundary logit is that of the weighted boundary rate (cross-entropy's minimiser; the rate clamped
    to [eps, 1 - eps]) and each offset the weighted median (L1's minimiser), or under
    `offset_loss="mse"` the weighted mean (squared error's).
    """
    B, N = masked.shape
    patches = patchify(target, patch_size).reshape(B, N, -1, 3)  # (B, N, P*P, 3)
    weights = masked.float()
    if reduction in ("sample", "none"):
        weights = weights / weights.sum(1, keepdim=True).clamp(min=1)
    weights = weights.flatten()  # (B*N,)
    kept = weights > 0
    patches, weights = patches.flatten(0, 1)[kept], weights[kept]  # (M, P*P, 3), (M,)
    rate = (weights[:, None] * patches[..., 0]).sum(0) / weights.sum()  # (P*P,)
    values = patches[..., 1:].flatten(1)  # (M, P*P*2)
    if offset_loss == "mse":
        offsets = ((weights[:, None] * values).sum(0) / weights.sum()).view(-1, 2)  # (P*P, 2)
    else:
        offsets = _weighted_median(values, weights).view(-1, 2)
    return torch.cat([torch.logit(rate.clamp(eps, 1 - eps))[:, None], offsets], dim=-1).flatten()


def constant_instance_loss(target: torch.Tensor, masked: torch.Tensor, patch_size: int,
                           reduction: str = "sample", offset_loss: str = "l1") -> torch.Tensor:
    """`instance_loss` of `best_constant_instance_prediction` on the same targets: the floor an instance
    head must beat to have learned anything from its input (compute it on held-out scenes)."""
    B, N = masked.shape
    constant = best_constant_instance_prediction(target, masked, patch_size, reduction, offset_loss=offset_loss)
    return instance_loss(constant.expand(B, N, -1), target, masked, patch_size, reduction, offset_loss)

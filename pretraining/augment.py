"""Joint augmentation: one random resized crop and flip applied identically to RGB and both label maps.

torchvision's `transforms.v2` transforms an image and `tv_tensors.Mask`s together with the same
parameters, resizing images bilinearly (antialiased) and masks with nearest neighbour, so class and
instance ids are never blended. The instance representation is computed by the caller *after*
this crop, so boundaries and centres of mass describe what the model sees.

Randomness is a function of a per-sample seed (derived from (seed, epoch, sample index)), never of
the process that runs it: the same sample gets the same crop on any rank, worker or resume.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torchvision import tv_tensors
from torchvision.transforms import v2


@dataclass(frozen=True)
class AugmentConfig:
    scale: tuple[float, float] = (0.2, 1.0)  # MAE's crop scale
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    hflip: float = 0.5  # probability of a horizontal flip


def joint_transform(img_size: int, cfg: AugmentConfig) -> v2.Transform:
    """The crop-and-flip applied to (image, semantic mask, instance mask) with shared parameters."""
    return v2.Compose([
        v2.RandomResizedCrop(img_size, scale=cfg.scale, ratio=cfg.ratio, antialias=True),
        v2.RandomHorizontalFlip(cfg.hflip),
    ])


def sample_seed(seed: int, epoch: int, index: int, purpose: int) -> int:
    """A 63-bit seed that depends only on (run seed, epoch, global sample index, purpose).

    `purpose` separates streams drawn for the same sample (0 augmentation, 1 masking).
    """
    state = np.random.SeedSequence([seed, epoch, index, purpose]).generate_state(2, dtype=np.uint32)
    return int(state[0]) << 31 ^ int(state[1])


def augment(
    rgb: np.ndarray,
    semantic: np.ndarray | None,
    instance: np.ndarray | None,
    transform: v2.Transform,
    seed: int,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Crop and flip the three maps identically.

    rgb (H, W, 3) uint8, semantic / instance (H, W) int64 or None ->
    rgb (3, S, S) uint8, semantic (S, S) int64 or None, instance (S, S) int64 or None.
    """
    inputs = [tv_tensors.Image(torch.from_numpy(np.require(rgb, requirements=("C", "W"))).permute(2, 0, 1))]
    inputs += [tv_tensors.Mask(torch.from_numpy(m)) for m in (semantic, instance) if m is not None]
    # v2 transforms draw from the global CPU generator; fork it so the caller's stream (the model's, when
    # the loader runs in the main process) is untouched, and seed it per sample. (Not torch.manual_seed:
    # it also queues a CUDA seeding call, which records a stack trace each time.)
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(seed)
        outputs = list(transform(*inputs))
    image = outputs.pop(0).as_subclass(torch.Tensor)
    masks = [m.as_subclass(torch.Tensor) for m in outputs]
    semantic_out = masks.pop(0) if semantic is not None else None
    instance_out = masks.pop(0) if instance is not None else None
    return image, semantic_out, instance_out

"""Joint augmentation: one random resized crop and flip applied identically to RGB and both label maps.

One crop box and flip, drawn by torchvision `transforms.v2`'s RandomResizedCrop sampler, is applied
to the image with v2's functional ops (bicubic, antialiased, as MAE and MultiMAE resize; bilinear
is a switch) and to the label maps with nearest neighbour, so class and instance ids are never blended. The instance representation is computed
by the caller *after* this crop, so boundaries and centres of mass describe what the model sees.

The label maps are resized by gathering rows and columns at the source indices of torch's
`nearest-exact` mode (what v2 does with `InterpolationMode.NEAREST_EXACT`; a test pins the two
equal). Reason: v2 resizes an integer `Mask` by casting it to float and back, five times the cost
of a gather, and the loader does this for two maps on every sample.

Randomness is a function of a per-sample seed (derived from (seed, epoch, sample index)), never of
the process that runs it: the same sample gets the same crop on any rank, worker or resume.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F


@dataclass(frozen=True)
class AugmentConfig:
    scale: tuple[float, float] = (0.2, 1.0)  # MAE's crop scale
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    hflip: float = 0.5  # probability of a horizontal flip
    interpolation: str = "bicubic"  # of the image: bicubic (MAE's RandomResizedCrop(interpolation=3)) | bilinear

    def __post_init__(self):
        if self.interpolation not in _INTERPOLATIONS:
            raise ValueError(f"Unknown interpolation {self.interpolation!r}; use bicubic or bilinear.")


_INTERPOLATIONS = {"bicubic": v2.InterpolationMode.BICUBIC, "bilinear": v2.InterpolationMode.BILINEAR}


def nearest_exact_index(start: int, length: int, size: int) -> np.ndarray:
    """Source pixel of each of `size` output pixels when [start, start + length) is resized to `size`
    with torch's `nearest-exact` mode: the pixel whose centre is nearest, computed in ATen's
    precision (float32 scale, the product rounded to float32 before the floor). (size,) int64."""
    scale = np.float64(np.float32(length) / np.float32(size))
    source = np.floor(((np.arange(size) + 0.5) * scale).astype(np.float32)).astype(np.int64)
    return start + np.minimum(source, length - 1)


@dataclass(frozen=True)
class CropBox:
    """One sample's crop (in source pixels) and flip, shared by its image and label maps."""

    top: int
    left: int
    height: int
    width: int
    flip: bool


class JointCropFlip:
    """A random resized crop and horizontal flip, drawn once and applied to an image and its masks.

    The crop parameters come from torchvision's own `RandomResizedCrop` sampler; the image is
    resized bicubically or bilinearly (antialiased) and the masks with NEAREST_EXACT (pixel-centre
    aligned with the image; v2's `resized_crop` on a `Mask` uses legacy NEAREST, half an input pixel off).
    """

    def __init__(self, img_size: int, cfg: AugmentConfig):
        self.size = [img_size, img_size]
        self.crop = v2.RandomResizedCrop(img_size, scale=cfg.scale, ratio=cfg.ratio)
        self.hflip = cfg.hflip
        self.interpolation = _INTERPOLATIONS[cfg.interpolation]

    def draw(self, height: int, width: int) -> CropBox:
        """The crop box and flip for an image of height x width, from torch's global generator."""
        # The sampler reads only the size: a stand-in image of that size, no memory behind it.
        p = self.crop.make_params([tv_tensors.Image(torch.empty((1, 1, 1), dtype=torch.uint8).expand(1, height, width))])
        flip = bool(torch.rand(1) < self.hflip)
        return CropBox(p["top"], p["left"], p["height"], p["width"], flip)

    def crop_image(self, image: torch.Tensor, box: CropBox) -> torch.Tensor:
        """(C, H, W) uint8, C = 3, or 4 with a padding channel -> (3, S, S) uint8:
        resized (antialiased) and flipped. v2's image kernels on a plain tensor: what `F.resized_crop`
        runs for an Image, without its dispatch."""
        out = F.resized_crop_image(image.as_subclass(torch.Tensor), box.top, box.left, box.height, box.width,
                                   self.size, interpolation=self.interpolation, antialias=True)[:3]
        return F.horizontal_flip_image(out) if box.flip else out

    def crop_masks(self, box: CropBox, *masks: np.ndarray) -> list[np.ndarray]:
        """(H, W) maps of any dtype -> (S, S) of their dtype, nearest-exact (a row and column gather)."""
        rows = nearest_exact_index(box.top, box.height, self.size[0])
        cols = nearest_exact_index(box.left, box.width, self.size[1])
        if box.flip:
            cols = cols[::-1]
        return [m[rows][:, cols] for m in masks]

    def __call__(self, image: torch.Tensor, *masks: np.ndarray) -> tuple[torch.Tensor, list[np.ndarray]]:
        """image (C, H, W) (C = 3, or 4 with padding), masks (H, W) of any dtype -> image (3, S, S),
        masks (S, S) of their dtype.

        Draws from torch's global generator (the caller seeds it)."""
        box = self.draw(*image.shape[-2:])
        return self.crop_image(image, box), self.crop_masks(box, *masks)


def joint_transform(img_size: int, cfg: AugmentConfig) -> JointCropFlip:
    return JointCropFlip(img_size, cfg)


def sample_seeds(seed: int, epoch: int, index: int) -> tuple[int, int]:
    """(augmentation seed, masking seed): 63-bit seeds that depend only on (run seed, epoch, sample index)."""
    a, b, c, d = (int(x) for x in np.random.SeedSequence([seed, epoch, index]).generate_state(4, dtype=np.uint32))
    return a << 31 ^ b, c << 31 ^ d


def augment(
    image: torch.Tensor,
    semantic: np.ndarray | None,
    instance: np.ndarray | None,
    transform: JointCropFlip,
    seed: int,
) -> tuple[torch.Tensor, np.ndarray | None, np.ndarray | None]:
    """Crop and flip the three maps identically.

    image (C, H, W) uint8 (C = 3, or 4 whose last channel is padding: `samples.image_tensor`),
    semantic / instance (H, W) integer maps of any dtype, or None ->
    rgb (3, S, S) uint8, semantic (S, S) or None, instance (S, S) or None, the maps in their own
    dtype (the caller widens them, at the crop's size).
    """
    masks = [m for m in (semantic, instance) if m is not None]
    # The crop sampler draws from the global CPU generator; fork it so the caller's stream (the
    # model's, when the loader runs in the main process) is untouched, and seed it per sample. (Not
    # torch.manual_seed: it also queues a CUDA seeding call, which records a stack trace each time.)
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(seed)
        image, masks = transform(image, *masks)
    semantic_out = masks.pop(0) if semantic is not None else None
    instance_out = masks.pop(0) if instance is not None else None
    return image, semantic_out, instance_out

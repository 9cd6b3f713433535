"""The downstream protocols' augmentations, as torchvision `transforms.v2` pipelines.

- `linear_probe_transform`: MAE's linear probe (RandomResizedCrop, flip; nothing else).
- `segmentation_transform`: mmsegmentation's ADE20K pipeline (random rescale, crop that no class
  fills beyond `cat_max_ratio`, flip, photometric distortion, normalise, pad with "ignore").
- `detection_transform`: ViTDet's large-scale jitter (flip, rescale to [0.1, 2] x the target size,
  crop to at most the target size; the model pads the batch).
Images and masks (`tv_tensors.Mask`, instance masks (N, H, W) or a class map (H, W)) move together.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torchvision import tv_tensors
from torchvision.transforms import InterpolationMode, v2
from torchvision.transforms.v2 import functional as F

IGNORE = -1  # a class map's "no class" value


def linear_probe_transform(img_size: int, mean: Sequence[float], std: Sequence[float]) -> v2.Compose:
    """MAE's linear-probe training augmentation: PIL image -> (3, img_size, img_size) normalised."""
    return v2.Compose([
        v2.RandomResizedCrop(img_size, interpolation=InterpolationMode.BICUBIC, antialias=True),
        v2.RandomHorizontalFlip(),
        v2.ToImage(),
        v2.ToDtype(torch.float32, scale=True),
        v2.Normalize(list(mean), list(std)),
    ])


class PhotoMetricDistortion(v2.RandomPhotometricDistort):
    """mmsegmentation's PhotoMetricDistortion: each of brightness, contrast (before or after the
    rest), saturation and hue with probability 0.5; torchvision's SSD version without its channel
    shuffle, which mmsegmentation does not do."""

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        return {**super().make_params(flat_inputs), "channel_permutation": None}


class RandomCropAtMost(v2.Transform):
    """A random `size` x `size` window, or the whole side where the input is shorter (no padding).

    With `cat_max_ratio` < 1 (mmsegmentation's ADE20K setting 0.75), up to 10 windows are drawn
    until no single class covers that share of the window's labelled pixels (the last is kept).
    """

    def __init__(self, size: int, cat_max_ratio: float = 1.0, tries: int = 10):
        super().__init__()
        self.size, self.cat_max_ratio, self.tries = size, cat_max_ratio, tries

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        h, w = v2.query_size(flat_inputs)
        mask = next((x for x in flat_inputs if isinstance(x, tv_tensors.Mask)), None)
        for _ in range(self.tries):
            top = int(torch.randint(0, max(h - self.size, 0) + 1, ()))
            left = int(torch.randint(0, max(w - self.size, 0) + 1, ()))
            if self.cat_max_ratio >= 1.0 or mask is None:
                break
            window = mask[..., top:top + self.size, left:left + self.size]
            _, counts = window[window != IGNORE].unique(return_counts=True)
            if len(counts) > 1 and counts.max() < self.cat_max_ratio * counts.sum():
                break
        return {"top": top, "left": left, "height": min(self.size, h), "width": min(self.size, w)}

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        return F.crop(inpt, **params)


class PadTo(v2.Transform):
    """Pad the bottom and right up to `size` x `size`: images with 0 (the mean after normalising),
    masks with IGNORE."""

    def __init__(self, size: int):
        super().__init__()
        self.size = size

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        h, w = v2.query_size(flat_inputs)
        return {"padding": [0, 0, max(self.size - w, 0), max(self.size - h, 0)]}

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        fill = IGNORE if isinstance(inpt, tv_tensors.Mask) else 0.0
        return F.pad(inpt, params["padding"], fill=fill)


def segmentation_transform(crop_size: int, mean: Sequence[float], std: Sequence[float], train: bool,
                           scale: tuple[float, float] = (0.5, 2.0), cat_max_ratio: float = 1.0,
                           photometric: bool = False) -> v2.Compose:
    """(image uint8 (3, H, W), class map (H, W) with IGNORE) -> (image float (3, h, w), class map).

    Training: short side rescaled to crop_size x U(scale), a crop (see RandomCropAtMost), flip,
    optional photometric distortion, normalise, pad to crop_size x crop_size.
    Evaluation: the full image, only normalised (sliding-window inference handles its size).
    """
    normalise = [v2.ToDtype(torch.float32, scale=True), v2.Normalize(list(mean), list(std))]
    if not train:
        return v2.Compose(normalise)
    return v2.Compose([
        v2.RandomResize(int(crop_size * scale[0]), int(crop_size * scale[1]) + 1, antialias=True),
        RandomCropAtMost(crop_size, cat_max_ratio),
        v2.RandomHorizontalFlip(),
        *([PhotoMetricDistortion()] if photometric else []),
        *normalise,
        PadTo(crop_size),
    ])


def detection_transform(size: int, scale: tuple[float, float] = (0.1, 2.0)) -> v2.Compose:
    """ViTDet's large-scale jitter on (image uint8 (3, H, W), instance masks (N, H, W)): flip,
    rescale so the image fits in size x U(scale), a random crop of at most size x size."""
    return v2.Compose([
        v2.RandomHorizontalFlip(),
        v2.ScaleJitter((size, size), scale_range=scale, antialias=True),
        RandomCropAtMost(size),
    ])

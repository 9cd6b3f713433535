"""Input adapters: each modality's image becomes a (B, N, D) grid of patch tokens.

RGB and the instance representation are images, so both are timm's `PatchEmbed`. The semantic
map holds class ids, so (as in MultiMAE) each pixel of a 1/4-resolution label map becomes a
learned class embedding and that embedding image is patchified.
"""

from __future__ import annotations

import torch
from timm.layers import PatchEmbed, build_sincos2d_pos_embed
from torch import nn

from pretraining.models.instances import NUM_CHANNELS as INSTANCE_CHANNELS


def downsample_labels(labels: torch.Tensor, factor: int) -> torch.Tensor:
    """Nearest-neighbour label map at 1/factor resolution: (B, H, W) -> (B, H/factor, W/factor)."""
    if factor == 1:
        return labels
    return labels[:, factor // 2 :: factor, factor // 2 :: factor]


class SemanticAdapter(nn.Module):
    """Class embedding at reduced label resolution, then patchified (MultiMAE's semantic input).

    Ignore pixels (-1) get their own learned embedding, the last row of the table.
    """

    def __init__(self, num_classes: int, img_size: int, patch_size: int, embed_dim: int,
                 class_dim: int = 64, downsample: int = 4):
        super().__init__()
        if patch_size % downsample or img_size % downsample:
            raise ValueError(f"The semantic label downsampling {downsample} must divide the patch size {patch_size}.")
        self.num_classes = num_classes
        self.downsample = downsample
        self.class_embed = nn.Embedding(num_classes + 1, class_dim)
        self.patch_embed = PatchEmbed(img_size // downsample, patch_size // downsample, class_dim, embed_dim)

    def forward(self, labels: torch.Tensor) -> torch.Tensor:
        """labels: (B, H, W) int64 in [-1, C) -> (B, N, D)."""
        labels = downsample_labels(labels, self.downsample)  # (B, H/4, W/4)
        labels = torch.where(labels < 0, self.num_classes, labels)  # ignore -> its own embedding
        x = self.class_embed(labels).permute(0, 3, 1, 2)  # (B, class_dim, H/4, W/4)
        return self.patch_embed(x)  # (B, N, D)


def build_adapter(modality: str, img_size: int, patch_size: int, embed_dim: int, num_semantic_classes: int,
                  semantic_class_dim: int, semantic_downsample: int) -> nn.Module:
    """The input adapter of one modality; each maps its batch entry to (B, N, D)."""
    if modality == "rgb":
        return PatchEmbed(img_size, patch_size, 3, embed_dim)
    if modality == "instance":
        return PatchEmbed(img_size, patch_size, INSTANCE_CHANNELS, embed_dim)
    if modality == "semantic":
        return SemanticAdapter(num_semantic_classes, img_size, patch_size, embed_dim,
                               semantic_class_dim, semantic_downsample)
    raise ValueError(f"Unknown modality {modality!r}; use semantic, instance or rgb.")


def sincos_pos_embed(grid_size: int, dim: int) -> torch.Tensor:
    """Fixed 2D sin-cos position embedding of a square grid, (grid_size**2, dim), row-major."""
    return build_sincos2d_pos_embed([grid_size, grid_size], dim=dim)


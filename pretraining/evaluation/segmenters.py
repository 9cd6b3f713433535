"""Segmentation models on a timm ViT: UperNet (MAE's ADE20K protocol) and the fast linear probe.

`UperNetSegmenter` is the setup of MAE's ADE20K numbers (BEiT's segmentation code) with the heads
taken from transformers. The outputs of four encoder blocks (3, 5, 7, 11 of a ViT-B), each (B, D, H/16, W/16) without the
final norm, are rescaled to strides 4, 8, 16, 32 by BEiT's neck (mmsegmentation's
`Feature2Pyramid`: two 2x2 transposed convolutions with BatchNorm + GELU between them, one, none, a
2x2 max pool). transformers' `UperNetHead` (pyramid pooling on the coarsest map + FPN) gives the
logits, and its `UperNetFCNHead` on the stride-16 map the auxiliary logits (loss weight 0.4).
mmsegmentation puts dropout 0.1 before both classifiers; so do we. Both are upsampled bilinearly
to the input and trained with cross-entropy that ignores -1.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
import transformers
from transformers.models.upernet.modeling_upernet import UperNetFCNHead, UperNetHead

from pretraining.evaluation.transforms import IGNORE


def parse_blocks(text: str, depth: int) -> list[int]:
    """"3,5,7,11" (negative counts from the end) -> absolute block indices, each checked < depth."""
    try:
        blocks = [int(b) for b in text.split(",")]
    except ValueError as err:
        raise ValueError(f"blocks must be comma-separated integers such as 3,5,7,11, got {text!r}") from err
    absolute = [b + depth if b < 0 else b for b in blocks]
    if not all(0 <= b < depth for b in absolute):
        raise ValueError(f"blocks {text} do not exist in an encoder of {depth} blocks; pass indices below {depth}")
    return absolute


def block_features(encoder: nn.Module, images: torch.Tensor, blocks: Sequence[int], norm: bool) -> list[torch.Tensor]:
    """images (B, 3, H, W) -> [(B, D, H/16, W/16) output of block b for b in blocks] (repeats allowed),
    the patch tokens only, through timm's `forward_intermediates`."""
    wanted = sorted(set(blocks))
    maps = encoder.forward_intermediates(images, indices=wanted, norm=norm, output_fmt="NCHW",
                                         intermediates_only=True)
    by_block = dict(zip(wanted, maps))
    return [by_block[b] for b in blocks]


def masked_cross_entropy(logits: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """logits (B, C, H, W), masks (B, H, W) with IGNORE -> mean over the labelled pixels (0 when none)."""
    labelled = (masks != IGNORE).sum().clamp(min=1)
    return F.cross_entropy(logits.float(), masks, ignore_index=IGNORE, reduction="sum") / labelled


class FeaturePyramid(nn.Module):
    """Four (B, D, h, w) maps -> (B, D, 4h, 4w), (B, D, 2h, 2w), (B, D, h, w), (B, D, h/2, w/2)."""

    def __init__(self, dim: int):
        super().__init__()
        self.scales = nn.ModuleList([
            nn.Sequential(nn.ConvTranspose2d(dim, dim, 2, stride=2), nn.BatchNorm2d(dim), nn.GELU(),
                          nn.ConvTranspose2d(dim, dim, 2, stride=2)),
            nn.ConvTranspose2d(dim, dim, 2, stride=2),
            nn.Identity(),
            nn.MaxPool2d(2),
        ])

    def forward(self, maps: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        return [scale(x) for scale, x in zip(self.scales, maps)]


class UperNetSegmenter(nn.Module):
    """images (B, 3, H, W) -> logits (B, C, H, W); `forward(images, masks)` -> the training loss.

    `encoder` is a timm ViT (blocks after the last of `blocks`, the final norm and the classifier
    are pruned: nothing here reads them); `head` holds the neck and both heads.
    """

    def __init__(self, encoder: nn.Module, num_classes: int, blocks: Sequence[int] = (3, 5, 7, 11),
                 channels: int = 768, aux_channels: int = 256, aux_weight: float = 0.4, dropout: float = 0.1):
        super().__init__()
        if len(blocks) != 4:
            raise ValueError(f"UperNet takes 4 encoder blocks (strides 4, 8, 16, 32), got {len(blocks)}")
        encoder.prune_intermediate_layers(list(blocks), prune_norm=True, prune_head=True)
        self.encoder, self.blocks, self.aux_weight = encoder, list(blocks), aux_weight
        config = transformers.UperNetConfig(hidden_size=channels, num_labels=num_classes, pool_scales=[1, 2, 3, 6],
                                            auxiliary_channels=aux_channels, auxiliary_num_convs=1,
                                            auxiliary_concat_input=False)
        dims = [encoder.embed_dim] * 4
        self.head = nn.ModuleDict({"neck": FeaturePyramid(encoder.embed_dim),
                                   "decode": UperNetHead(config, in_channels=dims),
                                   "aux": UperNetFCNHead(config, in_channels=dims, in_index=2)})
        for name in ("decode", "aux"):
            for module in self.head[name].modules():  # mmcv's ConvModule initialisation (PyTorch's is smaller)
                if isinstance(module, nn.Conv2d):
                    nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
                    if module.bias is not None:
                        nn.init.zeros_(module.bias)
            classifier = self.head[name].classifier
            nn.init.normal_(classifier.weight, std=0.01)  # mmsegmentation's classifier initialisation
            nn.init.zeros_(classifier.bias)
            self.head[name].classifier = nn.Sequential(nn.Dropout2d(dropout), classifier)

    def forward(self, images: torch.Tensor, masks: torch.Tensor | None = None) -> torch.Tensor:
        feats = self.head["neck"](block_features(self.encoder, images, self.blocks, norm=False))  # 4 x (B, D, ., .)
        size = images.shape[-2:]
        logits = F.interpolate(self.head["decode"](feats), size=size, mode="bilinear", align_corners=False)
        if masks is None:
            return logits  # (B, C, H, W)
        aux = F.interpolate(self.head["aux"](feats), size=size, mode="bilinear", align_corners=False)
        return masked_cross_entropy(logits, masks) + self.aux_weight * masked_cross_entropy(aux, masks)


class LinearSegmenter(nn.Module):
    """The fast probe: BatchNorm + a 1x1 convolution over the concatenated patch tokens (after the
    final norm) of `blocks`, upsampled to the image; the encoder frozen unless `frozen=False`.
    images (B, 3, H, W) -> logits (B, C, H, W); `forward(images, masks)` -> the loss."""

    def __init__(self, encoder: nn.Module, num_classes: int, blocks: Sequence[int] = (-4, -3, -2, -1),
                 frozen: bool = True):
        super().__init__()
        blocks = [b + len(encoder.blocks) if b < 0 else b for b in blocks]
        encoder.prune_intermediate_layers(blocks, prune_norm=False, prune_head=True)
        self.encoder, self.blocks, self.frozen = encoder, blocks, frozen
        dim = encoder.embed_dim * len(blocks)
        self.head = nn.Sequential(nn.BatchNorm2d(dim), nn.Conv2d(dim, num_classes, kernel_size=1))
        if frozen:
            self.encoder.requires_grad_(False)

    def train(self, mode: bool = True):
        super().train(mode)
        if self.frozen:
            self.encoder.eval()  # no drop path or dropout in a frozen encoder
        return self

    def forward(self, images: torch.Tensor, masks: torch.Tensor | None = None) -> torch.Tensor:
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.frozen):
            feats = block_features(self.encoder, images, self.blocks, norm=True)  # blocks x (B, D, h, w)
        logits = F.interpolate(self.head(torch.cat(feats, dim=1)), size=images.shape[-2:], mode="bilinear",
                               align_corners=False)
        return logits if masks is None else masked_cross_entropy(logits, masks)

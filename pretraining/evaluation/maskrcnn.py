"""ViTDet's Mask R-CNN on an exported timm ViT, assembled from timm and torchvision parts.

- Backbone: the plain ViT's weights in timm's `VisionTransformerSAM`, which is ViTDet's backbone
  (SAM's image encoder is ViTDet's ViT): no class token, absolute position embeddings resampled to
  the detection grid, windowed attention (14 x 14 patches) in all blocks but `global_blocks`
  (2, 5, 8, 11 of a ViT-B), decomposed relative position biases initialised at zero.
- Neck: ViTDet's simple feature pyramid from the last block's (B, D, H/16, W/16) map: strides 4, 8,
  16, 32 by transposed convolutions / identity / max pool, each then 1x1 and 3x3 convolutions with
  LayerNorm to 256 channels, plus a stride-64 level for the RPN.
- Heads: torchvision's `MaskRCNN` with ViTDet's choices: a 2-conv RPN head, a 4-conv + 1-fc box
  head and a 4-conv mask head, both with LayerNorm, 1000 proposals per image in training, and
  RoIAlign with aligned sampling (`LevelRoIAlign`: detectron2's ROIAlignV2, where torchvision's
  pooler has only the legacy sampling, half a feature cell off).
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Sequence
from functools import partial

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import LayerNorm2d, LayerScale, resample_abs_pos_embed_nhwc
from timm.models.vision_transformer_sam import VisionTransformerSAM
from torchvision.models.detection import MaskRCNN
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.faster_rcnn import FastRCNNConvFCHead, FastRCNNPredictor
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
from torchvision.models.detection.rpn import RPNHead
from torchvision.ops import MultiScaleRoIAlign, roi_align
from torchvision.ops.poolers import LevelMapper

LEVELS = ("p2", "p3", "p4", "p5")  # strides 4, 8, 16, 32 on a patch-16 ViT; "pool" (stride 64) feeds only the RPN


def windowed_vit(vit: nn.Module, img_size: int, window_size: int = 14, global_blocks: Sequence[int] = (2, 5, 8, 11),
                 drop_path: float = 0.0, rel_pos: bool = True) -> VisionTransformerSAM:
    """A plain timm `VisionTransformer` -> timm's `VisionTransformerSAM` (ViTDet's backbone) holding
    the same patch embedding, blocks and position embedding (class row dropped, grid resampled to
    img_size / patch). Output: `forward_intermediates(x, [-1])` -> the last block, (B, D, h, w).
    Raises ValueError for a ViT it cannot hold (register tokens, MLP variants, attention norms)."""
    if getattr(vit, "reg_token", None) is not None:
        raise ValueError("ViTDet's backbone has no register tokens; export a plain ViT encoder")
    block, depth = vit.blocks[0], len(vit.blocks)
    sam = VisionTransformerSAM(
        img_size=img_size, patch_size=vit.patch_embed.patch_size[0], embed_dim=vit.embed_dim, depth=depth,
        num_heads=block.attn.num_heads, mlp_ratio=block.mlp.fc1.out_features / vit.embed_dim,
        qkv_bias=block.attn.qkv.bias is not None, qk_norm=not isinstance(block.attn.q_norm, nn.Identity),
        init_values=1.0 if isinstance(block.ls1, LayerScale) else None,
        pre_norm=not isinstance(vit.norm_pre, nn.Identity), drop_path_rate=drop_path,
        norm_layer=partial(nn.LayerNorm, eps=block.norm1.eps), use_rel_pos=rel_pos, window_size=window_size,
        global_attn_indexes=tuple(global_blocks), neck_chans=0, num_classes=0)
    state = {k: v for k, v in vit.state_dict().items() if k.startswith(("patch_embed.", "blocks.", "norm_pre."))}
    prefix = 0 if getattr(vit, "no_embed_class", False) else vit.num_prefix_tokens
    grid = vit.pos_embed[:, prefix:].reshape(1, *vit.patch_embed.grid_size, vit.embed_dim)  # (1, h, w, D)
    state["pos_embed"] = resample_abs_pos_embed_nhwc(grid, list(sam.patch_embed.grid_size))
    missing, unexpected = sam.load_state_dict(state, strict=False)
    missing = [k for k in missing if ".rel_pos_" not in k and not k.startswith(("neck.", "head."))]
    if missing or unexpected:
        key = missing[0] if missing else unexpected[0]
        raise ValueError(f"the encoder does not fit ViTDet's backbone ({key} {'missing' if missing else 'unused'}); "
                         f"export a plain ViT encoder")
    sam.prune_intermediate_layers([depth - 1], prune_norm=True, prune_head=True)
    return sam


class SimpleFeaturePyramid(nn.Module):
    """images (B, 3, H, W) -> {p2: (B, C, H/4, W/4), p3, p4, p5: (B, C, H/32, W/32), pool: (B, C, H/64, W/64)}."""

    def __init__(self, vit: nn.Module, out_channels: int = 256):
        super().__init__()
        self.vit, self.out_channels = vit, out_channels  # torchvision reads out_channels
        patch = vit.patch_embed.patch_size[0]
        self.strides = (patch / 4, patch / 2, patch, patch * 2)  # of LEVELS, in input pixels
        d = vit.embed_dim
        self.scales = nn.ModuleList([
            nn.Sequential(nn.ConvTranspose2d(d, d // 2, 2, stride=2), LayerNorm2d(d // 2), nn.GELU(),
                          nn.ConvTranspose2d(d // 2, d // 4, 2, stride=2)),
            nn.ConvTranspose2d(d, d // 2, 2, stride=2),
            nn.Identity(),
            nn.MaxPool2d(2),
        ])
        self.outputs = nn.ModuleList([
            nn.Sequential(nn.Conv2d(dim, out_channels, 1, bias=False), LayerNorm2d(out_channels),
                          nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False), LayerNorm2d(out_channels))
            for dim in (d // 4, d // 2, d, d)])

    def forward(self, images: torch.Tensor) -> OrderedDict[str, torch.Tensor]:
        x = self.vit.forward_intermediates(images, indices=[len(self.vit.blocks) - 1], intermediates_only=True)[0]
        maps = OrderedDict((name, out(scale(x))) for name, scale, out in zip(LEVELS, self.scales, self.outputs))
        maps["pool"] = F.max_pool2d(maps["p5"], kernel_size=1, stride=2)
        return maps


class LevelRoIAlign(MultiScaleRoIAlign):
    """torchvision's `MultiScaleRoIAlign` (a box of side s pooled from level floor(4 + log2(s / 224)) of the
    pyramid, clamped to its levels; samples per bin adaptive), with the sampling chosen: `aligned=True`
    takes a box's corners to feature coordinates with pixel centres at half-integers, so a box pools the
    features it covers (detectron2's ROIAlignV2, ViTDet's); `aligned=False` is torchvision's own, which
    reads every box half a feature cell down and to the right (2 px at stride 4, 16 px at stride 32).

    features {name: (B, C, H/stride, W/stride)}, boxes [(R_i, 4) per image, x1 y1 x2 y2 in pixels]
    -> (sum R_i, C, *output_size). `strides` are the pyramid's (powers of two), given rather than inferred.
    """

    def __init__(self, featmap_names: Sequence[str], output_size: int, strides: Sequence[float],
                 aligned: bool = True):
        super().__init__(list(featmap_names), output_size, sampling_ratio=0)
        levels = [math.log2(s) for s in strides]
        if any(level != round(level) for level in levels) or len(strides) != len(featmap_names):
            raise ValueError(f"the feature pyramid's strides {tuple(strides)} are not one power of two per level; "
                             f"export an encoder with a patch size of 4, 8, 16 or 32")
        self.scales = [1.0 / s for s in strides]
        self.map_levels = LevelMapper(round(levels[0]), round(levels[-1]))
        self.aligned = aligned

    def forward(self, x: dict[str, torch.Tensor], boxes: list[torch.Tensor],
                image_shapes: list[tuple[int, int]]) -> torch.Tensor:
        features = [x[name] for name in self.featmap_names]
        rois = torch.cat([torch.cat([torch.full_like(b[:, :1], i), b], dim=1) for i, b in enumerate(boxes)])  # (R, 5)
        levels = self.map_levels(boxes)  # (R,) index into features
        out = features[0].new_zeros(len(rois), features[0].shape[1], *self.output_size)
        for level, (feature, scale) in enumerate(zip(features, self.scales)):
            index = torch.where(levels == level)[0]
            pooled = roi_align(feature, rois[index], self.output_size, scale, self.sampling_ratio, self.aligned)
            out[index] = pooled.to(out.dtype)
        return out


def mask_rcnn(backbone: nn.Module, num_classes: int, image_size: int, mean: Sequence[float], std: Sequence[float],
              box_fc: int = 1024, head_convs: int = 4, anchor_sizes: Sequence[int] = (32, 64, 128, 256, 512),
              proposals: int = 1000, rois_per_image: int = 512, score_thresh: float = 0.05,
              roi_aligned: bool = True) -> MaskRCNN:
    """torchvision's Mask R-CNN on `backbone` (a SimpleFeaturePyramid) for `num_classes` object classes.

    Training images arrive already jittered and cropped (at most image_size square) and are not
    resized again; evaluation resizes the longer side to image_size. Every batch is padded to
    image_size x image_size, as ViTDet pads to 1024 x 1024. `roi_aligned`: the RoIAlign sampling
    (`LevelRoIAlign`); False is torchvision's legacy one.
    """
    c = backbone.out_channels
    return MaskRCNN(
        backbone, num_classes=None, min_size=image_size, max_size=image_size, image_mean=list(mean),
        image_std=list(std), size_divisible=image_size, _skip_resize=True,
        rpn_anchor_generator=AnchorGenerator(tuple((s,) for s in anchor_sizes), ((0.5, 1.0, 2.0),) * len(anchor_sizes)),
        rpn_head=RPNHead(c, 3, conv_depth=2), rpn_pre_nms_top_n_train=2 * proposals,
        rpn_post_nms_top_n_train=proposals, box_batch_size_per_image=rois_per_image,
        box_roi_pool=LevelRoIAlign(LEVELS, 7, backbone.strides, aligned=roi_aligned),
        box_head=FastRCNNConvFCHead((c, 7, 7), [c] * head_convs, [box_fc], norm_layer=LayerNorm2d),
        box_predictor=FastRCNNPredictor(box_fc, num_classes + 1), box_score_thresh=score_thresh,
        mask_roi_pool=LevelRoIAlign(LEVELS, 14, backbone.strides, aligned=roi_aligned),
        mask_head=MaskRCNNHeads(c, [c] * head_convs, 1, norm_layer=LayerNorm2d),
        mask_predictor=MaskRCNNPredictor(c, c, num_classes + 1))

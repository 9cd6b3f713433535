"""Exported timm ViT weights -> a checkpoint detectron2's ViTDet loads by exact key names.

detectron2's `ViT` backbone (detectron2/modeling/backbone/vit.py) names its parameters as timm does
(`patch_embed.proj`, `pos_embed`, `blocks.i.{norm1,attn.qkv,attn.proj,norm2,mlp.fc1,mlp.fc2}`) and
sits at `backbone.net.` inside the detector. It has no class token, no final norm and no head, and
keeps the pretraining `pos_embed` (1, 1 + N, D) as is (`pretrain_use_cls_token=True` drops the
class row and interpolates the grid at run time). So the conversion is: drop what it lacks, prefix
the rest. Loading by exact names avoids detectron2's suffix-matching heuristics, which would
otherwise try to put the ViT's final `norm.weight` into a feature-pyramid norm.
"""

from __future__ import annotations

import math
import re

import torch

PREFIX = "backbone.net."


class ConversionError(ValueError):
    """Weights that detectron2's ViT cannot hold."""

DROPPED = re.compile(r"^(cls_token|norm\.(weight|bias)|fc_norm\..*|head\..*|head_drop\..*)$")
SUPPORTED = re.compile(r"^(pos_embed|patch_embed\.proj\.(weight|bias)|"
                       r"blocks\.\d+\.(norm1|norm2|attn\.qkv|attn\.proj|mlp\.fc1|mlp\.fc2)\.(weight|bias))$")


def timm_to_vitdet(state_dict: dict[str, torch.Tensor], prefix: str = PREFIX,
                   pretrain_use_cls_token: bool = True) -> dict[str, torch.Tensor]:
    """A timm `VisionTransformer` state dict -> detectron2 ViTDet backbone keys under `prefix`.

    `pretrain_use_cls_token` must match the detectron2 config's `ViT(pretrain_use_cls_token=...)`:
    True keeps pos_embed's class row (1, 1 + N, D), False drops it (1, N, D).
    """
    out = {}
    for key, value in state_dict.items():
        if DROPPED.match(key):
            continue
        if not SUPPORTED.match(key):
            raise ConversionError(f"weight {key!r} has no place in detectron2's ViT (layer scale, register tokens and "
                             f"q/k norms are not supported); export a plain timm vit_*_patch16 encoder")
        out[prefix + key] = value
    if prefix + "pos_embed" not in out or "cls_token" not in state_dict:
        raise ConversionError("the weights lack pos_embed or cls_token; ViTDet needs a timm ViT with absolute position "
                         "embeddings and a class token, as `python -m pretraining.export --to timm` writes")
    pos = out[prefix + "pos_embed"]
    grid = math.isqrt(pos.shape[1] - 1)
    if grid * grid != pos.shape[1] - 1:
        raise ConversionError(f"pos_embed has {pos.shape[1]} rows, not 1 + a square grid; ViTDet needs a square "
                         f"pretraining size")
    if not pretrain_use_cls_token:
        out[prefix + "pos_embed"] = pos[:, 1:].clone()
    return out


def save_vitdet_checkpoint(state_dict: dict[str, torch.Tensor], path: str, **kwargs) -> int:
    """Write `{"model": timm_to_vitdet(state_dict)}` for `train.init_checkpoint=path`; returns the
    number of tensors written."""
    converted = timm_to_vitdet(state_dict, **kwargs)
    torch.save({"model": {k: v.contiguous() for k, v in converted.items()}, "__author__": "c2fmae"}, path)
    return len(converted)

"""Where the class token looks: its last-block attention over the patches, and the share of it that
falls on the ground-truth objects (the paper's "attention drift", measured on data with exact maps).

`cls_attention` recomputes the last block's attention probabilities from its own weights (timm's
`Block` runs fused attention and never materialises them). `attention_mass` weighs each patch by
the fraction of its pixels inside the objects, so uniform attention scores the objects' area share.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


@torch.no_grad()
def cls_attention(tokens: torch.Tensor, blocks: nn.Sequential) -> torch.Tensor:
    """Class-token attention over the patch tokens in the last of `blocks` (timm `Block`s), mean over heads.

    tokens: (B, 1 + N, D) the blocks' input, class token first. Returns (B, N), each row the attention
    the class token pays to the patches, renormalised to sum to 1 (its attention to itself left out).
    """
    x = blocks[:-1](tokens)
    last = blocks[-1]
    attn = last.attn
    B, L, D = x.shape
    qkv = attn.qkv(last.norm1(x)).reshape(B, L, 3, attn.num_heads, D // attn.num_heads).permute(2, 0, 3, 1, 4)
    q, k = attn.q_norm(qkv[0]), attn.k_norm(qkv[1])  # (B, h, L, D/h) each
    probs = F.softmax((q[:, :, :1] * attn.scale) @ k.transpose(-2, -1), dim=-1)[:, :, 0]  # (B, h, L)
    patches = probs.mean(1)[:, 1:]  # (B, N)
    return patches / patches.sum(1, keepdim=True)


def patch_fraction(mask: torch.Tensor, patch_size: int) -> torch.Tensor:
    """(B, H, W) bool -> (B, N) share of each patch's pixels that are True, patches row-major."""
    B, H, W = mask.shape
    pooled = F.avg_pool2d(mask[:, None].float(), patch_size)  # (B, 1, h, w)
    return pooled.flatten(1)


def attention_mass(attention: torch.Tensor, fraction: torch.Tensor) -> torch.Tensor:
    """(B, N) attention rows summing to 1, (B, N) object fraction per patch -> (B,) attention on the objects."""
    return (attention * fraction).sum(1)

"""The shared ViT encoder: every modality's visible tokens, plus one global token, in one sequence.

Laid out so its RGB path is exactly timm's VisionTransformer (`vit_*_patch16_224`, no head): the
blocks are timm's `Block`s under `blocks`, the final norm is `norm`, the RGB adapter is a
`PatchEmbed`, and the global token becomes `cls_token` with a zero position row
(`timm_state_dict`).
"""

from __future__ import annotations

from functools import partial

import torch
from timm.models.vision_transformer import Block
from torch import nn

from pretraining.models.adapters import build_adapter, sincos_pos_embed
from pretraining.models.masking import gather_tokens


class Encoder(nn.Module):
    def __init__(
        self,
        modalities: tuple[str, ...],
        img_size: int,
        patch_size: int,
        embed_dim: int,
        depth: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        num_semantic_classes: int = 0,
        semantic_class_dim: int = 64,
        semantic_downsample: int = 4,
        input_modalities: tuple[str, ...] | None = None,
    ):
        super().__init__()
        self.modalities = modalities
        self.inputs = input_modalities or modalities  # the rest are only decoded: no adapter, never visible
        self.grid_size = img_size // patch_size
        self.adapters = nn.ModuleDict({
            m: build_adapter(m, img_size, patch_size, embed_dim, num_semantic_classes,
                             semantic_class_dim, semantic_downsample)
            for m in self.inputs
        })
        # Fixed sin-cos positions shared by all modalities; a learned embedding tells modalities apart.
        self.register_buffer("pos_embed", sincos_pos_embed(self.grid_size, embed_dim), persistent=False)  # (N, D)
        self.modality_embed = nn.Parameter(torch.zeros(len(modalities), embed_dim))  # (M, D)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))  # the global token
        norm_layer = partial(nn.LayerNorm, eps=1e-6)
        self.blocks = nn.Sequential(*[
            Block(embed_dim, num_heads, mlp_ratio, qkv_bias=True, norm_layer=norm_layer) for _ in range(depth)
        ])
        self.norm = norm_layer(embed_dim)

    def tokens(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        """All tokens of all modalities with positions and modality embeddings: (B, M * N, D); zeros in the
        blocks of modalities that are not inputs (masking never makes them visible)."""
        B, N = inputs["rgb"].shape[0], self.pos_embed.shape[0]
        return torch.cat([
            self.adapters[m](inputs[m]) + self.pos_embed + self.modality_embed[i]  # (B, N, D)
            if m in self.adapters else self.pos_embed.new_zeros(B, N, self.pos_embed.shape[1])
            for i, m in enumerate(self.modalities)
        ], dim=1)

    def forward(self, inputs: dict[str, torch.Tensor], visible: torch.Tensor) -> torch.Tensor:
        """inputs: modality -> its batch tensor; visible: (B, V) sorted token indices.

        Returns (B, 1 + V, D): the global token, then the visible tokens in `visible` order.
        """
        x = gather_tokens(self.tokens(inputs), visible)  # (B, V, D)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)  # (B, 1 + V, D)
        return self.norm(self.blocks(x))

    def encode_rgb(self, images: torch.Tensor) -> torch.Tensor:
        """RGB only, all patches, like timm's forward_features: (B, 3, H, W) -> (B, 1 + N, D)."""
        return self.norm(self.blocks(self.rgb_input_tokens(images)))

    def rgb_input_tokens(self, images: torch.Tensor) -> torch.Tensor:
        """What `blocks` receive for RGB-only input: (B, 3, H, W) -> (B, 1 + N, D), global token first."""
        x = self._rgb_tokens(images)  # (B, N, D)
        return torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)

    def _rgb_tokens(self, images: torch.Tensor) -> torch.Tensor:
        i = self.modalities.index("rgb")
        return self.adapters["rgb"](images) + self.pos_embed + self.modality_embed[i]  # (B, N, D)

    def timm_state_dict(self) -> dict[str, torch.Tensor]:
        """The RGB path under timm VisionTransformer names (num_classes=0)."""
        i = self.modalities.index("rgb")
        rgb_pos = (self.pos_embed + self.modality_embed[i]).detach()  # (N, D)
        pos_embed = torch.cat([torch.zeros_like(rgb_pos[:1]), rgb_pos])[None]  # (1, 1 + N, D)
        state = {"cls_token": self.cls_token.detach(), "pos_embed": pos_embed}
        state.update({f"patch_embed.{k}": v for k, v in self.adapters["rgb"].state_dict().items()})
        state.update({f"blocks.{k}": v for k, v in self.blocks.state_dict().items()})
        state.update({f"norm.{k}": v for k, v in self.norm.state_dict().items()})
        return state

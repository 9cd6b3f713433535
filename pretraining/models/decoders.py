"""Decoders: from the encoder's (B, 1 + V, D) tokens to per-patch predictions of each modality.

- `ParallelDecoder`: one stage per modality, each decoding on its own (C2FMAE without its links).
- `CascadedDecoder` (C2FMAE): the same stages run coarse to fine (semantic -> instance -> RGB),
  and each stage's queries also carry a projection of the previous stage's output tokens, so a
  finer level is predicted from the coarser one. Removing that link gives `ParallelDecoder`
  exactly, which is what makes the two an ablation pair. The RGB prediction of the cascade passes
  through three stages; `stage_units` gives a parallel stage that depth (see docs/model.md).
- `MultiMAEDecoder` (MultiMAE, as its public code builds it): one `OutputAdapter` per modality,
  each with its own context projection, mask token and embeddings, and no residual around the
  cross-attention.
- `MAEDecoder` (MAE): RGB only, mask tokens and visible tokens through plain transformer blocks.

Every decoder maps (x (B, 1 + V, D), visible (B, V)) to {modality: (B, N, patch_dim)}. A modality
in `fp32_heads` gets a `Float32Linear` head: its logits in fp32 under autocast.
"""

from __future__ import annotations

from functools import partial

import torch
import torch.nn.functional as F
from timm.layers import Mlp
from timm.models.vision_transformer import Block
from torch import nn

from pretraining.models.adapters import sincos_pos_embed
from pretraining.models.masking import gather_tokens, scatter_tokens

LayerNorm = partial(nn.LayerNorm, eps=1e-6)


class CrossAttention(nn.Module):
    """Queries attend to a context sequence (torch's fused attention)."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        """x: (B, N, D), context: (B, L, D) -> (B, N, D)."""
        B, N, D = x.shape
        h = self.num_heads
        q = self.q(x).view(B, N, h, D // h).transpose(1, 2)  # (B, h, N, D/h)
        k, v = self.kv(context).view(B, -1, 2, h, D // h).permute(2, 0, 3, 1, 4)  # 2 x (B, h, L, D/h)
        out = F.scaled_dot_product_attention(q, k, v)  # (B, h, N, D/h)
        return self.proj(out.transpose(1, 2).reshape(B, N, D))


class CrossAttentionBlock(nn.Module):
    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.norm_q, self.norm_context, self.norm2 = LayerNorm(dim), LayerNorm(dim), LayerNorm(dim)
        self.attn = CrossAttention(dim, num_heads)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm_q(x), self.norm_context(context))
        return x + self.mlp(self.norm2(x))


class DecoderUnit(nn.Module):
    """Cross-attend to the encoder's tokens, then `depth` self-attention blocks."""

    def __init__(self, dim: int, depth: int, num_heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.cross = CrossAttentionBlock(dim, num_heads, mlp_ratio)
        self.blocks = nn.Sequential(*[
            Block(dim, num_heads, mlp_ratio, qkv_bias=True, norm_layer=LayerNorm) for _ in range(depth)
        ])

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        return self.blocks(self.cross(x, context))


class Float32Linear(nn.Linear):
    """nn.Linear computed in fp32 even under autocast: (..., in) -> (..., out) fp32. The same parameters
    and state_dict keys as nn.Linear; without autocast (CPU runs) exactly nn.Linear."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.amp.is_autocast_available(x.device.type):  # the meta device (FLOP counts): no autocast
            return F.linear(x.float(), self.weight, self.bias)
        with torch.autocast(x.device.type, enabled=False):
            return F.linear(x.float(), self.weight, self.bias)


def _head(dim: int, patch_dim: int, fp32: bool) -> nn.Linear:
    return (Float32Linear if fp32 else nn.Linear)(dim, patch_dim)


class DecoderStage(nn.Module):
    """One modality: `units` decoder units (1 in C2FMAE), then a norm and the head (fp32 if `head_fp32`)."""

    def __init__(self, dim: int, depth: int, num_heads: int, patch_dim: int, mlp_ratio: float = 4.0,
                 units: int = 1, head_fp32: bool = False):
        super().__init__()
        self.units = nn.ModuleList([DecoderUnit(dim, depth, num_heads, mlp_ratio) for _ in range(units)])
        self.norm = LayerNorm(dim)
        self.head = _head(dim, patch_dim, head_fp32)

    def forward(self, queries: torch.Tensor, context: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """queries: (B, N, Dd), context: (B, L, Dd) -> (output tokens (B, N, Dd), prediction (B, N, patch_dim))."""
        x = queries
        for unit in self.units:
            x = unit(x, context)
        x = self.norm(x)
        return x, self.head(x)


class ParallelDecoder(nn.Module):
    """Every modality decodes independently from the encoder's tokens (MultiMAE's design with shared
    embeddings; `MultiMAEDecoder` is the faithful one).

    A stage's queries are, at each position of its modality, the encoder's output token when that
    token was visible, else a shared mask token, plus decoder position and modality embeddings.
    The context for cross-attention is all encoder tokens (global token included) with the same
    embeddings of where each came from. `stage_units[i]`: decoder units of stage i (default 1 each).
    """

    def __init__(self, modalities: tuple[str, ...], encoder_dim: int, dim: int, depth: int, num_heads: int,
                 patch_dims: dict[str, int], grid_size: int, mlp_ratio: float = 4.0,
                 stage_units: tuple[int, ...] | None = None, fp32_heads: tuple[str, ...] = ()):
        super().__init__()
        stage_units = stage_units or (1,) * len(modalities)
        self.modalities = modalities
        self.num_positions = grid_size**2
        self.proj = nn.Linear(encoder_dim, dim)
        self.mask_token = nn.Parameter(torch.zeros(dim))
        self.register_buffer("pos_embed", sincos_pos_embed(grid_size, dim), persistent=False)  # (N, Dd)
        self.modality_embed = nn.Parameter(torch.zeros(len(modalities), 1, dim))  # (M, 1, Dd)
        self.stages = nn.ModuleDict({
            m: DecoderStage(dim, depth, num_heads, patch_dims[m], mlp_ratio, units, m in fp32_heads)
            for m, units in zip(modalities, stage_units)
        })

    def queries_and_context(self, x: torch.Tensor, visible: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x: (B, 1 + V, D), visible: (B, V) -> (queries (B, M, N, Dd), context (B, 1 + V, Dd))."""
        B, M, N = x.shape[0], len(self.modalities), self.num_positions
        x = self.proj(x)  # (B, 1 + V, Dd)
        where = (self.modality_embed + self.pos_embed).reshape(M * N, -1)  # (M * N, Dd): token -> embedding
        full = scatter_tokens(x[:, 1:], visible, M * N, self.mask_token)  # (B, M * N, Dd)
        queries = (full + where).view(B, M, N, -1)
        context_where = gather_tokens(where.expand(B, -1, -1), visible)  # (B, V, Dd)
        context = torch.cat([x[:, :1], x[:, 1:] + context_where], dim=1)  # global token: no position
        return queries, context

    def forward(self, x: torch.Tensor, visible: torch.Tensor) -> dict[str, torch.Tensor]:
        queries, context = self.queries_and_context(x, visible)
        return {m: self.stages[m](queries[:, i], context)[1] for i, m in enumerate(self.modalities)}


class CascadedDecoder(ParallelDecoder):
    """C2FMAE's decoder: stages in coarse-to-fine order; stage k's queries add a projection of
    stage k-1's output tokens, so instance is predicted from semantics and RGB from instances.

    `link_shift` > 0 is the control that the links carry information about *this* image: each
    sample's stage receives the coarser stage's tokens of the sample `link_shift` places later in
    the batch (a roll, so every sample gets another's), keeping the parameters and the depth.
    """

    def __init__(self, modalities: tuple[str, ...], *args, link_shift: int = 0, **kwargs):
        super().__init__(modalities, *args, **kwargs)
        dim = self.mask_token.shape[0]
        self.links = nn.ModuleDict({m: nn.Linear(dim, dim) for m in modalities[1:]})
        self.link_shift = link_shift

    def forward(self, x: torch.Tensor, visible: torch.Tensor) -> dict[str, torch.Tensor]:
        queries, context = self.queries_and_context(x, visible)
        first = self.modalities[0]
        tokens, predictions = {}, {}
        tokens[first], predictions[first] = self.stages[first](queries[:, 0], context)
        for i, (coarser, m) in enumerate(zip(self.modalities, self.modalities[1:]), start=1):
            source = torch.roll(tokens[coarser], -self.link_shift, dims=0)  # (B, N, Dd); itself when 0
            q = queries[:, i] + self.links[m](source)  # (B, N, Dd)
            tokens[m], predictions[m] = self.stages[m](q, context)
        return predictions


class OutputAdapter(nn.Module):
    """One MultiMAE output adapter (its public `SpatialOutputAdapter` with task queries and
    cross-attention), for modality `index` of `modalities`.

    Its own context projection, mask token, position embedding (fixed sin-cos, so equal to every
    other adapter's) and one learned embedding per input modality. Queries: this modality's tokens
    (the encoder's where visible, the mask token elsewhere) plus embeddings; context: the visible
    tokens plus embeddings, and the global token. Then cross-attention *without* a residual, an
    MLP with one, `depth` transformer blocks and a linear head (no final norm).
    """

    def __init__(self, modalities: tuple[str, ...], index: int, encoder_dim: int, dim: int, depth: int,
                 num_heads: int, patch_dim: int, grid_size: int, mlp_ratio: float = 4.0, head_fp32: bool = False):
        super().__init__()
        self.index, self.num_modalities, self.num_positions = index, len(modalities), grid_size**2
        self.proj_context = nn.Linear(encoder_dim, dim)
        self.mask_token = nn.Parameter(torch.zeros(dim))
        self.register_buffer("pos_embed", sincos_pos_embed(grid_size, dim), persistent=False)  # (N, Dd)
        self.modality_embed = nn.Parameter(torch.zeros(len(modalities), 1, dim))  # (M, 1, Dd), per input modality
        self.query_norm, self.context_norm, self.out_norm = LayerNorm(dim), LayerNorm(dim), LayerNorm(dim)
        self.cross = CrossAttention(dim, num_heads)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.blocks = nn.Sequential(*[
            Block(dim, num_heads, mlp_ratio, qkv_bias=True, norm_layer=LayerNorm) for _ in range(depth)
        ])
        self.head = _head(dim, patch_dim, head_fp32)

    def forward(self, x: torch.Tensor, visible: torch.Tensor) -> torch.Tensor:
        """x: (B, 1 + V, D), visible: (B, V) -> (B, N, patch_dim)."""
        M, N = self.num_modalities, self.num_positions
        x = self.proj_context(x)  # (B, 1 + V, Dd)
        where = (self.modality_embed + self.pos_embed).reshape(M * N, -1)  # (M * N, Dd)
        full = scatter_tokens(x[:, 1:], visible, M * N, self.mask_token) + where  # (B, M * N, Dd)
        queries = full[:, self.index * N:(self.index + 1) * N]  # (B, N, Dd)
        context = torch.cat([x[:, :1], gather_tokens(full, visible)], dim=1)  # global token: no embedding
        y = self.cross(self.query_norm(queries), self.context_norm(context))  # no residual (MultiMAE's)
        y = y + self.mlp(self.out_norm(y))
        return self.head(self.blocks(y))


class MultiMAEDecoder(nn.Module):
    """MultiMAE's decoders: one independent `OutputAdapter` per modality."""

    def __init__(self, modalities: tuple[str, ...], encoder_dim: int, dim: int, depth: int, num_heads: int,
                 patch_dims: dict[str, int], grid_size: int, mlp_ratio: float = 4.0,
                 fp32_heads: tuple[str, ...] = ()):
        super().__init__()
        self.adapters = nn.ModuleDict({
            m: OutputAdapter(modalities, i, encoder_dim, dim, depth, num_heads, patch_dims[m], grid_size, mlp_ratio,
                             m in fp32_heads)
            for i, m in enumerate(modalities)
        })

    def forward(self, x: torch.Tensor, visible: torch.Tensor) -> dict[str, torch.Tensor]:
        return {m: adapter(x, visible) for m, adapter in self.adapters.items()}


class MAEDecoder(nn.Module):
    """MAE's decoder: visible tokens and mask tokens (with the global token) through transformer blocks."""

    def __init__(self, encoder_dim: int, dim: int, depth: int, num_heads: int, patch_dim: int, grid_size: int,
                 mlp_ratio: float = 4.0):
        super().__init__()
        self.num_positions = grid_size**2
        self.proj = nn.Linear(encoder_dim, dim)
        self.mask_token = nn.Parameter(torch.zeros(dim))
        self.register_buffer("pos_embed", sincos_pos_embed(grid_size, dim), persistent=False)  # (N, Dd)
        self.blocks = nn.Sequential(*[
            Block(dim, num_heads, mlp_ratio, qkv_bias=True, norm_layer=LayerNorm) for _ in range(depth)
        ])
        self.norm = LayerNorm(dim)
        self.head = nn.Linear(dim, patch_dim)

    def forward(self, x: torch.Tensor, visible: torch.Tensor) -> dict[str, torch.Tensor]:
        x = self.proj(x)  # (B, 1 + V, Dd)
        full = scatter_tokens(x[:, 1:], visible, self.num_positions, self.mask_token) + self.pos_embed  # (B, N, Dd)
        x = self.norm(self.blocks(torch.cat([x[:, :1], full], dim=1)))  # (B, 1 + N, Dd)
        return {"rgb": self.head(x[:, 1:])}

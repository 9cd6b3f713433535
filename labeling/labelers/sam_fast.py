"""SAM's modules called for throughput, with the same arithmetic as segment_anything's own calls.

- `fused_encoder(encoder)`: the image encoder with its attention through PyTorch's
  `scaled_dot_product_attention` (flash / memory-efficient kernels on a GPU), the decomposed
  relative-position term passed as the additive mask; the stock block writes the (heads, N, N)
  attention matrix, adds the bias, softmaxes and multiplies in separate kernels. It shares the
  encoder's weights and leaves the encoder itself unchanged (the stock generator can still run it).
- `decode_points(sam, embeddings, owner, coords, decoder)`: the mask decoder over point prompts of
  several images (crops) in one call. The stock `MaskDecoder.predict_masks` repeats one image
  embedding for every prompt of a call, so a call cannot mix images; here each prompt gathers its
  own image's embedding. It runs in the embeddings' dtype: given bf16 embeddings and a bf16 copy of
  the decoder (`bf16_decoder`), every activation is bf16, the (P, C, h, w) per-prompt copies of the
  embedding included; the prompt encoder stays fp32 (point positions need its precision) and its
  outputs are cast. Otherwise the calls are segment_anything's own modules, in its order.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, Sam
from segment_anything.modeling.image_encoder import Attention, get_rel_pos


class FusedAttention(Attention):
    """segment_anything's encoder `Attention` computed by `F.scaled_dot_product_attention`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, H, W, _ = x.shape
        qkv = self.qkv(x).reshape(B, H * W, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)  # (3, B, heads, N, d)
        q, k, v = qkv.unbind(0)
        bias = None
        if self.use_rel_pos:  # decomposed relative positions (MViTv2): a row term plus a column term
            r_q = q.reshape(B * self.num_heads, H, W, -1)
            rel_h = torch.einsum("bhwc,hkc->bhwk", r_q, rel_pos_table(H, H, self.rel_pos_h))  # (B*heads, H, W, H)
            rel_w = torch.einsum("bhwc,wkc->bhwk", r_q, rel_pos_table(W, W, self.rel_pos_w))  # (B*heads, H, W, W)
            bias = (rel_h[..., :, None] + rel_w[..., None, :]).reshape(B, self.num_heads, H * W, H * W)
        x = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)  # scale head_dim ** -0.5, as the stock
        x = x.view(B, self.num_heads, H, W, -1).permute(0, 2, 3, 1, 4).reshape(B, H, W, -1)
        return self.proj(x)


def rel_pos_table(q_size: int, k_size: int, rel_pos: torch.Tensor) -> torch.Tensor:
    """segment_anything's `get_rel_pos` (q_size, k_size, C), its index built on rel_pos's device: the
    stock one builds it on the CPU, and indexing a GPU tensor with it waits for a blocking copy."""
    if rel_pos.shape[0] != 2 * max(q_size, k_size) - 1:  # another input size: the stock interpolation
        return get_rel_pos(q_size, k_size, rel_pos)
    device = rel_pos.device
    q_coords = torch.arange(q_size, device=device)[:, None] * max(k_size / q_size, 1.0)
    k_coords = torch.arange(k_size, device=device)[None, :] * max(q_size / k_size, 1.0)
    relative = (q_coords - k_coords) + (k_size - 1) * max(q_size / k_size, 1.0)
    return rel_pos[relative.long()]


def fused_encoder(encoder: ImageEncoderViT) -> ImageEncoderViT:
    """`encoder` with every attention block a `FusedAttention`: new module objects around the same
    parameters (nothing is copied but the module shells), the original left as it was."""
    fused = _shell(encoder)
    fused.blocks = torch.nn.ModuleList()
    for block in encoder.blocks:
        shell = _shell(block)
        shell.attn = copy.copy(block.attn)
        shell.attn.__class__ = FusedAttention
        fused.blocks.append(shell)
    return fused


def _shell(module: torch.nn.Module) -> torch.nn.Module:
    """A shallow copy whose submodules can be replaced without touching `module`'s."""
    shell = copy.copy(module)
    shell._modules = dict(module._modules)
    return shell


def bf16_decoder(decoder: MaskDecoder) -> MaskDecoder:
    """A bf16 copy of SAM's mask decoder (weights and buffers), the original left as it was."""
    return copy.deepcopy(decoder).to(torch.bfloat16)


def point_embeddings(prompt_encoder: PromptEncoder, coords: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """What `prompt_encoder(points=(coords[:, None], ones), boxes=None, masks=None)` returns for one
    positive point per prompt: sparse (P, 2, C), the point's embedding then the padding point's,
    and dense (P, C, h, w). The same arithmetic without the stock's boolean-mask updates, each of
    which makes the host wait for the device on a GPU."""
    encoder = prompt_encoder
    pe = encoder.pe_layer.forward_with_coords(coords[:, None, :] + 0.5, encoder.input_image_size)  # (P, 1, C)
    point = pe + encoder.point_embeddings[1].weight  # label 1: a foreground point
    padding = (torch.zeros_like(pe) + encoder.not_a_point_embed.weight)  # the padding point's label -1
    dense = encoder.no_mask_embed.weight.reshape(1, -1, 1, 1).expand(len(coords), -1, *encoder.image_embedding_size)
    return torch.cat([point, padding], dim=1), dense


def decode_points(sam: Sam, embeddings: torch.Tensor, owner: torch.Tensor, coords: torch.Tensor,
                  decoder: MaskDecoder | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """SAM's three multimask outputs for point prompts of several images in one decoder call.

    embeddings: (J, C, h, w) image embeddings; owner: (P,) int64, the embedding of each prompt;
    coords: (P, 2) float xy points in the encoder's input frame (`ResizeLongestSide.apply_coords`);
    decoder: `sam.mask_decoder` (the default) or a copy in the embeddings' dtype (`bf16_decoder`).
    Returns low-resolution mask logits (P, 3, 4h, 4w) in the embeddings' dtype and predicted IoUs
    (P, 3), as `sam.mask_decoder(..., multimask_output=True)` gives for each image's prompts alone.
    """
    decoder = sam.mask_decoder if decoder is None else decoder
    dtype = embeddings.dtype
    sparse, dense = point_embeddings(sam.prompt_encoder, coords)
    sparse, dense = sparse.to(dtype), dense.to(dtype)
    output_tokens = torch.cat([decoder.iou_token.weight, decoder.mask_tokens.weight], dim=0)
    tokens = torch.cat([output_tokens.expand(len(coords), -1, -1), sparse], dim=1)  # (P, 1 + masks + 2, C)
    src = embeddings[owner] + dense  # (P, C, h, w): each prompt's own image
    pos = sam.prompt_encoder.get_dense_pe().to(dtype).expand(len(coords), -1, -1, -1)
    b, c, h, w = src.shape
    hs, src = decoder.transformer(src, pos, tokens)
    mask_tokens = hs[:, 1 : 1 + decoder.num_mask_tokens, :]
    upscaled = decoder.output_upscaling(src.transpose(1, 2).view(b, c, h, w))  # (P, C', 4h, 4w)
    hyper = torch.stack([mlp(mask_tokens[:, i, :]) for i, mlp in enumerate(decoder.output_hypernetworks_mlps)], 1)
    b, c, h, w = upscaled.shape
    masks = (hyper @ upscaled.view(b, c, h * w)).view(b, -1, h, w)
    iou = decoder.iou_prediction_head(hs[:, 0, :])
    return masks[:, 1:], iou[:, 1:]  # the multimask outputs (the first token is the single-mask one)

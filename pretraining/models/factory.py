"""Named models: factory names spell the architecture, as in MAE and timm.

    c2fmae_vit_{tiny,small,base,large}_patch16          cascaded decoder, progressive masking
    multimae_vit_{tiny,small,base}_patch16              parallel decoders, random masking
    mae_vit_{tiny,small,base,large}_patch16_dec512d8b   RGB only, MAE decoder, 75% random masking

Each factory takes `num_semantic_classes` (from `DatasetMetadata.num_semantic_classes`; MAE
ignores it) and keyword overrides of any `ModelConfig` or `MaskingConfig` field. The ablation
switches are `decoder="cascaded" | "parallel"` and `masking="progressive" | "random" |
"semantic" | "instance"`. With another `img_size`, the visible token count keeps the recipe's
share of all tokens (98 / 588, or 49 / 196 for MAE) unless `num_visible` is given.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

from pretraining.models.autoencoder import MaskedAutoencoder, ModelConfig
from pretraining.models.masking import MODALITIES, MaskingConfig

SIZES = {  # embed_dim, depth, num_heads: timm's ViT sizes
    "tiny": (192, 12, 3),
    "small": (384, 12, 6),
    "base": (768, 12, 12),
    "large": (1024, 24, 16),
}
_MODEL_FIELDS = {f.name for f in dataclasses.fields(ModelConfig)}
_MASKING_FIELDS = {f.name for f in dataclasses.fields(MaskingConfig)} - {"strategy", "num_positions"}


def build(size: str, num_semantic_classes: int, visible_share: float, masking: str,
          overrides: dict, **recipe) -> MaskedAutoencoder:
    """A model of one ViT size from a family's recipe, with the caller's overrides on top."""
    embed_dim, depth, num_heads = SIZES[size]
    masking = overrides.pop("masking", masking)
    masking_kw = {k: overrides.pop(k) for k in list(overrides) if k in _MASKING_FIELDS}
    unknown = set(overrides) - _MODEL_FIELDS
    if unknown:
        raise TypeError(f"Unknown model option(s) {sorted(unknown)}; see ModelConfig and MaskingConfig.")
    kw = dict(embed_dim=embed_dim, depth=depth, num_heads=num_heads, timm_arch=f"vit_{size}_patch16_224",
              num_semantic_classes=num_semantic_classes, **recipe)
    kw.update(overrides)
    num_positions = (kw.get("img_size", 224) // kw.get("patch_size", 16)) ** 2
    if isinstance(masking, str):
        num_tokens = len(kw.get("modalities", MODALITIES)) * num_positions
        masking_kw.setdefault("num_visible", max(1, round(visible_share * num_tokens)))
        masking = MaskingConfig(strategy=masking, num_positions=num_positions, **masking_kw)
    return MaskedAutoencoder(ModelConfig(masking=masking, **kw))


def _c2fmae(size: str) -> Callable[..., MaskedAutoencoder]:
    def factory(num_semantic_classes: int = 133, **overrides) -> MaskedAutoencoder:
        return build(size, num_semantic_classes, 98 / 588, "progressive", overrides,
                     decoder="cascaded", decoder_dim=256, decoder_depth=2, decoder_heads=8)

    factory.__name__ = factory.__qualname__ = f"c2fmae_vit_{size}_patch16"
    factory.__doc__ = f"C2FMAE, ViT-{size[0].upper()}/16 encoder, cascaded 256-d x 2-block stages, progressive masking."
    return factory


def _multimae(size: str) -> Callable[..., MaskedAutoencoder]:
    def factory(num_semantic_classes: int = 133, **overrides) -> MaskedAutoencoder:
        return build(size, num_semantic_classes, 98 / 588, "random", overrides,
                     decoder="parallel", decoder_dim=256, decoder_depth=2, decoder_heads=8)

    factory.__name__ = factory.__qualname__ = f"multimae_vit_{size}_patch16"
    factory.__doc__ = f"MultiMAE, ViT-{size[0].upper()}/16 encoder, parallel 256-d x 2-block decoders, 98 visible tokens."
    return factory


def _mae(size: str) -> Callable[..., MaskedAutoencoder]:
    def factory(num_semantic_classes: int = 0, **overrides) -> MaskedAutoencoder:
        return build(size, num_semantic_classes, 0.25, "random", overrides, modalities=("rgb",),
                     decoder="mae", decoder_dim=512, decoder_depth=8, decoder_heads=16)

    factory.__name__ = factory.__qualname__ = f"mae_vit_{size}_patch16_dec512d8b"
    factory.__doc__ = f"MAE, ViT-{size[0].upper()}/16 encoder, 512-d x 8-block decoder, 75% random masking."
    return factory


c2fmae_vit_tiny_patch16 = _c2fmae("tiny")
c2fmae_vit_small_patch16 = _c2fmae("small")
c2fmae_vit_base_patch16 = _c2fmae("base")
c2fmae_vit_large_patch16 = _c2fmae("large")
multimae_vit_tiny_patch16 = _multimae("tiny")
multimae_vit_small_patch16 = _multimae("small")
multimae_vit_base_patch16 = _multimae("base")
mae_vit_tiny_patch16_dec512d8b = _mae("tiny")
mae_vit_small_patch16_dec512d8b = _mae("small")
mae_vit_base_patch16_dec512d8b = _mae("base")
mae_vit_large_patch16_dec512d8b = _mae("large")

MODELS: dict[str, Callable[..., MaskedAutoencoder]] = {f.__name__: f for f in (
    c2fmae_vit_tiny_patch16, c2fmae_vit_small_patch16, c2fmae_vit_base_patch16, c2fmae_vit_large_patch16,
    multimae_vit_tiny_patch16, multimae_vit_small_patch16, multimae_vit_base_patch16,
    mae_vit_tiny_patch16_dec512d8b, mae_vit_small_patch16_dec512d8b, mae_vit_base_patch16_dec512d8b,
    mae_vit_large_patch16_dec512d8b,
)}

def create_model(name: str, **kwargs) -> MaskedAutoencoder:
    """Build a model by its registered name, e.g. create_model("c2fmae_vit_base_patch16", num_semantic_classes=133)."""
    if name not in MODELS:
        raise ValueError(f"Unknown model {name!r}; choose one of: {', '.join(MODELS)}.")
    return MODELS[name](**kwargs)

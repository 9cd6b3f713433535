"""Named models: factory names spell the architecture, as in MAE and timm.

    c2fmae_vit_{tiny,small,base,large}_patch16          cascaded decoder, progressive masking
    multimae_vit_{tiny,small,base}_patch16              MultiMAE's output adapters, random masking
    mae_vit_{tiny,small,base,large}_patch16_dec512d8b   RGB only, MAE decoder, 75% random masking

Each factory takes `num_semantic_classes` (from `DatasetMetadata.num_semantic_classes`; MAE
ignores it) and keyword overrides of any `ModelConfig`, `MaskingConfig` or `CurriculumConfig`
field (`curriculum=` also takes a dict of the latter's fields). The ablation switches are
`decoder="cascaded" | "parallel"` and `masking="progressive" | "random" | "semantic" |
"instance"`; `parallel_matched_overrides` gives the parallel decoder the cascade's depth at its
FLOPs. With another `img_size`, the visible token count keeps the recipe's share of all tokens
(98 / 588, or 49 / 196 for MAE) unless `num_visible` is given.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable

import torch

from pretraining.models.autoencoder import MaskedAutoencoder, ModelConfig
from pretraining.models.curriculum import CurriculumConfig
from pretraining.models.masking import MODALITIES, MaskingConfig

SIZES = {  # embed_dim, depth, num_heads: timm's ViT sizes
    "tiny": (192, 12, 3),
    "small": (384, 12, 6),
    "base": (768, 12, 12),
    "large": (1024, 24, 16),
}
_MODEL_FIELDS = {f.name for f in dataclasses.fields(ModelConfig)}
_MASKING_FIELDS = {f.name for f in dataclasses.fields(MaskingConfig)} - {"strategy", "num_positions", "curriculum"}
_CURRICULUM_FIELDS = {f.name for f in dataclasses.fields(CurriculumConfig)}


def _curriculum(overrides: dict, recipe: dict) -> CurriculumConfig:
    """A CurriculumConfig from `curriculum=` (a config or a dict of its fields) and flat field overrides."""
    given = overrides.pop("curriculum", recipe.pop("curriculum", {}))
    if isinstance(given, CurriculumConfig):
        given = dataclasses.asdict(given)
    if not isinstance(given, dict):
        raise TypeError(f"curriculum takes a CurriculumConfig or a dict of its fields, got {given!r}.")
    fields = {**given, **{k: overrides.pop(k) for k in list(overrides) if k in _CURRICULUM_FIELDS}}
    unknown = set(fields) - _CURRICULUM_FIELDS
    if unknown:
        raise TypeError(f"Unknown curriculum option(s) {sorted(unknown)}; choose from {sorted(_CURRICULUM_FIELDS)}.")
    return CurriculumConfig(**fields)


MAE_VISIBLE_SHARE = 0.25  # MAE's 49 of 196 tokens


def build(size: str, num_semantic_classes: int, visible_share: float, masking: str,
          overrides: dict, **recipe) -> MaskedAutoencoder:
    """A model of one ViT size from a family's recipe, with the caller's overrides on top."""
    embed_dim, depth, num_heads = SIZES[size]
    overrides = dict(overrides)
    masking = overrides.pop("masking", masking)
    curriculum = _curriculum(overrides, recipe)
    masking_kw = {**{k: recipe.pop(k) for k in list(recipe) if k in _MASKING_FIELDS},
                  **{k: overrides.pop(k) for k in list(overrides) if k in _MASKING_FIELDS}}
    unknown = set(overrides) - _MODEL_FIELDS
    if unknown:
        raise TypeError(f"Unknown model option(s) {sorted(unknown)}; see ModelConfig and MaskingConfig.")
    kw = dict(embed_dim=embed_dim, depth=depth, num_heads=num_heads, timm_arch=f"vit_{size}_patch16_224",
              num_semantic_classes=num_semantic_classes, **recipe)
    kw.update(overrides)
    num_positions = (kw.get("img_size", 224) // kw.get("patch_size", 16)) ** 2
    if isinstance(masking, str):
        modalities = kw.get("modalities", MODALITIES)
        num_tokens = len(modalities) * num_positions
        if kw.get("input_modalities") is not None:
            masking_kw.setdefault("inputs", tuple(modalities.index(m) for m in kw["input_modalities"] if m in modalities))
            # Labels as targets only: the encoder sees MAE's share of the positions it reads, not the
            # family's share of every modality's tokens (which would leave half of RGB visible).
            visible_share, num_tokens = MAE_VISIBLE_SHARE, len(kw["input_modalities"]) * num_positions
        masking_kw.setdefault("num_visible", max(1, round(visible_share * num_tokens)))
        masking = MaskingConfig(strategy=masking, num_positions=num_positions, curriculum=curriculum, **masking_kw)
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
        return build(size, num_semantic_classes, 98 / 588, "random", overrides, decoder="multimae",
                     decoder_dim=256, decoder_depth=2, decoder_heads=8, allocation="rounded")

    factory.__name__ = factory.__qualname__ = f"multimae_vit_{size}_patch16"
    factory.__doc__ = (f"MultiMAE, ViT-{size[0].upper()}/16 encoder, its 256-d x 2-block output adapters, 98 visible "
                       "tokens split by a rounded Dirichlet draw.")
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

def decoder_flops(model: MaskedAutoencoder, batch_size: int = 1) -> int:
    """Forward FLOPs of `model`'s decoder for a batch at the recipe's visible count (torch's
    FlopCounterMode on the meta device: nothing is allocated)."""
    from torch.utils.flop_counter import FlopCounterMode

    cfg = model.cfg
    with torch.device("meta"):
        decoder = copy.deepcopy(model.decoder).to("meta")
        x = torch.zeros(batch_size, 1 + cfg.masking.num_visible, cfg.embed_dim)
        visible = torch.arange(cfg.masking.num_visible).expand(batch_size, -1)
        counter = FlopCounterMode(display=False)
        with counter:
            decoder(x, visible)
    return counter.get_total_flops()


def parallel_matched_overrides(name: str, num_semantic_classes: int = 133, **overrides) -> dict:
    """Overrides that turn model `name`'s cascaded decoder into the depth- and FLOP-matched parallel control.

    In the cascade the prediction of modality k (0-based) passes through k + 1 stages, so the control's
    stage k gets k + 1 decoder units (RGB: 3 cross-attention + 6 blocks, as in the cascade); the
    decoder width is then the multiple of the head count whose decoder FLOPs come closest to the
    cascade's. Returns {decoder, decoder_units, decoder_dim} to add to `overrides`.
    """
    with torch.device("meta"):
        cascade = create_model(name, num_semantic_classes=num_semantic_classes, **overrides)
    cfg = cascade.cfg
    target = decoder_flops(cascade)
    units = tuple(range(1, len(cfg.modalities) + 1))
    best = None
    for dim in range(cfg.decoder_heads, cfg.decoder_dim + 1, cfg.decoder_heads):
        if dim % 4:  # 2D sin-cos position embeddings need a multiple of 4
            continue
        candidate = {"decoder": "parallel", "decoder_units": units, "decoder_dim": dim}
        with torch.device("meta"):
            model = create_model(name, num_semantic_classes=num_semantic_classes, **{**overrides, **candidate})
        gap = abs(decoder_flops(model) / target - 1)
        if best is None or gap < best[0]:
            best = (gap, candidate)
    return best[1]


def create_model(name: str, **kwargs) -> MaskedAutoencoder:
    """Build a model by its registered name, e.g. create_model("c2fmae_vit_base_patch16", num_semantic_classes=133)."""
    if name not in MODELS:
        raise ValueError(f"Unknown model {name!r}; choose one of: {', '.join(MODELS)}.")
    return MODELS[name](**kwargs)

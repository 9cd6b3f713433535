"""Named models: factory names spell the architecture, as in MAE and timm.

    c2fmae_vit_{tiny,small,base,large}_patch16          cascaded decoder, progressive masking
    multimae_vit_{tiny,small,base}_patch16              MultiMAE's output adapters, random masking
    mae_vit_{tiny,small,base,large}_patch16_dec512d8b   RGB only, MAE decoder, 75% random masking

`model_config(name, **overrides)` resolves a name to its whole `ModelConfig` (what training
recipes hold and run folders store); `create_model(name, **overrides)` is
`MaskedAutoencoder(model_config(name, **overrides))`. Overrides: `num_semantic_classes` (from
`DatasetMetadata.num_semantic_classes`; MAE ignores it) and any `ModelConfig`, `MaskingConfig` or
`CurriculumConfig` field (`curriculum=` also takes a dict of the latter's fields). The ablation
switches are `decoder="cascaded" | "parallel"` and `masking="progressive" | "random" | "semantic" |
"instance"`; `parallel_matched_overrides` gives the parallel decoder the cascade's depth at its
FLOPs. With another `img_size`, the visible token count keeps the recipe's share of all tokens
(98 / 588, or 49 / 196 for MAE) unless `num_visible` is given. `derive` fills in the derived
fields (token counts, input indices) for the factories and for `--set model.*` (`rederive`).
"""

from __future__ import annotations

import copy
import dataclasses
import functools
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
_MODEL_FIELDS = {f.name for f in dataclasses.fields(ModelConfig)} - {"arch"}  # arch: the factory's own record
_MASKING_FIELDS = {f.name for f in dataclasses.fields(MaskingConfig)} - {"strategy", "num_positions", "curriculum"}
_CURRICULUM_FIELDS = {f.name for f in dataclasses.fields(CurriculumConfig)}
_SHAPE_FIELDS = ("img_size", "patch_size", "modalities", "input_modalities")  # what the token count follows

MAE_VISIBLE_SHARE = 0.25  # MAE's 49 of 196 tokens

# Each family's recipe: its visible share of all tokens, masking strategy, default semantic class
# count, and the ModelConfig / MaskingConfig fields it fixes (the size's width and depth come from SIZES).
# Squared-error instance offsets: with L1 the instance head never beat the best constant predictor
# (docs/model.md, Losses); ModelConfig keeps "l1", so stored configs written before the switch read back as trained.
FAMILIES = {
    "c2fmae": {"visible_share": 98 / 588, "masking": "progressive", "num_semantic_classes": 133,
               "recipe": {"decoder": "cascaded", "decoder_dim": 256, "decoder_depth": 2, "decoder_heads": 8,
                          "semantic_head_fp32": True, "instance_offset_loss": "mse"}},
    "multimae": {"visible_share": 98 / 588, "masking": "random", "num_semantic_classes": 133,
                 "recipe": {"decoder": "multimae", "decoder_dim": 256, "decoder_depth": 2, "decoder_heads": 8,
                            "allocation": "rounded", "semantic_head_fp32": True, "instance_offset_loss": "mse"}},
    "mae": {"visible_share": MAE_VISIBLE_SHARE, "masking": "random", "num_semantic_classes": 0,
            "recipe": {"modalities": ("rgb",), "decoder": "mae", "decoder_dim": 512, "decoder_depth": 8,
                       "decoder_heads": 16}},
}
_NAMES = {"c2fmae": "c2fmae_vit_{}_patch16", "multimae": "multimae_vit_{}_patch16", "mae": "mae_vit_{}_patch16_dec512d8b"}
_DOCS = {
    "c2fmae": "C2FMAE, ViT-{}/16 encoder, cascaded 256-d x 2-block stages, progressive masking.",
    "multimae": "MultiMAE, ViT-{}/16 encoder, its 256-d x 2-block output adapters, 98 visible tokens split by a "
                "rounded Dirichlet draw.",
    "mae": "MAE, ViT-{}/16 encoder, 512-d x 8-block decoder, 75% random masking.",
}
_SIZES_OF = {"c2fmae": ("tiny", "small", "base", "large"), "multimae": ("tiny", "small", "base"),
             "mae": ("tiny", "small", "base", "large")}
_ARCHS = {_NAMES[family].format(size): (family, size) for family, sizes in _SIZES_OF.items() for size in sizes}


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


def derive(fields: dict, masking: dict, visible_share: float) -> ModelConfig:
    """A ModelConfig with its derived fields filled in: the one place they are derived, for the
    family factories and for `--set model.*` (`rederive`).

    fields: ModelConfig's fields but `masking` (absent ones take ModelConfig's defaults). masking:
    MaskingConfig's fields, `curriculum` a CurriculumConfig; what it lacks of `num_positions` (from
    img_size / patch_size), `inputs` (the indices of input_modalities, when set) and `num_visible`
    (`visible_share` of the tokens the encoder reads: every modality's positions, or the input
    modalities' when set) is derived here.
    """
    modalities = fields.get("modalities", MODALITIES)
    num_positions = (fields.get("img_size", 224) // fields.get("patch_size", 16)) ** 2
    masking = {"num_positions": num_positions, **masking}
    reads = fields.get("input_modalities")
    if reads is not None:
        masking.setdefault("inputs", tuple(modalities.index(m) for m in reads if m in modalities))
    num_tokens = len(reads if reads is not None else modalities) * num_positions
    masking.setdefault("num_visible", max(1, round(visible_share * num_tokens)))
    return ModelConfig(masking=MaskingConfig(**masking), **fields)


def model_config(name: str, **overrides) -> ModelConfig:
    """The resolved config of model `name` with keyword overrides of any `ModelConfig`, `MaskingConfig`
    or `CurriculumConfig` field (`curriculum=` also takes a dict of the latter's fields, `masking=` a
    strategy name or a whole MaskingConfig), e.g. model_config("c2fmae_vit_base_patch16", img_size=96).
    `num_semantic_classes` defaults to 133 (MAE: 0); the trainer sets the dataset's."""
    if name not in _ARCHS:
        raise ValueError(f"Unknown model {name!r}; choose one of: {', '.join(_ARCHS)}.")
    family, size = _ARCHS[name]
    spec = FAMILIES[family]
    embed_dim, depth, num_heads = SIZES[size]
    recipe, overrides = dict(spec["recipe"]), dict(overrides)
    masking = overrides.pop("masking", spec["masking"])
    curriculum = _curriculum(overrides, recipe)
    masking_kw = {**{k: recipe.pop(k) for k in list(recipe) if k in _MASKING_FIELDS},
                  **{k: overrides.pop(k) for k in list(overrides) if k in _MASKING_FIELDS}}
    unknown = set(overrides) - _MODEL_FIELDS
    if unknown:
        raise TypeError(f"Unknown model option(s) {sorted(unknown)}; see ModelConfig and MaskingConfig.")
    kw = dict(arch=name, embed_dim=embed_dim, depth=depth, num_heads=num_heads, timm_arch=f"vit_{size}_patch16_224",
              num_semantic_classes=spec["num_semantic_classes"], **recipe)
    kw.update(overrides)
    if not isinstance(masking, str):  # a whole MaskingConfig: nothing to derive
        return ModelConfig(masking=masking, **kw)
    # Labels as targets only: the encoder sees MAE's share of the positions it reads, not the family's
    # share of every modality's tokens (which would leave half of RGB visible).
    share = MAE_VISIBLE_SHARE if kw.get("input_modalities") is not None else spec["visible_share"]
    return derive(kw, {"strategy": masking, "curriculum": curriculum, **masking_kw}, share)


def rederive(cfg: ModelConfig, fields: dict, given: set[str]) -> ModelConfig:
    """`cfg` with its fields replaced by `fields` (`dataclasses.asdict` form: masking and its curriculum
    as dicts), derived fields following through `derive`; `given`: the dotted field names set explicitly
    (`masking.num_visible`, ...), which are kept as given.

    When img_size, patch_size, modalities or input_modalities change and `masking.num_visible` is not
    given, the visible count keeps `cfg`'s share of the tokens the encoder reads; input_modalities
    changed take the factory's share instead (MAE's with input modalities, else the family's).
    """
    if "arch" in given:
        raise ValueError("arch records the factory the config came from; choose another --config, or set "
                         "the model's fields")
    fields, masking = dict(fields), dict(fields["masking"])
    del fields["masking"]
    masking["curriculum"] = CurriculumConfig(**masking["curriculum"])
    changed = {k for k in _SHAPE_FIELDS if fields[k] != getattr(cfg, k)}
    if changed & {"img_size", "patch_size"} and "masking.num_positions" not in given:
        del masking["num_positions"]
    if changed & {"modalities", "input_modalities"} and "masking.inputs" not in given:
        del masking["inputs"]
    share = 0.0  # unused unless num_visible is derived again
    if changed and "masking.num_visible" not in given:
        del masking["num_visible"]
        share = cfg.masking.num_visible / (len(cfg.input_modalities or cfg.modalities) * cfg.num_positions)
        if "input_modalities" in changed:
            family = _ARCHS.get(cfg.arch, ("",))[0]
            share = MAE_VISIBLE_SHARE if fields["input_modalities"] is not None else \
                FAMILIES[family]["visible_share"] if family else share
    return derive(fields, masking, share)


def _factory(name: str) -> Callable[..., MaskedAutoencoder]:
    family, size = _ARCHS[name]

    def factory(num_semantic_classes: int = FAMILIES[family]["num_semantic_classes"], **overrides) -> MaskedAutoencoder:
        return MaskedAutoencoder(model_config(name, num_semantic_classes=num_semantic_classes, **overrides))

    factory.__name__ = factory.__qualname__ = name
    factory.__doc__ = _DOCS[family].format(size[0].upper())
    return factory


MODELS: dict[str, Callable[..., MaskedAutoencoder]] = {name: _factory(name) for name in _ARCHS}
c2fmae_vit_tiny_patch16 = MODELS["c2fmae_vit_tiny_patch16"]
c2fmae_vit_small_patch16 = MODELS["c2fmae_vit_small_patch16"]
c2fmae_vit_base_patch16 = MODELS["c2fmae_vit_base_patch16"]
c2fmae_vit_large_patch16 = MODELS["c2fmae_vit_large_patch16"]
multimae_vit_tiny_patch16 = MODELS["multimae_vit_tiny_patch16"]
multimae_vit_small_patch16 = MODELS["multimae_vit_small_patch16"]
multimae_vit_base_patch16 = MODELS["multimae_vit_base_patch16"]
mae_vit_tiny_patch16_dec512d8b = MODELS["mae_vit_tiny_patch16_dec512d8b"]
mae_vit_small_patch16_dec512d8b = MODELS["mae_vit_small_patch16_dec512d8b"]
mae_vit_base_patch16_dec512d8b = MODELS["mae_vit_base_patch16_dec512d8b"]
mae_vit_large_patch16_dec512d8b = MODELS["mae_vit_large_patch16_dec512d8b"]


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
    widths = [d for d in range(cfg.decoder_heads, cfg.decoder_dim + 1, cfg.decoder_heads) if d % 4 == 0]  # 2D sin-cos

    @functools.cache
    def flops(dim: int) -> float:
        candidate = {"decoder": "parallel", "decoder_units": units, "decoder_dim": dim}
        with torch.device("meta"):
            return decoder_flops(create_model(name, num_semantic_classes=num_semantic_classes, **{**overrides, **candidate}))

    # Decoder FLOPs grow with the width: bisect for the first width at or above the cascade's, then take
    # the closer of it and the width below (the narrower on a tie).
    lo, hi = 0, len(widths) - 1
    while lo < hi:
        mid = (lo + hi) // 2
        lo, hi = (mid + 1, hi) if flops(widths[mid]) < target else (lo, mid)
    dim = min(widths[max(lo - 1, 0):lo + 1], key=lambda d: abs(flops(d) / target - 1))
    return {"decoder": "parallel", "decoder_units": units, "decoder_dim": dim}


def create_model(name: str, **kwargs) -> MaskedAutoencoder:
    """Build a model by its registered name, e.g. create_model("c2fmae_vit_base_patch16", num_semantic_classes=133):
    `MaskedAutoencoder(model_config(name, **kwargs))`."""
    return MaskedAutoencoder(model_config(name, **kwargs))

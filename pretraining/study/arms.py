"""What the ablation study compares: its scales, its arms (model and switches) and the directions
it tests, fixed before the run (the docstring of pretraining/study/ablations.py says why each one).

An arm's `overrides` are factory overrides (pretraining/models/factory.py), plus two of the study's
own: `rgb_visible_share` (the encoder's visible tokens as a share of one modality's positions:
MAE's 0.25) and `rgb_exposure` (MAE's RGB exposure: every sample sees MAE's count of RGB tokens,
and as many label tokens beside them when the encoder reads labels).
"""

from __future__ import annotations

import ast
from dataclasses import dataclass, fields, replace


@dataclass(frozen=True)
class Scale:
    """Everything that sizes a mode: data, model, schedule, probes, seeds and the lr sweep."""

    name: str
    train_images: int
    probe_train: int
    probe_val: int
    img_size: int
    patch_size: int
    embed_dim: int
    depth: int
    num_heads: int
    decoder_dim: int
    decoder_heads: int
    mae_decoder_depth: int
    epochs: int
    batch_size: int
    lr: float  # the lr of an arm the sweep has not chosen one for
    warmup_epochs: float
    seeds: int
    num_workers: int
    probe_epochs: int  # linear probe on pooled tokens
    patch_probe_epochs: int
    finetune_epochs: int  # the short end-to-end fine-tune
    lr_grid: tuple[float, ...] = ()  # the sweep's candidates (`--sweep-lr`)
    target_radius: tuple[float, float] = (0.28, 0.38)  # the class-defining object's radius, a share of the image


QUICK = Scale("quick", train_images=3072, probe_train=2048, probe_val=1024, img_size=48, patch_size=8, embed_dim=96,
              depth=4, num_heads=3, decoder_dim=64, decoder_heads=4, mae_decoder_depth=8, epochs=9, batch_size=64,
              lr=2e-3, warmup_epochs=1.0, seeds=5, num_workers=0, probe_epochs=60, patch_probe_epochs=15,
              finetune_epochs=3, lr_grid=(1e-3, 2e-3, 4e-3))
FULL = Scale("full", train_images=20000, probe_train=5000, probe_val=2000, img_size=96, patch_size=8, embed_dim=192,
             depth=12, num_heads=3, decoder_dim=128, decoder_heads=4, mae_decoder_depth=8, epochs=100, batch_size=256,
             lr=1.5e-3, warmup_epochs=10.0, seeds=5, num_workers=6, probe_epochs=100, patch_probe_epochs=30,
             finetune_epochs=20, lr_grid=(7.5e-4, 1.5e-3, 3e-3))
SMOKE = Scale("smoke", train_images=32, probe_train=24, probe_val=16, img_size=32, patch_size=8, embed_dim=32,
              depth=1, num_heads=2, decoder_dim=32, decoder_heads=2, mae_decoder_depth=1, epochs=1, batch_size=16,
              lr=1e-3, warmup_epochs=0.5, seeds=2, num_workers=0, probe_epochs=5, patch_probe_epochs=2,
              finetune_epochs=1, lr_grid=(1e-3, 2e-3))
SCALES = {s.name: s for s in (QUICK, FULL, SMOKE)}


def resize(scale: Scale, overrides: list[str]) -> Scale:
    """`scale` with `KEY=VALUE` overrides (`--set epochs=27`), named after them (`quick+epochs=27`) so
    that its default output folder, and the runs reused there, are its own."""
    values = {f.name: getattr(scale, f.name) for f in fields(scale) if f.name != "name"}
    changes = {}
    for item in overrides:
        key, sep, text = (part.strip() for part in item.partition("="))
        if not sep or key not in values:
            raise ValueError(f"--set {item}: write KEY=VALUE with KEY one of {', '.join(values)}.")
        try:
            value = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            value = None
        current = values[key]
        if isinstance(current, float) and isinstance(value, int):
            value = float(value)
        if isinstance(current, tuple) and isinstance(value, list | tuple | float | int):
            value = tuple(float(v) for v in (value if isinstance(value, list | tuple) else (value,)))
        if type(value) is not type(current):
            raise ValueError(f"--set {item}: {key} takes {type(current).__name__}, like {current!r}.")
        changes[key] = value
    if not changes:
        return scale
    return replace(scale, name="+".join([scale.name, *(f"{k}={text}" for k, text in
                                                        ((k, _spell(v)) for k, v in changes.items()))]), **changes)


def _spell(value: object) -> str:
    return ",".join(f"{v:g}" for v in value) if isinstance(value, tuple) else f"{value:g}" \
        if isinstance(value, float) else str(value)


@dataclass(frozen=True)
class Arm:
    model: str  # factory name
    overrides: tuple[tuple[str, object], ...] = ()
    labels: str = "clean"  # which label variant it pretrains on
    matched: bool = False  # add the depth- and FLOP-matched parallel decoder overrides
    train: bool = True  # False: the random-initialised encoder (the floor)


C2F, MAE, MULTI = "c2fmae_vit_tiny_patch16", "mae_vit_tiny_patch16_dec512d8b", "multimae_vit_tiny_patch16"
TARGETS_ONLY = (("input_modalities", ("rgb",)), ("rgb_visible_share", 0.25))  # labels only as targets, MAE's exposure
ARMS = {
    "random_init": Arm(C2F, train=False),
    "mae": Arm(MAE),
    "mae_semantic_guided": Arm(MAE, (("masking", "semantic"),)),
    "multimae": Arm(MULTI),
    "parallel_random": Arm(C2F, (("decoder", "parallel"), ("masking", "random"))),
    "cascade_random": Arm(C2F, (("masking", "random"),)),
    "parallel_progressive": Arm(C2F, (("decoder", "parallel"),)),
    "c2fmae": Arm(C2F),
    "c2fmae_adaptive": Arm(C2F, (("mode", "adaptive"),)),
    "parallel_matched": Arm(C2F, matched=True),
    "cascade_shuffled_links": Arm(C2F, (("cascade_link", "shuffled"),)),
    "c2fmae_reversed": Arm(C2F, (("phases", ("random", "instance", "semantic")),)),
    "c2fmae_shuffled_labels": Arm(C2F, labels="shuffled"),
    # The controls of RGB exposure (issue 31): which of label inputs, RGB share and targets explains a gap.
    "c2fmae_rgb_matched": Arm(C2F, (("rgb_exposure", True),)),  # label inputs beside MAE's RGB tokens
    "c2fmae_label_dropout": Arm(C2F, (("label_dropout", 0.5),)),  # half the samples see RGB only
    "c2fmae_targets_only": Arm(C2F, TARGETS_ONLY),
    # The diagnosis group (`--group diagnose`): what changes the outcome.
    "c2fmae_noisy_labels": Arm(C2F, labels="noisy"),
    "c2fmae_within_regions": Arm(C2F, (("guided_mode", "within"),)),  # guided phases keep part of each region
    "parallel_targets_only": Arm(C2F, (("decoder", "parallel"), *TARGETS_ONLY)),
    # The instance offsets under L1, what runs before the squared-error default trained with (docs/model.md,
    # "Why squared error"): its instance head stays level with the best constant in short trainings.
    "c2fmae_instance_l1": Arm(C2F, (("instance_offset_loss", "l1"),)),
    "targets_only_instance_l1": Arm(C2F, (("instance_offset_loss", "l1"), *TARGETS_ONLY)),
}
GROUPS = {
    "quick": ("random_init", "mae", "c2fmae", "parallel_matched", "c2fmae_rgb_matched", "c2fmae_targets_only",
              "c2fmae_label_dropout"),
    "paper": ("random_init", "mae", "mae_semantic_guided", "multimae", "parallel_random", "cascade_random",
              "parallel_progressive", "c2fmae", "c2fmae_adaptive", "parallel_matched", "cascade_shuffled_links",
              "c2fmae_reversed", "c2fmae_shuffled_labels"),
    "diagnose": ("random_init", "mae", "c2fmae", "c2fmae_noisy_labels", "c2fmae_within_regions", "c2fmae_targets_only",
                 "parallel_targets_only", "c2fmae_instance_l1", "targets_only_instance_l1"),
    "smoke": ("random_init", "mae", "c2fmae", "parallel_matched", "c2fmae_rgb_matched"),
}
# (name, better arm, worse arm, metric, kind): kind ">" the claim, ">=" no worse. "linear" is the
# label-independent probe (appearance); the "shape" metrics are label-informed and rank nothing.
DIRECTIONS = [
    ("D1", "c2fmae", "mae", "linear", ">"),
    ("D1f", "c2fmae", "mae", "finetune", ">"),
    ("D2", "c2fmae", "multimae", "linear", ">"),
    ("D3", "c2fmae", "parallel_matched", "linear", ">"),
    ("D4", "cascade_random", "parallel_random", "linear", ">"),
    ("D5", "c2fmae", "parallel_progressive", "linear", ">"),
    ("D6", "c2fmae", "cascade_shuffled_links", "linear", ">"),
    ("D7", "c2fmae", "cascade_random", "linear", ">"),
    ("D8", "c2fmae", "c2fmae_reversed", "linear", ">"),
    ("D9", "c2fmae_adaptive", "c2fmae", "linear", ">="),
    ("D10", "c2fmae", "c2fmae_shuffled_labels", "linear", ">"),
    ("D11", "c2fmae", "c2fmae_noisy_labels", "linear", ">="),
    ("D12", "mae_semantic_guided", "mae", "linear", ">"),
    ("D13a", "c2fmae", "mae", "texture_miou", ">"),
    ("D13b", "c2fmae", "mae", "attn_objects", ">"),
    ("C1", "c2fmae_rgb_matched", "c2fmae", "linear", ">"),
    ("C2", "c2fmae_rgb_matched", "c2fmae_targets_only", "linear", ">"),
    ("C3", "c2fmae_targets_only", "mae", "linear", ">"),
    ("C4", "c2fmae_label_dropout", "c2fmae", "linear", ">"),
    ("C5", "c2fmae_rgb_matched", "mae", "linear", ">"),
    ("L1", "c2fmae", "mae", "linear_shape", ">"),
    ("L2", "c2fmae", "mae", "miou", ">"),
    ("X4", "c2fmae_targets_only", "parallel_targets_only", "linear", ">"),
    ("X5", "c2fmae_within_regions", "c2fmae", "linear", ">"),
]
LABEL_INFORMED = ("linear_shape", "miou")  # probes of what the label maps carry: not a fair ranking
MAE_RGB_SHARE = 0.25  # MAE's visible share of the RGB positions


def model_overrides(arm: Arm, scale: Scale, num_classes: int) -> dict:
    """The factory overrides of `arm` at `scale` (the study's own switches resolved)."""
    from pretraining.models.factory import parallel_matched_overrides

    args = dict(img_size=scale.img_size, patch_size=scale.patch_size, embed_dim=scale.embed_dim, depth=scale.depth,
                num_heads=scale.num_heads, decoder_dim=scale.decoder_dim, decoder_heads=scale.decoder_heads)
    if arm.model == MAE:
        args["decoder_depth"] = scale.mae_decoder_depth
    args.update(dict(arm.overrides))
    positions = (scale.img_size // scale.patch_size) ** 2
    if "rgb_visible_share" in args:
        args["num_visible"] = round(args.pop("rgb_visible_share") * positions)
    if args.pop("rgb_exposure", False):  # MAE's RGB tokens in every sample, as many label tokens beside them
        args.update(num_visible=2 * round(MAE_RGB_SHARE * positions), rgb_share=0.5)
    if arm.matched:
        args.update(parallel_matched_overrides(arm.model, num_semantic_classes=num_classes, **args))
    return args

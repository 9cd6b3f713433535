"""Export a run's encoder to timm: `python -m pretraining.export RUN --to timm --output DIR`.

DIR gets timm's hub layout (`config.json` naming the architecture, `model.safetensors`), written by
timm's own `save_for_hf` from a timm model that accepted our weights with `strict=True`, and a
README.md saying what the encoder is (config.json's `architecture` must be a registered timm name:
a 2-block 64 px encoder reads `vit_tiny_patch16_224` there, with `model_args` that reshape it). Then

    timm.create_model("local-dir:DIR", pretrained=True, num_classes=0)

loads it offline, and `timm.create_model(ARCH, **model_args)` (both from DIR/config.json; for the
224 px recipes that is just `timm.create_model(ARCH, num_classes=0)`) takes
`safetensors.torch.load_file(DIR/model.safetensors)` with `strict=True`. Only the encoder's RGB path is
exported: the class token is the global token and `forward_features` equals the encoder's
RGB-only features; the semantic/instance adapters and the decoders stay behind.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path

import timm
import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

from pretraining.training import checkpoint as ckpt
from pretraining.training.config import (
    AMENDABLE_KEYS,
    RESUMABLE_KEYS,
    ConfigError,
    TrainConfig,
    differing_keys,
    from_dict,
    to_dict,
)
from pretraining.training.run_folder import CONFIG_FILE, RUN_FILE, build_model, stored_config, upgrade


class ExportError(RuntimeError):
    """The run cannot be exported; the message says why."""


def load_run_model(run_dir: str | Path, checkpoint: str | Path | None = None) -> tuple[torch.nn.Module, Path]:
    """The model of a run with the weights of `checkpoint` (default: the run's newest checkpoint).

    The model is rebuilt from the whole model config stored in the checkpoint itself (never from
    today's factory defaults, nor from the editable RUN/config.json and run.json: those must agree
    with it, but for the keys a resume may change: cadence, amendments and epochs, or the export is refused,
    naming the fields). Runs written before the model config was stored whole are read through
    `run_folder.upgrade`."""
    run_dir = Path(run_dir)
    if not (run_dir / CONFIG_FILE).is_file() or not (run_dir / RUN_FILE).is_file():
        raise ExportError(f"{run_dir} is not a training run folder (no {CONFIG_FILE} / {RUN_FILE}); give the "
                          "--output folder of `python -m pretraining.train`.")
    path = Path(checkpoint) if checkpoint is not None else ckpt.latest_checkpoint(run_dir)
    if path is None or not path.is_file():
        raise ExportError(f"{run_dir} has no checkpoint yet; train until one is written (checkpoint_every) "
                          "or pass --checkpoint.")
    state = ckpt.load_checkpoint(path)
    try:
        cfg, saved_run = stored_config(state)
    except (KeyError, TypeError, ValueError) as err:
        raise ExportError(f"checkpoint {path} does not record its config ({err.__class__.__name__}: {err}); it was "
                          "not written by this code's pretraining.train.") from err
    try:
        on_disk = json.loads((run_dir / CONFIG_FILE).read_text()), json.loads((run_dir / RUN_FILE).read_text())
    except ValueError as err:
        raise ExportError(f"{run_dir / CONFIG_FILE} or {RUN_FILE} is not valid JSON ({err}); restore it, or "
                          "delete the file's edits.") from err
    # A resume's amendments (a learning rate, a loss weight) leave an older checkpoint's config behind config.json.
    # Both are compared as read back (a field the code gained since takes ModelConfig's default in both).
    try:
        on_disk_cfg = from_dict(TrainConfig, upgrade(*on_disk))
    except (KeyError, TypeError, ValueError) as err:
        raise ExportError(f"{run_dir / CONFIG_FILE} cannot be read back ({err.__class__.__name__}: {err}); restore "
                          "it from the checkpoint's config.") from err
    fields = differing_keys(to_dict(cfg), to_dict(on_disk_cfg), ignore=RESUMABLE_KEYS | AMENDABLE_KEYS | {"epochs"})
    if on_disk[1].get("num_semantic_classes") != saved_run.get("num_semantic_classes"):
        fields.append(f"{RUN_FILE} num_semantic_classes")
    if fields:
        raise ExportError(f"{run_dir / CONFIG_FILE} disagrees with the config stored in checkpoint {path.name} "
                          f"(differing: {', '.join(fields)}); the weights were trained with the checkpoint's, so "
                          "undo the edit (nothing was exported).")
    try:
        model = build_model(cfg.model)
        model.load_state_dict(state["model"])
    except (KeyError, TypeError, ValueError, RuntimeError) as err:
        raise ExportError(f"checkpoint {path} does not load into {cfg.model.arch or 'the model'} built from its own "
                          f"config ({_first_problem(err)}); it is damaged or from another version of this code.") from err
    return model.eval(), path


def _first_problem(err: Exception) -> str:
    """The first specific problem of a load_state_dict error, short: "missing key(s) in state_dict: 8
    keys, e.g. encoder.blocks.1.norm1.weight" or "size mismatch for NAME: ..."."""
    lines = [line.strip() for line in str(err).strip().splitlines() if line.strip()]
    first = lines[1] if len(lines) > 1 else (lines[0] if lines else err.__class__.__name__)
    head, _, rest = first.partition(": ")
    names = re.findall(r'"([^"]+)"', rest)
    if head.startswith(("Missing key", "Unexpected key")) and names:
        first = f"{head.lower()}: {len(names)} keys, e.g. {names[0]}"
    return first.rstrip(".")[:300]


def timm_model_args(model: torch.nn.Module) -> dict:
    """Arguments that build timm's `cfg.timm_arch` with our encoder's shape (empty for standard sizes)."""
    cfg = model.cfg
    reference = timm.create_model(cfg.timm_arch, pretrained=False, num_classes=0, img_size=cfg.img_size)
    args = {"img_size": cfg.img_size} if cfg.img_size != 224 else {}
    if (reference.embed_dim, len(reference.blocks)) != (cfg.embed_dim, cfg.depth):
        args.update(embed_dim=cfg.embed_dim, depth=cfg.depth, num_heads=cfg.num_heads)
    return args


def _family(model: torch.nn.Module) -> str:
    """c2fmae, multimae or mae: which pretraining produced the weights."""
    cfg = model.cfg
    if cfg.modalities == ("rgb",):
        return "mae"
    return "c2fmae" if cfg.decoder == "cascaded" else "multimae"


def readme(model: torch.nn.Module, args: dict, source: str | None = None) -> str:
    """DIR/README.md: what the weights are, where a reader looks first (config.json's `architecture` must be a
    name timm has registered, e.g. vit_tiny_patch16_224 for a 2-block 64 px encoder)."""
    cfg = model.cfg
    what = (f"a ViT encoder of {cfg.depth} blocks, {cfg.embed_dim} wide, {cfg.num_heads} heads, {cfg.patch_size} px "
            f"patches, for {cfg.img_size} px images")
    standard = not args
    built = (f"`model_args` in config.json ({', '.join(f'{k}={v}' for k, v in args.items())}) make timm's "
             f"`{cfg.timm_arch}` into this encoder; timm builds a model only from a registered name, which is why "
             "`architecture` names that one" if not standard else f"it is timm's `{cfg.timm_arch}` exactly")
    return "\n".join([
        f"# {_family(model)} encoder: {what}",
        "",
        f"Pretrained as `{cfg.arch or _family(model)}` by this project's `pretraining.train`"
        + (f", exported from `{source}`" if source else "") + f". {built[0].upper()}{built[1:]}.",
        "Only the RGB path is here (the label adapters and the decoders stay with the run); inputs are",
        "normalised with ImageNet's mean and std, and `forward_features(images)` gives (B, 1 + N, D) tokens.",
        "",
        "```python",
        "import timm",
        'encoder = timm.create_model("local-dir:<this folder>", pretrained=True, num_classes=0)',
        "```",
        "",
    ])


def export_timm(model: torch.nn.Module, output: str | Path, source: str | None = None) -> tuple[Path, torch.nn.Module]:
    """Write `output` in timm's hub layout and a README.md saying what it holds (`source`: the checkpoint);
    returns it and the timm model that holds the weights. Every file gets the mode the umask gives."""
    arch, args = model.cfg.timm_arch, timm_model_args(model)
    encoder = timm.create_model(arch, pretrained=False, num_classes=0, **args)
    try:
        encoder.load_state_dict(model.timm_state_dict(), strict=True)
    except RuntimeError as err:
        raise ExportError(f"the encoder's weights do not fit timm's {arch} ({err}); this is a bug in "
                          "timm_state_dict, please report it.") from err
    data_config = {"mean": IMAGENET_DEFAULT_MEAN, "std": IMAGENET_DEFAULT_STD, "interpolation": "bicubic",
                   "crop_pct": 0.875}  # the normalisation the encoder was trained with
    output = Path(output)
    # The tag and license would otherwise be those of timm's own weights for this architecture.
    model_config = {"pretrained_cfg": {"tag": _family(model),
                                       "license": "see the training data's license"}}
    timm.models.save_for_hf(encoder.eval(), output, model_config=model_config, model_args=args,
                            safe_serialization=True, data_config=data_config)
    (output / "README.md").write_text(readme(model, args, source))
    # safetensors writes its file as 0600; colleagues on a shared cluster read it like config.json.
    shutil.copymode(output / "config.json", output / "model.safetensors")
    return output, encoder


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m pretraining.export",
        description="Export a pretraining run's encoder (RGB path) for downstream use. "
                    'Load it with timm.create_model("local-dir:DIR", pretrained=True, num_classes=0).')
    parser.add_argument("run", help="the run folder (--output of pretraining.train)")
    parser.add_argument("--to", choices=["timm"], default="timm", help="export format (default: timm)")
    parser.add_argument("--output", required=True, help="folder to write (config.json, model.safetensors)")
    parser.add_argument("--checkpoint", help="a checkpoint file of the run (default: its newest)")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        model, path = load_run_model(args.run, args.checkpoint)
        output, _ = export_timm(model, args.output, source=str(path))
    except (ExportError, ConfigError, ckpt.CheckpointError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"exported {path} as timm {model.cfg.timm_arch} to {output}; load it with "
          f'timm.create_model("local-dir:{output}", pretrained=True, num_classes=0)')
    return 0


if __name__ == "__main__":
    sys.exit(main())

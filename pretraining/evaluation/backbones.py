"""The encoder under evaluation: a timm model from an export folder, an architecture with a checkpoint, or
random weights (`load_timm_model`), and the process's device under torchrun (`setup_device`).
"""

from __future__ import annotations

import os

import timm
import torch
import torch.distributed as dist
import torch.nn as nn
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

# What a pretraining export may lack or carry beyond a classifier of the same architecture.
MAY_BE_MISSING = ("head.weight", "head.bias", "fc_norm.weight", "fc_norm.bias")
MAY_BE_UNEXPECTED = ("head.weight", "head.bias", "norm.weight", "norm.bias", "fc_norm.weight", "fc_norm.bias")


class UserError(Exception):
    """A mistake in the command line or the files it names; printed as one sentence."""


def load_timm_model(spec: str, checkpoint: str | None = None, random_init: bool = False,
                    head_init_std: float | None = None, **kwargs) -> nn.Module:
    """A timm ViT from `spec` (`local-dir:DIR`, a folder, or an architecture name) with its weights.

    `kwargs` go to `timm.create_model` (num_classes, global_pool, drop_path_rate, img_size, ...). The
    position embedding is resampled to `img_size`; a missing head / fc_norm is freshly initialised:
    timm's init (weights with std 0.02), or with `head_init_std` a head the weights lack gets weights
    of that std (truncated normal) and a zero bias, as MAE's fine-tuning does with 2e-5.
    """
    folder = spec.removeprefix("local-dir:") if spec.startswith("local-dir:") or os.path.isdir(spec) else None
    if folder is not None:
        if not os.path.isfile(os.path.join(folder, "config.json")):
            raise UserError(f"{folder} has no config.json; pass a folder written by `python -m pretraining.export "
                            f"--to timm`, or an architecture name with --checkpoint")
        weights = next((os.path.join(folder, f) for f in ("model.safetensors", "pytorch_model.bin")
                        if os.path.isfile(os.path.join(folder, f))), None)
        if weights is None and not random_init:
            raise UserError(f"{folder} has no model.safetensors; re-run the export")
        name, overlay = f"local-dir:{folder}", {}
        weights = None if random_init else (checkpoint or weights)
    else:
        if not timm.is_model(spec):
            raise UserError(f"{spec!r} is neither a folder nor a timm architecture; pass local-dir:DIR or a name "
                            f"such as vit_base_patch16_224")
        if checkpoint is None and not random_init:
            raise UserError(f"--model {spec} names an architecture only; add --checkpoint FILE with its weights, "
                            f"or --random-init for a randomly initialised baseline")
        # Our pretraining normalises with ImageNet statistics and MAE evaluates at crop 224/256.
        name, weights = spec, None if random_init else checkpoint
        overlay = {"mean": IMAGENET_DEFAULT_MEAN, "std": IMAGENET_DEFAULT_STD, "crop_pct": 0.875,
                   "interpolation": "bicubic"}
    try:
        model = timm.create_model(name, pretrained=False, pretrained_cfg_overlay=overlay or None, **kwargs)
    except (RuntimeError, TypeError, ValueError) as err:
        raise UserError(f"timm cannot build {spec} with {kwargs} ({err})") from err
    if weights is not None:
        fresh = load_weights(model, weights)
        if head_init_std is not None and "head.weight" in fresh:
            nn.init.trunc_normal_(model.head.weight, std=head_init_std)
            nn.init.zeros_(model.head.bias)
    return model


def load_weights(model: nn.Module, path: str) -> list[str]:
    """Load a timm ViT checkpoint into `model`, resampling pos_embed and dropping a mismatched head;
    anything else that does not fit is a UserError naming the first offending key. Returns the keys
    the weights lacked (only those of MAY_BE_MISSING), which keep the model's own initialisation."""
    from timm.models.vision_transformer import checkpoint_filter_fn

    if not os.path.isfile(path):
        raise UserError(f"checkpoint {path} does not exist; pass the file the export wrote")
    try:
        state = timm.models.load_state_dict(path, weights_only=True)
    except Exception as err:  # safetensors / pickle errors have many types
        raise UserError(f"cannot read weights from {path} ({type(err).__name__}: {err})") from err
    state = checkpoint_filter_fn(state, model)
    own = model.state_dict()
    state = {k: v for k, v in state.items() if not (k.startswith("head.") and (k not in own or own[k].shape != v.shape))}
    bad = [k for k, v in state.items() if k in own and own[k].shape != v.shape]
    if bad:
        raise UserError(f"{path} does not fit {model.default_cfg.get('architecture', type(model).__name__)}: "
                        f"{bad[0]} is {tuple(state[bad[0]].shape)}, the model's is {tuple(own[bad[0]].shape)}; "
                        f"pass the architecture the weights were trained with")
    lacked, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in lacked if k not in MAY_BE_MISSING]
    unexpected = [k for k in unexpected if k not in MAY_BE_UNEXPECTED]
    if missing or unexpected:
        first = f"lacks {missing[0]}" if missing else f"has {unexpected[0]} that the model does not"
        raise UserError(f"{path} {first} ({len(missing)} missing, {len(unexpected)} unexpected keys); pass the "
                        f"architecture the weights were trained with")
    return list(lacked)


def setup_device(name: str | None) -> torch.device:
    """Join the torchrun process group when there is one; return this process's device."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    cuda = torch.cuda.is_available() and name != "cpu"
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo")
    if cuda:
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        return torch.device("cuda", local)
    return torch.device(name or "cpu")

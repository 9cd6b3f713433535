"""The training run's config: frozen dataclasses, `--set key=value` overrides, JSON round trip, diffs.

A run is described by one `TrainConfig` (named recipes in pretraining/training/recipes.py return one).
`--set data.batch_size=32 --set model_args.img_size=96` replaces fields by dotted path; values are
parsed as Python literals (numbers, tuples, None, True) and otherwise taken as strings, then
checked against the field they replace. Under `model_args` (the factory's keyword arguments) a
dotted key builds a nested dict: `--set model_args.curriculum.first_until=0.2` passes
`curriculum={"first_until": 0.2}` (merged with what the recipe gives); the factory checks the names.
"""

from __future__ import annotations

import ast
import dataclasses
import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from pretraining.data.loader import DataConfig


class ConfigError(ValueError):
    """A config or override the user gave cannot be applied."""


@dataclass(frozen=True)
class OptimConfig:
    base_lr: float = 1.5e-4  # MAE: lr = base_lr * global batch / 256
    lr: float | None = None  # an absolute learning rate instead of the scaled base_lr
    min_lr: float = 0.0  # where the cosine ends
    betas: tuple[float, float] = (0.9, 0.95)
    weight_decay: float = 0.05  # not applied to biases, norms, position embeddings and tokens
    warmup_epochs: float = 40.0
    clip_grad: float | None = None  # max gradient norm; MAE does not clip


@dataclass(frozen=True)
class TrainConfig:
    name: str  # the recipe it started from
    model: str  # a factory name in pretraining.models.factory, e.g. c2fmae_vit_base_patch16
    model_args: dict[str, Any] = field(default_factory=dict)  # keyword overrides for the factory
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    epochs: int = 400
    accum_steps: int = 1  # micro-batches per optimizer step
    seed: int = 0
    precision: str = "bf16"  # bf16 | fp16 (with loss scaling) | fp32; autocast on GPU only (CPU runs in fp32)
    compile: bool = False  # torch.compile the model
    checkpoint_every: int = 1000  # optimizer steps; a checkpoint is also written at the end
    keep_checkpoints: int = 3
    keep_every_epochs: int = 0  # also keep checkpoints/epoch-NNNN.pt at the end of every N-th epoch for good; 0 = never
    log_every: int = 50  # optimizer steps between TensorBoard scalars
    figure_every: int = 2000  # optimizer steps between reconstruction figures; 0 = never
    log_samples: bool = False  # write the sample ids and losses of every step to RUN/samples-rankR.jsonl
    log_grad_share: bool = True  # at each log step, each loss term's share of the gradient on the encoder's output

    def __post_init__(self):
        if self.precision not in ("bf16", "fp16", "fp32"):
            raise ConfigError(f"precision must be bf16, fp16 or fp32, got {self.precision!r}.")
        for name in ("epochs", "accum_steps", "checkpoint_every", "keep_checkpoints", "log_every"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be at least 1, got {getattr(self, name)}.")
        if self.keep_every_epochs < 0:
            raise ConfigError(f"keep_every_epochs must be 0 (off) or a number of epochs, got {self.keep_every_epochs}.")
        if self.data.batch_size < 1:
            raise ConfigError(f"data.batch_size must be at least 1, got {self.data.batch_size}.")


# Keys that may change when a run is resumed: they do not change what is computed.
RESUMABLE_KEYS = frozenset({"checkpoint_every", "keep_checkpoints", "keep_every_epochs", "log_every", "figure_every",
                            "compile", "log_samples", "log_grad_share", "data.prefetch_factor"})


def _parse(text: str, current: Any, key: str) -> Any:
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        value = text
    if current is None or value is None:
        return value
    if isinstance(current, bool):
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
        if not isinstance(value, bool):
            raise ConfigError(f"--set {key}={text}: expected true or false.")
        return value
    if isinstance(current, float) and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if isinstance(current, tuple) and isinstance(value, list | tuple):
        return tuple(value)
    if not isinstance(value, type(current)):
        raise ConfigError(f"--set {key}={text}: expected a {type(current).__name__}, like {current!r}.")
    return value


def _replace(obj: Any, path: list[str], text: str, key: str) -> Any:
    name = path[0]
    if isinstance(obj, dict):
        if len(path) > 1:
            inner = obj.get(name, {})
            if not isinstance(inner, dict):
                raise ConfigError(f"--set {key}: {name} is a plain value, it has no fields.")
            return {**obj, name: _replace(inner, path[1:], text, key)}
        return {**obj, name: _parse(text, obj.get(name), key)}
    names = {f.name for f in dataclasses.fields(obj)}
    if name not in names:
        raise ConfigError(f"--set {key}: no field {name!r}; choose one of {', '.join(sorted(names))}.")
    current = getattr(obj, name)
    if len(path) > 1:
        if not (dataclasses.is_dataclass(current) or isinstance(current, dict)):
            raise ConfigError(f"--set {key}: {name} is a plain value, it has no fields.")
        value = _replace(current, path[1:], text, key)
    elif dataclasses.is_dataclass(current) or isinstance(current, dict):
        raise ConfigError(f"--set {key}: {name} is a group; set one of its fields ({name}.FIELD=VALUE).")
    else:
        value = _parse(text, current, key)
    return dataclasses.replace(obj, **{name: value})


def apply_overrides(cfg: TrainConfig, overrides: Iterable[str]) -> TrainConfig:
    """Apply `key=value` strings in order; `model_args.KEY` adds or replaces a factory argument."""
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--set {item}: write overrides as key=value, e.g. data.batch_size=32.")
        try:
            cfg = _replace(cfg, key.strip().split("."), text.strip(), key.strip())
        except ConfigError:
            raise
        except (TypeError, ValueError) as err:  # a dataclass's own validation
            raise ConfigError(f"--set {item}: {err}") from err
    return cfg


def to_dict(cfg: Any) -> dict:
    return json.loads(json.dumps(dataclasses.asdict(cfg)))  # tuples become lists, as in config.json


def from_dict(cls: type, data: dict) -> Any:
    """Rebuild a (nested) config dataclass from `to_dict` output."""
    defaults = cls.__dataclass_fields__
    kwargs = {}
    for name, value in data.items():
        if name not in defaults:
            raise ConfigError(f"config has an unknown key {name!r} (written by another version of this code?).")
        f = defaults[name]
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        if dataclasses.is_dataclass(default):
            value = from_dict(type(default), value)
        elif isinstance(default, tuple) and isinstance(value, list):
            value = tuple(value)
        kwargs[name] = value
    return cls(**kwargs)


def flatten(data: dict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for key, value in data.items():
        if isinstance(value, dict) and (value or key != "model_args"):
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def differing_keys(a: dict, b: dict, ignore: Iterable[str] = RESUMABLE_KEYS) -> list[str]:
    """Dotted keys whose values differ between two `to_dict` configs (keys in `ignore` excepted)."""
    fa, fb = flatten(a), flatten(b)
    ignore = set(ignore)
    return sorted(k for k in fa.keys() | fb.keys() if k not in ignore and fa.get(k) != fb.get(k))

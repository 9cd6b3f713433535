"""The training run's config: frozen dataclasses, `--set key=value` overrides, JSON round trip, diffs.

A run is described by one `TrainConfig` (named recipes in pretraining/training/recipes.py return one),
the model's whole resolved `ModelConfig` nested in it. `--set data.batch_size=32 --set model.img_size=96
--set model.masking.curriculum.first_until=0.2` replaces fields by dotted path; values are parsed as
Python literals (numbers, tuples, None, True) and otherwise taken as strings, then checked against the
field they replace. The `model.*` overrides are applied together, then the model's derived fields
follow through the factory's own `derive` (`factory.rederive`): with another img_size, patch_size,
modalities or input_modalities, `masking.num_positions` and `masking.inputs` follow and
`masking.num_visible` keeps the config's share of the tokens the encoder reads, unless it is set too.
A resume may change the `RESUMABLE_KEYS` freely and the `AMENDABLE_KEYS` on purpose (`--amend KEY=VALUE`,
`amend`); training/resume.py checks the rest against the checkpoint.
"""

from __future__ import annotations

import ast
import dataclasses
import json
import typing
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from pretraining.data.loader import DataConfig
from pretraining.models.autoencoder import ModelConfig
from pretraining.models.curriculum import CurriculumConfig
from pretraining.models.factory import rederive
from pretraining.models.masking import MaskingConfig


class ConfigError(ValueError):
    """A config or override the user gave cannot be applied."""


@dataclass(frozen=True)
class OptimConfig:
    base_lr: float = 1.5e-4  # MAE: lr = base_lr * global batch / 256
    lr: float | None = None  # an absolute learning rate instead of the scaled base_lr
    min_lr: float = 0.0  # where the cosine ends
    betas: tuple[float, float] = (0.9, 0.95)
    # Decays every weight of 2 or more dimensions: the linear and conv weights, the class token and the
    # modality and class embeddings (as MAE, whose optimizer also decays its class and mask tokens); not
    # biases, norms or the 1-d mask tokens (timm's param_groups_weight_decay). Position embeddings are
    # fixed sin-cos buffers, not parameters.
    weight_decay: float = 0.05
    warmup_epochs: float = 40.0
    clip_grad: float | None = None  # max gradient norm; MAE does not clip


@dataclass(frozen=True)
class TrainConfig:
    name: str  # the recipe it started from
    # The whole resolved model (pretraining.models.factory.model_config); the trainer sets
    # num_semantic_classes to the dataset's at start.
    model: ModelConfig
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    epochs: int = 400
    # Samples per optimizer step over all processes. The run splits it into data.batch_size-capped
    # micro-batches per process and accumulation steps for the world size it finds (training/allocation.py);
    # None: one micro-batch of data.batch_size per process (global = batch_size x processes).
    global_batch: int | None = None
    seed: int = 0
    precision: str = "bf16"  # bf16 | fp16 (with loss scaling) | fp32; autocast on GPU only (CPU runs in fp32)
    compile: bool = False  # torch.compile the model
    checkpoint_every: int = 1000  # optimizer steps; a checkpoint is also written at the end
    checkpoint_minutes: float = 0.0  # also when this much wall time passed since the last one (read at log steps); 0 = off
    checkpoint_async: bool = True  # write checkpoints on a background thread from a host copy (training/checkpoint.py)
    keep_checkpoints: int = 3
    keep_every_epochs: int = 0  # also keep checkpoints/epoch-NNNN.pt at the end of every N-th epoch for good; 0 = never
    log_every: int = 50  # optimizer steps between TensorBoard scalars
    figure_every: int = 2000  # optimizer steps between reconstruction figures; 0 = never
    log_samples: bool = False  # write the sample ids and losses of every step to RUN/samples-rankR.jsonl
    log_grad_share: bool = True  # log each loss term's share of the gradient on the encoder's output
    grad_share_every: int = 0  # optimizer steps between those diagnostics; 0 = at every log step

    def __post_init__(self):
        if self.precision not in ("bf16", "fp16", "fp32"):
            raise ConfigError(f"precision must be bf16, fp16 or fp32, got {self.precision!r}.")
        for name in ("epochs", "checkpoint_every", "keep_checkpoints", "log_every"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be at least 1, got {getattr(self, name)}.")
        if self.grad_share_every < 0:
            raise ConfigError(f"grad_share_every must be 0 (every log step) or a number of steps, got "
                              f"{self.grad_share_every}.")
        if self.checkpoint_minutes < 0:
            raise ConfigError(f"checkpoint_minutes must be 0 (off) or a number of minutes, got {self.checkpoint_minutes}.")
        if self.keep_every_epochs < 0:
            raise ConfigError(f"keep_every_epochs must be 0 (off) or a number of epochs, got {self.keep_every_epochs}.")
        if self.data.batch_size < 1:
            raise ConfigError(f"data.batch_size must be at least 1, got {self.data.batch_size}.")
        if self.global_batch is not None and self.global_batch < 1:
            raise ConfigError(f"global_batch must be at least 1 (or None), got {self.global_batch}.")


# Keys that may change when a run is resumed: they do not change what is computed.
RESUMABLE_KEYS = frozenset({"checkpoint_every", "checkpoint_minutes", "checkpoint_async", "keep_checkpoints",
                            "keep_every_epochs", "log_every", "figure_every", "compile", "log_samples",
                            "log_grad_share", "grad_share_every", "data.prefetch_factor"})
# Keys a resume may change on purpose, with `--amend KEY=VALUE` (recorded in run.json with its step): they
# change what is computed from then on, not the model's shape, the data or the seed. The learning rate and
# its schedule's tail, clipping, precision, the loss weights, the semantic head's precision, the loader's
# workers, and the per-process batch cap (the global batch stays: training/allocation.py).
AMENDABLE_KEYS = frozenset({"optim.lr", "optim.base_lr", "optim.min_lr", "optim.warmup_epochs", "optim.clip_grad",
                            "precision", "model.lambda_semantic", "model.lambda_instance", "model.lambda_rgb",
                            "model.semantic_head_fp32", "data.num_workers", "data.batch_size"})
# Keys that existed once: giving one is refused with what replaced it (a stored config loses them on upgrade).
REMOVED_KEYS = {"data.decode": "data.decode was removed: images are always decoded in the loader workers (set "
                               "data.num_workers for more of them); docs/training.md says why."}


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
    """`obj` (a config dataclass, or a dict of one's fields) with the field at `path` parsed from `text`."""
    values = obj if isinstance(obj, dict) else {f.name: getattr(obj, f.name) for f in dataclasses.fields(obj)}
    name = path[0]
    if name not in values:
        raise ConfigError(f"--set {key}: no field {name!r}; choose one of {', '.join(sorted(values))}.")
    current = values[name]
    group = dataclasses.is_dataclass(current) or isinstance(current, dict)
    if len(path) > 1:
        if not group:
            raise ConfigError(f"--set {key}: {name} is a plain value, it has no fields.")
        value = _replace(current, path[1:], text, key)
    elif group:
        raise ConfigError(f"--set {key}: {name} is a group; set one of its fields ({name}.FIELD=VALUE).")
    else:
        value = _parse(text, current, key)
    return {**obj, name: value} if isinstance(obj, dict) else dataclasses.replace(obj, **{name: value})


_MASKING_NAMES = {f.name for f in dataclasses.fields(MaskingConfig)}
_CURRICULUM_NAMES = {f.name for f in dataclasses.fields(CurriculumConfig)}


def _model_spelling(old: list[str]) -> str:
    """Where a `model_args.KEY` override (the factory's keyword arguments) lives in the model config."""
    if not old:
        return "model.FIELD"
    if old[0] == "curriculum":
        return ".".join(["model.masking", *old])
    if old[0] in _CURRICULUM_NAMES:
        return ".".join(["model.masking.curriculum", *old])
    if old == ["masking"]:
        return "model.masking.strategy"
    return ".".join(["model.masking" if old[0] in _MASKING_NAMES else "model", *old])


def apply_overrides(cfg: TrainConfig, overrides: Iterable[str]) -> TrainConfig:
    """Apply `key=value` strings in order; the `model.*` ones together, then the model's derived fields follow."""
    model, given, items = dataclasses.asdict(cfg.model), set(), []
    for item in overrides:
        key, sep, text = item.partition("=")
        key, text = key.strip(), text.strip()
        if not sep or not key:
            raise ConfigError(f"--set {item}: write overrides as key=value, e.g. data.batch_size=32.")
        path = key.split(".")
        if key in REMOVED_KEYS:
            raise ConfigError(f"--set {item}: {REMOVED_KEYS[key]}")
        if path == ["accum_steps"]:
            raise ConfigError(f"--set {item}: accumulation is derived now: set global_batch (samples per optimizer "
                              "step over all processes) and data.batch_size (the most one process computes at once).")
        if path[0] == "model_args":
            raise ConfigError(f"--set {item}: the model's fields are now set as {_model_spelling(path[1:])}="
                              f"{text or 'VALUE'} (model_args is gone: the run config holds the whole model config).")
        if path[0] == "model" and len(path) > 1:
            model = _replace(model, path[1:], text, key)
            given.add(".".join(path[1:]))
            items.append(item)
            continue
        try:
            cfg = _replace(cfg, path, text, key)
        except ConfigError:
            raise
        except (TypeError, ValueError) as err:  # a dataclass's own validation
            raise ConfigError(f"--set {item}: {err}") from err
    if not items:
        return cfg
    try:
        return dataclasses.replace(cfg, model=rederive(cfg.model, model, given))
    except (TypeError, ValueError) as err:  # ModelConfig's (or MaskingConfig's) own validation
        raise ConfigError(f"--set {' '.join(items)}: {err}") from err


def amend(cfg: TrainConfig, amendments: Iterable[str]) -> tuple[TrainConfig, list[str]]:
    """`cfg` with `--amend KEY=VALUE` strings applied as `--set` would, and their keys; a key outside
    AMENDABLE_KEYS (and the free RESUMABLE_KEYS) is a ConfigError naming what may change."""
    items = list(amendments)
    keys = [item.partition("=")[0].strip() for item in items]
    for item, key in zip(items, keys):
        if key in REMOVED_KEYS:
            raise ConfigError(f"--amend {item}: {REMOVED_KEYS[key]}")
        if key not in AMENDABLE_KEYS | RESUMABLE_KEYS:
            raise ConfigError(f"--amend {key}: only {', '.join(sorted(AMENDABLE_KEYS))} (and the cadence keys) may "
                              "change within a run, never the model's shape, the data or the seed; start a new "
                              "--output for that.")
    try:
        return apply_overrides(cfg, items), keys
    except ConfigError as err:
        raise ConfigError(str(err).replace("--set ", "--amend ", 1)) from err


def to_dict(cfg: Any) -> dict:
    return json.loads(json.dumps(dataclasses.asdict(cfg)))  # tuples become lists, as in config.json


def from_dict(cls: type, data: dict) -> Any:
    """Rebuild a (nested) config dataclass from `to_dict` output."""
    defaults, types = cls.__dataclass_fields__, typing.get_type_hints(cls)
    kwargs = {}
    for name, value in data.items():
        if name not in defaults:
            raise ConfigError(f"config has an unknown key {name!r} (written by another version of this code?).")
        f = defaults[name]
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        if dataclasses.is_dataclass(types[name]) and isinstance(value, dict):
            value = from_dict(types[name], value)
        elif isinstance(default, tuple) and isinstance(value, list):
            value = tuple(value)
        kwargs[name] = value
    return cls(**kwargs)


def flatten(data: dict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for key, value in data.items():
        if isinstance(value, dict):
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def differing_keys(a: dict, b: dict, ignore: Iterable[str] = RESUMABLE_KEYS) -> list[str]:
    """Dotted keys whose values differ between two `to_dict` configs (keys in `ignore` excepted)."""
    fa, fb = flatten(a), flatten(b)
    ignore = set(ignore)
    return sorted(k for k in fa.keys() | fb.keys() if k not in ignore and fa.get(k) != fb.get(k))

"""A run folder's files, and reading its config back into the model it trained.

    RUN/config.json        the whole resolved TrainConfig, the model's whole ModelConfig included
    RUN/run.json           what the config does not fix: data path, world size, learning rate, dataset
    RUN/init.json          --init's report (training/init_weights.py), when the run started from one
    RUN/summary.json       the last step, losses and parameter hashes, once the run ends
    RUN/samples-rankR.jsonl  with log_samples: each micro-step's optimizer step, data position, sample ids, losses
    RUN/checkpoints/       training/checkpoint.py; each holds the config and run info as well

Resume, export and --init rebuild the model from the stored config (`stored_config`, then
`build_model`), never from today's factory defaults. Folders written before the model config was
stored whole (config "model" a factory name plus "model_args", its keyword overrides) are read by
converting them once through today's factory (`upgrade`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import IO

from pretraining.models.autoencoder import MaskedAutoencoder, ModelConfig
from pretraining.models.factory import model_config
from pretraining.training.checkpoint import list_checkpoints
from pretraining.training.config import ConfigError, TrainConfig, from_dict, to_dict
from pretraining.training.storage import writing

CONFIG_FILE = "config.json"
RUN_FILE = "run.json"
INIT_FILE = "init.json"
SUMMARY_FILE = "summary.json"


def samples_log_path(run_dir: Path, rank: int) -> Path:
    return run_dir / f"samples-rank{rank}.jsonl"


def open_samples_log(path: Path, optimizer_step: int, position: tuple[int, int]) -> IO[str]:
    """The per-step sample log, without the lines a killed run wrote after the checkpoint resumed from (its
    `optimizer_step`; lines written before they carried theirs: its data `position`, in its own micro-steps)."""
    def before(record: dict) -> bool:
        if "optimizer_step" in record:  # the same in any split of the global batch (--amend data.batch_size)
            return record["optimizer_step"] <= optimizer_step
        return (record["epoch"], record["step"]) < position

    kept = []
    if path.exists():
        kept = [line for line in path.read_text().splitlines() if line and before(json.loads(line))]
    with writing(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        log = open(path, "w", buffering=1)  # line-buffered: a killed run keeps what it logged
        log.writelines(line + "\n" for line in kept)
    return log


def upgrade(config: dict, run: dict) -> dict:
    """A stored config (config.json or a checkpoint's "config") in today's form; `run` is its run info.

    A config with `accum_steps` (before the global batch was the recipe's) gets the global batch it
    trained at, which today's allocation splits back into the same batch and accumulation.
    A config with `data.decode` (removed) loses it: its images are decoded in the workers from now on
    ("device" decoded the same JPEGs within a grey level, and the key was amendable within a run).
    An old config names its model (`"model": "c2fmae_vit_tiny_patch16"`) and keeps only the factory's
    keyword overrides (`"model_args"`): that is all it holds, so today's factory resolves it, once,
    with the semantic class count the run recorded and the switches that came later set to what it trained
    with (fp32-less semantic head, L1 instance offsets). A stored whole model config that lacks a later
    field reads ModelConfig's default for it, which is kept at what runs before that field trained with.
    """
    if "accum_steps" in config:  # written before global_batch: batch x processes x accumulation was its batch
        accum = config["accum_steps"]
        config = {k: v for k, v in config.items() if k != "accum_steps"}
        if accum != 1:
            config["global_batch"] = config["data"]["batch_size"] * run.get("world_size", 1) * accum
    if "decode" in config.get("data", {}):
        config = {**config, "data": {k: v for k, v in config["data"].items() if k != "decode"}}
    if not isinstance(config.get("model"), str):
        return config
    args = {k: tuple(v) if isinstance(v, list) else v for k, v in config.get("model_args", {}).items()}
    try:
        # What such a run trained with (the switches came later): its semantic head followed autocast,
        # its instance offsets had an L1 loss.
        model = model_config(config["model"], num_semantic_classes=run["num_semantic_classes"],
                             **{"semantic_head_fp32": False, "instance_offset_loss": "l1", **args})
    except (KeyError, TypeError, ValueError) as err:
        raise ConfigError(f"the run's stored config (model {config['model']} with model_args {args}) no longer "
                          f"resolves ({err.__class__.__name__}: {err}); use the code version that wrote it.") from err
    return {**{k: v for k, v in config.items() if k != "model_args"}, "model": to_dict(model)}


def stored_config(state: dict) -> tuple[TrainConfig, dict]:
    """(the config, the run info) a checkpoint stores."""
    run = json.loads(state["run"])
    return from_dict(TrainConfig, upgrade(json.loads(state["config"]), run)), run


def rerun_config(run_dir: Path, recipe: str | None) -> TrainConfig | None:
    """What a rerun of the command in `run_dir` starts from before its `--set` overrides: the config the
    run stored at its last start (RUN/config.json), so today's recipe and factory defaults never leak
    into a run that exists; None for a new run, or one whose start kept no checkpoint (a corrected retry
    starts from the recipe). `recipe` (--config, None when not given) must name the run's recipe."""
    path, run_path = run_dir / CONFIG_FILE, run_dir / RUN_FILE
    if not path.is_file() or not list_checkpoints(run_dir):
        return None
    try:
        stored = json.loads(path.read_text())
        run = json.loads(run_path.read_text()) if run_path.is_file() else {}
        cfg = from_dict(TrainConfig, upgrade(stored, run))
    except (json.JSONDecodeError, KeyError) as err:
        raise ConfigError(f"{path} cannot be read back ({err.__class__.__name__}: {err}); restore it from a "
                          "checkpoint's config, or start a new --output.") from err
    if recipe is not None and recipe != cfg.name:
        raise ConfigError(f"{run_dir} was started from --config {cfg.name}, not {recipe}: rerun with --config "
                          f"{cfg.name} (or without --config) to resume it, or choose another --output.")
    return cfg


def build_model(model: ModelConfig | dict) -> MaskedAutoencoder:
    """The model of a resolved model config (a ModelConfig, or its stored dict): every field is the
    stored one; nothing is derived again and no factory default is read."""
    return MaskedAutoencoder(from_dict(ModelConfig, model) if isinstance(model, dict) else model)

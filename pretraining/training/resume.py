"""Resuming a run: what a checkpoint binds (config, processes, dataset), what may change, when it is done.

A run folder is bound by its newest readable checkpoint, which stores the whole resolved config
(the model's included; training/run_folder.py reads it back) and the run info (world size, the
dataset's fingerprint). Without a checkpoint nothing
is bound: a first attempt that failed before its first checkpoint never blocks a corrected retry.
With one, a rerun must agree with it:

- the config, `model.*` included, except the cadence keys (`config.RESUMABLE_KEYS`) and `epochs`, which may grow (the
  learning-rate and curriculum schedules are functions of progress = position / epochs, so they
  are recomputed over the new total from the next step on);
- the number of processes (it fixes the data order and the global batch);
- the number of semantic classes (`model.num_semantic_classes`, the dataset's: it sizes the model's
  semantic head);
- the dataset's fingerprint (`dataset_fingerprint`), unless `--new-data` says a change is on purpose.

A run whose checkpoint is at the end of its epochs is complete: a rerun says so and writes nothing.
"""

from __future__ import annotations

import hashlib
import json
import posixpath
import shlex
from dataclasses import dataclass, field
from pathlib import Path

from dataset_card.contract import layout, shards
from pretraining.data.loader import LabeledDataset
from pretraining.training.config import RESUMABLE_KEYS, TrainConfig, differing_keys, flatten, to_dict
from pretraining.training.run_folder import SUMMARY_FILE

# manifest.json keys that change when the same data is labeled again (a resumed labeling run), not
# with what the rows hold.
VOLATILE_MANIFEST_KEYS = ("created", "execution")


class RunError(RuntimeError):
    """The run cannot start or continue; the message says what to do."""


def _sha256(data: object) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()


def dataset_fingerprint(dataset: LabeledDataset) -> dict:
    """What identifies the rows a run trains on, whatever path the folder is read from:
    metadata.json (as parsed), manifest.json (but its volatile keys), the row count, and for a
    labels-only release the image folder given with --images (as an absolute path)."""
    fs, base = shards.filesystem(dataset.root)
    manifest_path = posixpath.join(base, layout.MANIFEST_FILE)
    manifest = None
    if shards.exists(fs, manifest_path):
        data = json.loads(shards.read_bytes(fs, manifest_path).decode())
        manifest = _sha256({k: v for k, v in data.items() if k not in VOLATILE_MANIFEST_KEYS})
    return {"metadata_sha256": _sha256(json.loads(dataset.metadata.to_json())), "manifest_sha256": manifest,
            "rows": dataset.num_rows,
            "images": str(Path(dataset.images).resolve()) if dataset.images and "://" not in dataset.images
            else dataset.images}


@dataclass
class Resume:
    """What a rerun does with a run folder's newest checkpoint."""

    complete: bool = False  # the checkpoint is at the end of the configured epochs: nothing to do
    notes: list[str] = field(default_factory=list)  # lines for the user (extended epochs, new data)


def check_resume(checkpoint: Path, saved_config: dict, saved_run: dict, cfg: TrainConfig, run_info: dict,
                 position: tuple[int, int], new_data: bool = False) -> Resume:
    """Refuse (RunError, one sentence) a rerun that disagrees with `checkpoint`; else say what it does."""
    run_dir = checkpoint.parent.parent
    # The class count is the dataset's (set at start): a change is told apart below, in its own sentence.
    keys = differing_keys(saved_config, to_dict(cfg),
                          ignore=RESUMABLE_KEYS | {"epochs", "model.num_semantic_classes"})
    if keys:  # e.g. a changed factory default: the checkpoint's values, as the --set that restores them
        stored = flatten(saved_config)
        restore = " ".join(f"--set {shlex.quote(f'{k}={stored[k]!r}')}" for k in keys[:3] if k in stored)
        raise RunError(f"checkpoint {checkpoint} comes from another config (differing: {', '.join(keys)}); use "
                       "a new --output, or the run's own --config and --set to resume it"
                       + (f" ({restore} gives the checkpoint's values{', and more' if len(keys) > 3 else ''})."
                          if restore else "."))
    if saved_run.get("world_size") != run_info["world_size"]:
        raise RunError(f"{run_dir} was trained on {saved_run.get('world_size')} processes, not "
                       f"{run_info['world_size']}: resume it with the same number of GPUs (the data order "
                       "and learning rate depend on it), or start a new --output.")
    saved_classes = saved_config["model"]["num_semantic_classes"]
    if saved_classes != cfg.model.num_semantic_classes:
        raise RunError(f"{run_dir} was trained with {saved_classes} semantic classes but --data {run_info['data']} "
                       f"has {cfg.model.num_semantic_classes}: the model's semantic head cannot change, so train on "
                       "that data in a new --output.")
    notes = []
    saved_data, data = saved_run.get("dataset"), run_info["dataset"]
    if saved_data is not None and saved_data != data:
        differing = ", ".join(f"{k} {saved_data.get(k)} -> {data[k]}" if k in ("rows", "images") else k
                              for k in data if saved_data.get(k) != data[k])
        if not new_data:
            raise RunError(f"{run_dir} was trained on other data than --data {run_info['data']} (it was "
                           f"{saved_run.get('data')}; differing: {differing}): pass that folder to resume, or add "
                           "--new-data to continue this run on the new data on purpose.")
        notes.append(f"continuing on new data on purpose (--new-data): {run_info['data']} replaces "
                     f"{saved_run.get('data')} from epoch {position[0]}, batch {position[1]} on (differing: {differing}).")
    saved_epochs = saved_config["epochs"]
    if cfg.epochs < saved_epochs:
        raise RunError(f"{run_dir} was set for {saved_epochs} epochs; epochs may grow on resume but not shrink "
                       f"(asked {cfg.epochs}): export an earlier checkpoint instead, or start a new --output.")
    if cfg.epochs > saved_epochs:
        notes.append(f"extending the run from {saved_epochs} to {cfg.epochs} epochs: the learning-rate and masking "
                     f"schedules are recomputed over {cfg.epochs} epochs from epoch {position[0]}, batch "
                     f"{position[1]} on.")
    return Resume(complete=position[0] >= cfg.epochs, notes=notes)


def complete_summary(run_dir: Path, state: dict) -> dict:
    """The summary of a complete run: RUN/summary.json as written, else what its final checkpoint holds."""
    path = run_dir / SUMMARY_FILE
    if path.is_file():
        return json.loads(path.read_text())
    position = state["position"]
    return {"global_step": state["global_step"], "position": [position["epoch"], position["step"]],
            "last": dict(state.get("last", {}))}

"""Resuming a run: what a checkpoint binds (config, processes, dataset), what may change, when it is done.

A run folder is bound by its newest readable checkpoint, which stores the whole resolved config
(the model's included; training/run_folder.py reads it back) and the run info (world size, global
batch, the dataset's fingerprint). Without a checkpoint nothing is bound: a first attempt that
failed before its first checkpoint never blocks a corrected retry. With one, a rerun must agree with it:

- the config, `model.*` included, except the cadence keys (`config.RESUMABLE_KEYS`), `epochs`, which may
  grow (the learning-rate and curriculum schedules are functions of progress = position / epochs, so
  they are recomputed over the new total from the next step on), and the keys the rerun amends on
  purpose with `--amend KEY=VALUE` (`config.AMENDABLE_KEYS`: learning rate and schedule tail,
  clipping, precision, loss weights, loader workers, the per-process batch cap),
  each recorded in run.json's "amendments" with the optimizer step it applies from;
- the global batch (with the learning rate it is the recipe's): another number of processes, or
  `--amend data.batch_size`, changes how it is split, never its size. The epoch in progress keeps the
  layout it was dealt in (the checkpoint's position holds it, with the samples done in the epoch), so
  its remaining optimizer steps take the samples they would have taken (`data.loader.sources`);
  later epochs are dealt over the new allocation's streams. Not bit-exact (sums reduce in another order);
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
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from dataset_card.contract import layout, shards
from pretraining.data.loader import LabeledDataset
from pretraining.training.config import (
    AMENDABLE_KEYS,
    RESUMABLE_KEYS,
    TrainConfig,
    differing_keys,
    flatten,
    to_dict,
)
from pretraining.training.run_folder import SUMMARY_FILE

# manifest.json keys that change when the same data is labeled again (a resumed labeling run), not
# with what the rows hold.
VOLATILE_MANIFEST_KEYS = ("created", "execution")


class RunError(RuntimeError):
    """The run cannot start or continue; the message says what to do."""


class DivergedError(RunError):
    """A non-finite loss stopped the run (`reason`); `amend` holds the `--amend KEY=VALUE` that resume it
    more carefully, which the message names."""

    def __init__(self, reason: str, amend: list[str]):
        super().__init__(f"{reason}; resume it from its last checkpoint by adding "
                         f"{' '.join('--amend ' + a for a in amend)} to its command.")
        self.reason, self.amend = reason, amend


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
    notes: list[str] = field(default_factory=list)  # lines for the user (extended epochs, new data, amendments)
    amendments: list[dict] = field(default_factory=list)  # {"step", "key", "from", "to"} of this rerun's --amend


def check_resume(checkpoint: Path, saved_config: dict, saved_run: dict, cfg: TrainConfig, run_info: dict,
                 position: tuple[int, int], new_data: bool = False, amend: Sequence[str] = (),
                 step: int = 0) -> Resume:
    """Refuse (RunError, one sentence) a rerun that disagrees with `checkpoint`; else say what it does.
    `amend`: the keys the rerun changes on purpose (`--amend`), applied from optimizer step `step`."""
    run_dir = checkpoint.parent.parent
    current = to_dict(cfg)
    # The class count is the dataset's (set at start): a change is told apart below, in its own sentence.
    keys = differing_keys(saved_config, current, ignore=RESUMABLE_KEYS | {"epochs", "model.num_semantic_classes"})
    if saved_config.get("global_batch") is None and current["global_batch"] == saved_run.get("global_batch"):
        keys = [k for k in keys if k != "global_batch"]  # the batch such a run trained at, stated: no change
    refused = [k for k in keys if k not in amend or k not in AMENDABLE_KEYS]  # (the API's callers too)
    if refused:  # e.g. a changed factory default: the checkpoint's values, as the --set that restores them
        stored = flatten(saved_config)
        restore = " ".join(f"--set {shlex.quote(f'{k}={stored[k]!r}')}" for k in refused[:3] if k in stored)
        amendable = [k for k in refused if k in AMENDABLE_KEYS]
        raise RunError(f"checkpoint {checkpoint} comes from another config (differing: {', '.join(refused)}); use "
                       "a new --output, or the run's own --config and --set to resume it"
                       + (f" ({restore} gives the checkpoint's values{', and more' if len(refused) > 3 else ''})"
                          if restore else "")
                       + (f"; to change {', '.join(amendable)} on purpose, pass --amend KEY=VALUE instead of --set"
                          if amendable else "") + ".")
    stored, now = flatten(saved_config), flatten(current)
    amendments = [{"step": step, "key": k, "from": stored.get(k), "to": now.get(k)} for k in keys]
    notes = [f"amended from optimizer step {a['step']} on: {a['key']} {a['from']} -> {a['to']} (--amend; recorded "
             "in run.json)" for a in amendments]
    saved_batch = saved_run.get("global_batch")
    if saved_batch is not None and saved_batch != run_info["global_batch"]:
        per_process = saved_config.get("global_batch") is None and saved_run.get("world_size") != run_info["world_size"]
        raise RunError(f"{run_dir} trains at a global batch of {saved_batch}, not {run_info['global_batch']}: the "
                       "global batch cannot change within a run"
                       + (f" (its config has no global_batch: each of its {saved_run.get('world_size')} processes took "
                          f"data.batch_size {saved_config['data']['batch_size']}), so add --set global_batch="
                          f"{saved_batch} to resume it on {run_info['world_size']} processes, or start a new --output."
                          if per_process else
                          " (without a global_batch in its config, data.batch_size is each process's whole batch), so "
                          "keep its data.batch_size or start a new --output."))
    saved_split = (saved_run.get("world_size"), saved_run.get("per_gpu_batch"), saved_run.get("accum_steps"))
    split = (run_info["world_size"], run_info["per_gpu_batch"], run_info["accum_steps"])
    if saved_run.get("world_size") != run_info["world_size"]:  # the same global batch on another allocation
        notes.append(f"resuming on {split[0]} processes ({split[1]} per process x {split[2]} accumulation steps; "
                     f"the run trained on {saved_split[0]}, {saved_split[1]} x {saved_split[2]}): the same global batch "
                     f"of {run_info['global_batch']}"
                     + (f"; the rest of epoch {position[0]} takes the samples each optimizer step would have taken"
                        if position[1] > 0 else "")
                     + "; later epochs are dealt over this allocation's streams; not bit-exact (sums are reduced in "
                     "another order).")
    saved_classes = saved_config["model"]["num_semantic_classes"]
    if saved_classes != cfg.model.num_semantic_classes:
        raise RunError(f"{run_dir} was trained with {saved_classes} semantic classes but --data {run_info['data']} "
                       f"has {cfg.model.num_semantic_classes}: the model's semantic head cannot change, so train on "
                       "that data in a new --output.")
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
    return Resume(complete=position[0] >= cfg.epochs, notes=notes, amendments=amendments)


def complete_summary(run_dir: Path, state: dict) -> dict:
    """The summary of a complete run: RUN/summary.json as written, else what its final checkpoint holds."""
    path = run_dir / SUMMARY_FILE
    if path.is_file():
        return json.loads(path.read_text())
    position = state["position"]
    return {"global_step": state["global_step"], "position": [position["epoch"], position["step"]],
            "last": dict(state.get("last", {}))}

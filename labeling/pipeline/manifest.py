"""manifest.json: what a labeled folder was made from, and whether a rerun may resume it.

A rerun resumes when what gives the labels their meaning is unchanged (`COMPARED`): the labels
version of the code (`labels_version.LABELS_VERSION`, bumped by hand when labels can change), the
schema version, the arguments declared label-shaping on `LabelingConfig`'s fields, the models'
identities (the SAM weights by content hash, not their path; the semantic model by hub repo and the
commit the folder's first run resolved, or a local folder's content hash; their labeler parameters
but speed ones) and the image classes. Otherwise it is refused with the differences listed, unless
`--overwrite` clears the folder first. The inputs may change: shards are keyed by a hash of each
input's id (`labeling.pipeline.plan`), so a rerun with added or removed inputs relabels only what is
new in the shards they fall into; the manifest then records the new inputs. Everything else is
recorded, not compared: speed settings and locations ("execution"), and the environment (Python and
library versions, the package and label-code version: "software", "code_version"; where the model
checkpoints were read from). A rerun under
another environment resumes with one warning line (`--strict-environment` refuses instead); each
shard's footer records the environments its rows were made in (`labeling.pipeline.environment`).

`labels_hash` digests the compared part; every data file's footer carries it, so a shard written
under other settings is never trusted.
"""

from __future__ import annotations

import datetime
import hashlib
import json
from collections.abc import Callable, Mapping, Sequence

import pyarrow.fs as pafs

from dataset_card.contract import layout, shards
from dataset_card.contract.output_folder import OutputFolder
from dataset_card.contract.schema import SCHEMA_VERSION
from labeling.pipeline.environment import code_version, software_versions
from labeling.pipeline.labels_version import LABELS_VERSION

# Keys two manifests must agree on for a rerun to resume.
COMPARED = ("schema_version", "labels_version", "shard_size", "arguments", "models", "classes")
# What names a model (under "models.<role>"): compared. Its name and checkpoint path are recorded only.
MODEL_IDENTITY = ("type", "repo", "revision", "sha256", "params")
# Model parameters that change speed, not labels (beyond float rounding): free to change on resume.
SPEED_PARAMS = ("batch_size", "points_per_batch", "encoder_batch_size")
# What the environment is recorded under (with the models' checkpoint paths): a rerun where they
# differ resumes with a warning.
ENVIRONMENT = ("software", "code_version")
# Shards may hold between a quarter and four times --shard-size images when the inputs of a folder
# grow or shrink; beyond that a rerun asks for a new folder (its shard count is fixed).
SHARD_FILL = (0.25, 4.0)

class ResumeRefused(ValueError):
    """The output folder holds a different run; the message says what differs and what to do."""


def build(num_inputs: int, inputs_hash: str, shard_size: int, arguments: Mapping, models: Mapping,
          execution: Mapping | None = None, class_names: Sequence[str] = (), planned_inputs: int | None = None) -> dict:
    """A new manifest: `arguments` are the label-shaping ones (`LabelingConfig.arguments`), `models`
    what `ModelChoice.describe` says; the environment is this process's (the driver's).
    `planned_inputs`: the inputs the shards are sized for when a `--sample` labels only some of them
    (default `num_inputs`)."""
    planned = num_inputs if planned_inputs is None else planned_inputs
    return {
        "schema_version": SCHEMA_VERSION,
        "labels_version": LABELS_VERSION,
        "num_inputs": num_inputs,
        "planned_inputs": planned,
        "inputs_hash": inputs_hash,
        "num_shards": num_shards(planned, shard_size),
        "shard_size": shard_size,
        "arguments": dict(arguments),
        "models": dict(models),
        "code_version": code_version(),
        "software": software_versions(),
        # The image classes: every row's label indexes them, so other classes need a new folder.
        "classes": {"count": len(class_names),
                    "sha256": hashlib.sha256("\n".join(class_names).encode()).hexdigest()},
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "execution": dict(execution or {}),
    }


def _compared(manifest: Mapping) -> dict[str, object]:
    compared = {k: manifest.get(k) for k in COMPARED}
    compared["models"] = {role: {k: v for k, v in (model or {}).items() if k in MODEL_IDENTITY}
                          for role, model in (manifest.get("models") or {}).items()}
    flat = _flatten(compared)
    for key in [k for k in flat if k.startswith("models.") and k.rsplit(".", 1)[-1] in SPEED_PARAMS]:
        del flat[key]
    return json.loads(json.dumps(flat))  # tuples and lists, ints and floats compare as they are stored


# What `python -m dataset_card repaint` changes in place (each data file names its own rule, which
# `validate` checks): not part of the footers' hash, so a repainted folder's shards stay trusted.
REPAINTED = ("arguments.painting_rule", "arguments.min_purity", "painting")


def labels_hash(manifest: Mapping) -> str:
    """sha256 of what shapes the labels (the compared part of the manifest but the painting rule):
    each data file's footer carries it, so a shard made under other settings is recognised."""
    compared = {k: v for k, v in _compared(manifest).items() if not k.startswith(REPAINTED)}
    return hashlib.sha256(json.dumps(compared, sort_keys=True).encode()).hexdigest()


def num_shards(num_inputs: int, shard_size: int) -> int:
    return max(1, -(-num_inputs // shard_size))


def _flatten(value, prefix: str = "") -> dict[str, object]:
    if isinstance(value, Mapping):
        out: dict[str, object] = {}
        for key, item in value.items():
            out.update(_flatten(item, f"{prefix}.{key}" if prefix else str(key)))
        return out
    return {prefix: value}


def _changes(a: Mapping, b: Mapping) -> list[str]:
    return [f"{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]


def differences(old: Mapping, new: Mapping) -> list[str]:
    """"key: old -> new" for every compared value that differs (nested keys dotted)."""
    return _changes(_compared(old), _compared(new))


def _environment(manifest: Mapping) -> dict[str, object]:
    recorded = {k: manifest.get(k) for k in ENVIRONMENT}
    recorded["models"] = {role: {"checkpoint": (model or {}).get("checkpoint")}
                          for role, model in (manifest.get("models") or {}).items()}
    return _flatten(recorded)


def environment_changes(old: Mapping, new: Mapping) -> list[str]:
    """"key: old -> new" for every recorded environment value that differs, the models' checkpoint
    paths among them (never a reason to refuse unless --strict-environment)."""
    return _changes(_environment(old), _environment(new))


def _shown(changes: list[str], limit: int = 8) -> str:
    return "; ".join(changes[:limit]) + (f"; and {len(changes) - limit} more" if len(changes) > limit else "")


def read(folder: OutputFolder) -> dict | None:
    if not folder.exists(layout.MANIFEST_FILE):
        return None
    return json.loads(folder.read_bytes(layout.MANIFEST_FILE).decode())


def write(folder: OutputFolder, manifest: Mapping) -> None:
    folder.write_bytes(layout.MANIFEST_FILE, json.dumps(manifest, indent=2).encode())


# Everything a run writes under OUTPUT (and nothing else: --overwrite never deletes a stranger's file).
OWNED = (layout.DATA_DIR, layout.ERRORS_DIR, layout.STATS_DIR, shards.JOURNAL_DIR, layout.PARTS_DIR, "assets",
         layout.MANIFEST_FILE, layout.RUN_STATS_FILE, layout.METADATA_FILE, layout.CARD_FILE, layout.CARD_OPTIONS_FILE)


def clear(folder: OutputFolder) -> None:
    """Delete what a labeling run writes in `folder`."""
    for name in OWNED:
        path = folder.path(name)
        info = folder.fs.get_file_info(path)
        if info.type == pafs.FileType.Directory:
            folder.fs.delete_dir(path)
        elif info.type == pafs.FileType.File:
            folder.fs.delete_file(path)


def _has_data(folder: OutputFolder) -> bool:
    selector = pafs.FileSelector(folder.path(layout.DATA_DIR), allow_not_found=True)
    return any(i.type == pafs.FileType.File for i in folder.fs.get_file_info(selector))


def prepare(folder: OutputFolder, new: Mapping, overwrite: bool, strict_environment: bool = False,
            log: Callable[[str], None] = print) -> tuple[bool, dict]:
    """Make `folder` ready for the run described by `new`: (whether it resumes an earlier run, the
    manifest the run goes on with, now written). A resumed folder keeps its shard count, and the
    record of where and when it was made (its first run's models, environment and date).

    Raises ResumeRefused when the folder holds another run and `overwrite` is False, or when it was
    made under another environment and `strict_environment` is True; else such a drift is one line
    to `log`.
    """
    output = folder.uri
    old = read(folder)
    manifest = dict(new)
    if old is not None and not overwrite:
        if "labels_version" not in old:
            raise ResumeRefused(
                f"{output} was labeled before label fingerprints, so this code cannot tell whether its labels "
                "mean what new ones would: pass --overwrite to relabel it, or choose another --output")
        diff = differences(old, new)
        if diff:
            raise ResumeRefused(
                f"{output} holds labels made with other label-shaping arguments, models or labels version "
                f"({_shown(diff)}): rerun with the same arguments to resume it, pass --overwrite to delete it and "
                "start over, or choose another --output")
        drift = environment_changes(old, new)
        if drift and strict_environment:
            raise ResumeRefused(
                f"{output} was labeled under another environment ({_shown(drift)}) and --strict-environment was "
                "given: resume it under the recorded one, or drop --strict-environment to go on (each shard's "
                "footer records what made it)")
        if drift:
            log(f"warning: {output} was labeled under another environment ({_shown(drift)}); resuming it: each "
                "shard's footer records the environments that made its rows (--strict-environment refuses instead)")
        manifest["num_shards"] = old["num_shards"]
        # A --sample fills its shards only partly: the fill is judged on the inputs they are planned for.
        planned, was = new.get("planned_inputs", new["num_inputs"]), old.get("planned_inputs", old.get("num_inputs"))
        fill = planned / (old["num_shards"] * new["shard_size"])
        if not SHARD_FILL[0] <= fill <= SHARD_FILL[1] and planned != was:
            raise ResumeRefused(
                f"{output} was made for {was} inputs in {old['num_shards']} shards; {planned}"
                f" inputs would make its shards hold about {planned / old['num_shards']:.0f} images each "
                f"against --shard-size {new['shard_size']}: label into another --output, or pass --overwrite")
        for key in ("created", "models", *ENVIRONMENT):  # the same identities; where and when it was made
            if key in old:
                manifest[key] = old[key]
    elif old is None and _has_data(folder) and not overwrite:
        raise ResumeRefused(f"{output} holds data files but no {layout.MANIFEST_FILE}: choose an empty --output, "
                            "or pass --overwrite to delete them")
    if overwrite:
        clear(folder)
    folder.fs.create_dir(folder.root, recursive=True)
    write(folder, manifest)
    return old is not None and not overwrite, manifest

"""manifest.json: what a labeled folder was made from, and whether a rerun may resume it.

A rerun resumes when what shapes the labels is unchanged: the arguments (but `--limit`), the
models, the code that shapes labels, the library versions and the image classes. Otherwise it is
refused with the differences listed, unless `--overwrite` clears the folder first. The inputs may
change: shards are keyed by a hash of each input's id (`labeling.pipeline.plan`), so a rerun with
added or removed inputs relabels only what is new in the shards they fall into; the manifest then
records the new inputs. Arguments that only change speed (batch sizes, actor counts, GPUs) are
recorded under "execution" and may change too.

`labels_hash` digests the compared part; every data file's footer carries it, so a shard written
under other settings is never trusted.
"""

from __future__ import annotations

import datetime
import hashlib
import json
from collections.abc import Mapping, Sequence
from importlib import metadata as importlib_metadata
from pathlib import Path

import pyarrow.fs as pafs

from dataset_card.contract import layout, shards
from dataset_card.contract.output_folder import OutputFolder
from dataset_card.contract.schema import SCHEMA_VERSION

# Keys two manifests must agree on for a rerun to resume (the inputs, "created" and "execution"
# may differ).
COMPARED = ("schema_version", "shard_size", "arguments", "models", "code_version", "software", "classes")
# Arguments that pick inputs rather than shape labels: free to change on resume.
INPUT_ARGUMENTS = ("limit",)
# Shards may hold between a quarter and four times --shard-size images when the inputs of a folder
# grow or shrink; beyond that a rerun asks for a new folder (its shard count is fixed).
SHARD_FILL = (0.25, 4.0)

# The code whose change can change a label: the labelers, the read / model / post-process stages,
# and the contract's codecs, painting rule and schema. The driver, writer, card and docs are not in
# it, so editing them does not force a relabel.
LABEL_CODE = ("labeling/labelers", "labeling/pipeline/preprocess.py", "labeling/pipeline/predictors.py",
              "labeling/pipeline/postprocess.py", "dataset_card/contract/codecs.py", "dataset_card/contract/painting.py",
              "dataset_card/contract/schema.py", "dataset_card/contract/invariants.py")

# Libraries whose release can change the labels (a resize's numerics, mask decoding, RLE): recorded,
# and a rerun with other versions does not resume (its shards would not match the earlier ones).
SOFTWARE = ("torch", "torchvision", "transformers", "segment-anything", "pycocotools", "opencv-python-headless",
            "numpy", "pillow")


# Model parameters that change speed, not labels (beyond float rounding): free to change on resume.
SPEED_PARAMS = ("batch_size", "points_per_batch", "encoder_batch_size")


class ResumeRefused(ValueError):
    """The output folder holds a different run; the message says what differs and what to do."""


def code_version() -> str:
    """`<package version>+<12 hex of the label-shaping sources (LABEL_CODE)>`."""
    try:
        version = importlib_metadata.version("c2fmae")
    except importlib_metadata.PackageNotFoundError:
        version = "0+unknown"
    digest = hashlib.sha256()
    repo = Path(__file__).resolve().parents[2]
    for entry in LABEL_CODE:
        path = repo / entry
        for source in sorted(path.rglob("*.py")) if path.is_dir() else [path]:
            digest.update(f"{source.relative_to(repo).as_posix()}\n".encode())
            digest.update(source.read_bytes())
    return f"{version}+{digest.hexdigest()[:12]}"


def software_versions() -> dict[str, str | None]:
    """{distribution: installed version (None when absent)} of SOFTWARE, plus Python's."""
    import platform

    versions: dict[str, str | None] = {"python": platform.python_version()}
    for name in SOFTWARE:
        try:
            versions[name] = importlib_metadata.version(name)
        except importlib_metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def build(num_inputs: int, inputs_hash: str, shard_size: int, arguments: Mapping, models: Mapping,
          execution: Mapping | None = None, class_names: Sequence[str] = ()) -> dict:
    return {
        "schema_version": SCHEMA_VERSION,
        "num_inputs": num_inputs,
        "inputs_hash": inputs_hash,
        "num_shards": num_shards(num_inputs, shard_size),
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
    flat = _flatten({k: manifest.get(k) for k in COMPARED})
    for key in [k for k in flat if k.startswith("models.") and k.rsplit(".", 1)[-1] in SPEED_PARAMS]:
        del flat[key]
    for name in INPUT_ARGUMENTS:
        flat.pop(f"arguments.{name}", None)
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


def differences(old: Mapping, new: Mapping) -> list[str]:
    """"key: old -> new" for every compared value that differs (nested keys dotted)."""
    a, b = _compared(old), _compared(new)
    return [f"{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]


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


def prepare(folder: OutputFolder, new: Mapping, overwrite: bool) -> tuple[bool, dict]:
    """Make `folder` ready for the run described by `new`: (whether it resumes an earlier run, the
    manifest the run goes on with, now written). A resumed folder keeps its shard count.

    Raises ResumeRefused when the folder holds another run and `overwrite` is False.
    """
    output = folder.uri
    old = read(folder)
    manifest = dict(new)
    if old is not None and not overwrite:
        diff = differences(old, new)
        if diff:
            shown = "; ".join(diff[:8]) + (f"; and {len(diff) - 8} more" if len(diff) > 8 else "")
            raise ResumeRefused(
                f"{output} holds a run with other arguments, models, code or classes ({shown}): rerun with the "
                "same arguments to resume it, pass --overwrite to delete it and start over, or choose another "
                "--output")
        manifest["num_shards"] = old["num_shards"]
        fill = new["num_inputs"] / (old["num_shards"] * new["shard_size"])
        if not SHARD_FILL[0] <= fill <= SHARD_FILL[1] and new["num_inputs"] != old.get("num_inputs"):
            raise ResumeRefused(
                f"{output} was made for {old.get('num_inputs')} inputs in {old['num_shards']} shards; {new['num_inputs']}"
                f" inputs would make its shards hold about {new['num_inputs'] / old['num_shards']:.0f} images each "
                f"against --shard-size {new['shard_size']}: label into another --output, or pass --overwrite")
        manifest["created"] = old.get("created", manifest["created"])
    elif old is None and _has_data(folder) and not overwrite:
        raise ResumeRefused(f"{output} holds data files but no {layout.MANIFEST_FILE}: choose an empty --output, "
                            "or pass --overwrite to delete them")
    if overwrite:
        clear(folder)
    folder.fs.create_dir(folder.root, recursive=True)
    write(folder, manifest)
    return old is not None and not overwrite, manifest

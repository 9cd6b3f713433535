"""manifest.json: what a labeled folder was made from, and whether a rerun may resume it.

A rerun resumes (skips committed shards) only when its inputs, the arguments that shape the
output, the models and the code version all equal those in the folder's manifest; otherwise it is
refused with the differences listed, unless `--overwrite` clears the folder first. Arguments that
only change speed (batch sizes, actor counts, GPUs) are recorded under "execution" and may change.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import posixpath
from collections.abc import Mapping
from importlib import metadata as importlib_metadata
from pathlib import Path

import pyarrow.fs as pafs

from dataset_card import layout, shards
from dataset_card.schema import SCHEMA_VERSION

# Keys two manifests must agree on for a rerun to resume ("created" and "execution" may differ).
COMPARED = ("schema_version", "num_inputs", "inputs_hash", "num_shards", "shard_size", "arguments", "models",
            "code_version", "software")

# Libraries whose release can change the labels (a resize's numerics, mask decoding, RLE): recorded,
# and a rerun with other versions does not resume (its shards would not match the earlier ones).
SOFTWARE = ("torch", "torchvision", "transformers", "segment-anything", "pycocotools", "opencv-python-headless",
            "numpy", "pillow")


# Model parameters that change speed, not labels (beyond float rounding): free to change on resume.
SPEED_PARAMS = ("batch_size", "points_per_batch", "encoder_batch_size")


class ResumeRefused(ValueError):
    """The output folder holds a different run; the message says what differs and what to do."""


def code_version() -> str:
    """`<package version>+<12 hex of the labeling and dataset_card sources>`: any code change counts."""
    try:
        version = importlib_metadata.version("c2fmae")
    except importlib_metadata.PackageNotFoundError:
        version = "0+unknown"
    digest = hashlib.sha256()
    repo = Path(__file__).resolve().parents[2]
    for package in (repo / "labeling", repo / "dataset_card"):
        for source in sorted(package.rglob("*.py")):
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
          execution: Mapping | None = None) -> dict:
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
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "execution": dict(execution or {}),
    }


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
    a = _flatten({k: old.get(k) for k in COMPARED})
    b = _flatten({k: new.get(k) for k in COMPARED})
    # JSON round trip so tuples and lists, ints and floats compare as they are stored.
    a, b = json.loads(json.dumps(a)), json.loads(json.dumps(b))
    for flat in (a, b):
        for key in [k for k in flat if k.startswith("models.") and k.rsplit(".", 1)[-1] in SPEED_PARAMS]:
            del flat[key]
    return [f"{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]


def read(fs: pafs.FileSystem, root: str) -> dict | None:
    path = posixpath.join(root, layout.MANIFEST_FILE)
    if not shards.exists(fs, path):
        return None
    return json.loads(shards.read_bytes(fs, path).decode())


def write(fs: pafs.FileSystem, root: str, manifest: Mapping) -> None:
    shards.write_bytes(fs, posixpath.join(root, layout.MANIFEST_FILE), json.dumps(manifest, indent=2).encode())


# Everything a run writes under OUTPUT (and nothing else: --overwrite never deletes a stranger's file).
OWNED = (layout.DATA_DIR, layout.ERRORS_DIR, layout.STATS_DIR, ".journal", layout.MANIFEST_FILE,
         layout.RUN_STATS_FILE, layout.METADATA_FILE, layout.CARD_FILE)


def clear(fs: pafs.FileSystem, root: str) -> None:
    """Delete what a labeling run writes under `root`."""
    for name in OWNED:
        path = posixpath.join(root, name)
        info = fs.get_file_info(path)
        if info.type == pafs.FileType.Directory:
            fs.delete_dir(path)
        elif info.type == pafs.FileType.File:
            fs.delete_file(path)


def _has_data(fs: pafs.FileSystem, root: str) -> bool:
    selector = pafs.FileSelector(posixpath.join(root, layout.DATA_DIR), allow_not_found=True)
    return any(i.type == pafs.FileType.File for i in fs.get_file_info(selector))


def prepare(fs: pafs.FileSystem, root: str, new: Mapping, overwrite: bool, output: str) -> bool:
    """Make `root` ready for the run described by `new`; True when it resumes an earlier run.

    Raises ResumeRefused when the folder holds another run and `overwrite` is False.
    """
    old = read(fs, root)
    if old is not None and not overwrite:
        diff = differences(old, new)
        if not diff:
            return True
        shown = "; ".join(diff[:8]) + (f"; and {len(diff) - 8} more" if len(diff) > 8 else "")
        raise ResumeRefused(
            f"{output} holds a run with other inputs, arguments, models or code ({shown}): rerun with the "
            "same arguments to resume it, pass --overwrite to delete it and start over, or choose another --output")
    if old is None and _has_data(fs, root) and not overwrite:
        raise ResumeRefused(f"{output} holds data files but no {layout.MANIFEST_FILE}: choose an empty --output, "
                            "or pass --overwrite to delete them")
    if overwrite:
        clear(fs, root)
    fs.create_dir(root, recursive=True)
    write(fs, root, new)
    return False

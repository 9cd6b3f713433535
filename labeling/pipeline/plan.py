"""What a run labels: inputs keyed to shards by a stable hash, and every shard already in the folder
checked before it is trusted.

Shards are hash buckets. Input i goes to shard `shard_of(image_id_i, N)` (the first 8 bytes of the
sha256 of its image_id, modulo N), where N is fixed when the folder is made (manifest.json
`num_shards`, about inputs / `--shard-size`); a shard's rows are in input (sorted) order. Adding or
removing inputs therefore touches only the shards they fall into, and those keep the rows they
already have: only new inputs go through the models (`writer.commit` merges). Two inputs with one
image_id share a shard.

A shard whose data file exists is trusted (skipped) only when its data file reads as Parquet, its
footer names this folder's settings (`manifest.labels_hash`) and this shard's inputs (their
digest), its row count matches the footer, its errors table exists with the footer's number of
failures, the two add up to its inputs, and its statistics file exists. Otherwise it is repaired,
with a line saying why: rows it still has are reused when its data file can be read, else the
whole shard is relabeled. `--no-repair` refuses instead.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from dataset_card.contract import layout, shards
from dataset_card.contract.output_folder import OutputFolder
from labeling.inputs.input_list import Inputs


class RepairRefused(ValueError):
    """A committed shard fails verification and `--no-repair` was given."""


def shard_of(image_ids: Sequence[str], num_shards: int) -> np.ndarray:
    """(n,) int64 shard of each image_id: its sha256's first 8 bytes modulo `num_shards`."""
    return np.asarray(layout.shard_of(image_ids, num_shards), np.int64)


def inputs_digest(paths: Sequence[str]) -> str:
    """sha256 of a shard's input paths, one per line (in the footer: what the shard was made of)."""
    digest = hashlib.sha256()
    for path in paths:
        digest.update(path.encode())
        digest.update(b"\n")
    return digest.hexdigest()


@dataclass(frozen=True)
class ShardInputs:
    index: int
    indices: np.ndarray  # (n,) input indices, ascending
    digest: str  # inputs_digest of their paths


def assign(listed: Inputs, num_shards: int) -> list[ShardInputs]:
    """Every shard's inputs (empty shards included)."""
    table = listed.table
    keys = shard_of(table.column("image_id").to_pylist(), num_shards)
    paths = table.column("path").to_pylist()
    order = np.lexsort((np.arange(len(keys)), keys))  # by shard, then input index
    bounds = np.searchsorted(keys[order], np.arange(num_shards + 1))
    out = []
    for s in range(num_shards):
        indices = order[bounds[s]:bounds[s + 1]]
        out.append(ShardInputs(s, indices, inputs_digest([paths[i] for i in indices])))
    return out


@dataclass
class ShardState:
    """What a run does with one shard."""

    shard: ShardInputs
    todo: list[int]  # input indices to label
    reuse: bool = False  # the commit merges the rows and failures the shard already holds
    reason: str = ""  # why a shard that exists is redone ("" for a new shard or a plain retry)
    damaged: bool = False  # the folder broke (not: its inputs changed); --no-repair refuses


@dataclass
class Plan:
    num_shards: int
    shards: list[ShardInputs]
    work: dict[int, ShardState] = field(default_factory=dict)  # shards this run commits
    committed: set[int] = field(default_factory=set)  # verified, left alone

    def indices(self) -> list[int]:
        """Input indices to label, shard by shard (so shards complete, and commit, early)."""
        return [i for s in sorted(self.work) for i in self.work[s].todo]


def _readable_rows(fs: pafs.FileSystem, path: str) -> int | None:
    try:
        return shards.read_footer(fs, path)[0]
    except (OSError, pa.ArrowException):
        return None


def _column(fs: pafs.FileSystem, path: str, name: str) -> list:
    with fs.open_input_file(path) as f:
        return pq.read_table(f, columns=[name]).column(0).to_pylist()


def inspect(folder: OutputFolder, shard: ShardInputs, num_shards: int, listed: Inputs,
            labels_hash: str, retry_errors: bool) -> ShardState | None:
    """None when shard `shard` is committed and verified (and nothing is to be retried), else what to do."""
    everything = shard.indices.tolist()
    fs = folder.fs
    data, errors, stats = folder.shard_paths(shard.index, num_shards)
    if not shards.exists(fs, data):
        if shards.exists(fs, errors) or shards.exists(fs, stats):
            return ShardState(shard, everything, reason="its data file is missing though its errors table or "
                              "statistics are there (deleted by hand, or its commit was interrupted)", damaged=True)
        return ShardState(shard, everything)
    try:
        rows, footer = shards.read_footer(fs, data)
    except (OSError, pa.ArrowException) as err:
        first = str(err).splitlines()[0][:200]
        return ShardState(shard, everything, reason=f"its data file cannot be read ({type(err).__name__}: {first})",
                          damaged=True)
    if footer.get("manifest_sha256") != labels_hash:
        why = "it has no shard footer" if "manifest_sha256" not in footer else "its footer names other settings"
        return ShardState(shard, everything, reason=f"{why} (written by another version or run)", damaged=True)
    if footer.get("rows") != rows:
        return ShardState(shard, everything, reason=f"its footer says {footer.get('rows')} rows but the file holds "
                          f"{rows}", damaged=True)
    problems = []
    failed = _readable_rows(fs, errors) if shards.exists(fs, errors) else None
    if not shards.exists(fs, errors):
        problems.append("its errors table is missing")
    elif failed is None:
        problems.append("its errors table cannot be read")
    elif failed != footer.get("errors"):
        problems.append(f"its errors table holds {failed} failed inputs, its footer says {footer.get('errors')}")
    if not shards.exists(fs, stats):
        problems.append("its statistics file is missing")
    changed = footer.get("inputs_sha256") != shard.digest
    if not problems and not changed and rows + failed != len(everything):
        problems.append(f"it holds {rows} rows and {failed} failures for its {len(everything)} inputs")
    if not problems and not changed and not (retry_errors and failed):
        return None
    # Reuse what the shard holds: label only the inputs it has no row (or, unless retried, no failure) for.
    ids = listed.table.column("image_id").to_pylist()
    paths = listed.table.column("path").to_pylist()
    have = set(_column(fs, data, "image_id"))
    recorded = set(_column(fs, errors, "path")) if failed is not None else set()
    redo = set() if retry_errors else recorded
    todo = [i for i in everything if ids[i] not in have and paths[i] not in redo]
    if problems:
        return ShardState(shard, todo, reuse=True, reason="; ".join(problems), damaged=True)
    if changed:
        current_ids, current_paths = {ids[i] for i in everything}, {paths[i] for i in everything}
        gone = len(have - current_ids) + len(recorded - current_paths)
        added = sum(1 for i in everything if ids[i] not in have and paths[i] not in recorded)
        return ShardState(shard, todo, reuse=True, reason=f"its inputs changed ({added} new, {gone} gone)")
    return ShardState(shard, todo, reuse=True)  # --retry-errors


def make_plan(folder: OutputFolder, listed: Inputs, num_shards: int, labels_hash: str,
              retry_errors: bool, no_repair: bool = False, workers: int = 16) -> Plan:
    """Inspect every shard (in parallel: thousands of small reads on an object store)."""
    plan = Plan(num_shards, assign(listed, num_shards))
    with ThreadPoolExecutor(workers) as pool:
        states = list(pool.map(lambda s: inspect(folder, s, num_shards, listed, labels_hash, retry_errors),
                               plan.shards))
    for shard, state in zip(plan.shards, states):
        if state is None:
            plan.committed.add(shard.index)
        else:
            plan.work[shard.index] = state
    damaged = [s for s in plan.work.values() if s.damaged]
    if no_repair and damaged:
        first = damaged[0]
        raise RepairRefused(
            f"{len(damaged)} committed shard(s) fail verification, e.g. {layout.data_path(first.shard.index, num_shards)}"
            f": {first.reason}; rerun without --no-repair to repair them")
    return plan

"""Writing around shards: rows are collected per shard, whatever Ray's block boundaries, and a shard
is committed once every input it owes has arrived.

`ShardAssembler` keeps the post-processed rows of each open shard keyed by input index, so a row
that arrives twice (a retried Ray task) is kept once. A complete shard is split into its data rows,
errors and statistics and written with `dataset_card.shards.commit_shard` (errors, stats, then the
data file: the commit point). Rewriting a shard replaces the same files with the same content.

`--retry-errors` rewrites shards that are already committed (their old rows plus the recovered
ones). Three files must then change together, so they are first written beside their targets and
a journal naming the renames is committed before any rename; a run that finds a journal finishes
its renames (`recover`). Either way no input is ever both in the data and in the errors table.
"""

from __future__ import annotations

import json
import posixpath
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from dataset_card import invariants, layout, shards
from dataset_card.schema import COLUMNS, validate_schema

JOURNAL_DIR = ".journal"


@dataclass
class ShardResult:
    """What one commit wrote (this run's share of the run summary)."""

    shard: int
    rows: int
    errors_by_type: dict[str, int] = field(default_factory=dict)
    instances: int = 0
    stage_time_s: dict[str, float] = field(default_factory=dict)


class ShardAssembler:
    """Rows per open shard until each holds every index it owes.

    expected: shard -> the input indices this run must deliver for it (all of a new shard's, or
    only the failed ones of a shard being retried).
    """

    def __init__(self, expected: Mapping[int, Iterable[int]]):
        self.expected = {shard: set(indices) for shard, indices in expected.items() if indices}
        self._rows: dict[int, dict[int, pa.Table]] = {shard: {} for shard in self.expected}

    def add(self, batch: pa.Table) -> list[int]:
        """Take a staged batch; return the shards it completed."""
        done = []
        shard_col, index_col = batch.column("shard").to_pylist(), batch.column("index").to_pylist()
        for i, (shard, index) in enumerate(zip(shard_col, index_col)):
            rows = self._rows.get(shard)
            if rows is None or index not in self.expected[shard] or index in rows:
                continue  # a shard already committed this run, or a duplicate from a retried task
            rows[index] = batch.slice(i, 1)
            if len(rows) == len(self.expected[shard]):
                done.append(shard)
        return done

    def take(self, shard: int) -> pa.Table:
        """The complete shard's rows in input order; the shard is closed."""
        rows = self._rows.pop(shard)
        del self.expected[shard]
        return pa.concat_tables([rows[i] for i in sorted(rows)]).combine_chunks()

    def missing(self) -> dict[int, set[int]]:
        """Indices still owed, per open shard."""
        return {s: self.expected[s] - set(rows) for s, rows in self._rows.items()}

    def __len__(self) -> int:
        return len(self._rows)


def errors_table(staged: pa.Table) -> pa.Table:
    failed = staged.filter(pc.not_equal(staged.column("error_type"), ""))
    return pa.table({
        "image_id": failed.column("image_id"),
        "path": failed.column("path"),
        "label": failed.column("label"),
        "stage": failed.column("error_stage"),
        "error_type": failed.column("error_type"),
        "message": failed.column("error_message"),
    }).cast(layout.ERRORS_SCHEMA)


def data_table(staged: pa.Table, contract: pa.Schema) -> pa.Table:
    """The successful rows, contract columns only, with the contract's schema and metadata."""
    ok = staged.filter(pc.equal(staged.column("error_type"), ""))
    return ok.select(list(COLUMNS)).cast(contract)


def add_rows(stats: layout.ShardStats, staged: pa.Table) -> None:
    ok = staged.filter(pc.equal(staged.column("error_type"), ""))
    columns = ok.select(["stat_instances", "stat_coverage", "stat_purities", "stat_semantic_ids",
                         "stat_semantic_counts", "stat_levels", "stat_figures"]).to_pydict()
    for n, coverage, purities, ids, counts, levels, figures in zip(*columns.values()):
        found = invariants.MapFigures(**json.loads(figures)) if figures else None
        if found is not None:  # JSON turned the agreement keys into strings
            found.agreement = {int(k): v for k, v in found.agreement.items()}
        stats.add_row(n, coverage, purities, dict(zip(ids, counts)), json.loads(levels or "{}"), found)


def _result(shard: int, staged: pa.Table, errors: pa.Table) -> ShardResult:
    ok = staged.filter(pc.equal(staged.column("error_type"), ""))
    by_type: dict[str, int] = {}
    for t in errors.column("error_type").to_pylist():
        by_type[t] = by_type.get(t, 0) + 1
    times = {c.removeprefix("time_"): float(pc.sum(staged.column(c)).as_py() or 0.0)
             for c in staged.column_names if c.startswith("time_")}
    return ShardResult(shard, ok.num_rows, by_type, int(pc.sum(ok.column("stat_instances")).as_py() or 0), times)


def commit(fs: pafs.FileSystem, root: str, shard: int, num_shards: int, staged: pa.Table,
           contract: pa.Schema) -> ShardResult:
    """Commit a complete new shard from its staged rows (input order)."""
    errors = errors_table(staged)
    stats = layout.ShardStats(shard=shard)
    add_rows(stats, staged)
    for error_type in errors.column("error_type").to_pylist():
        stats.add_error(error_type)
    data = data_table(staged, contract)
    validate_schema(data.schema, source=layout.data_path(shard, num_shards))
    shards.commit_shard(fs, root, shard, num_shards, data, errors, stats)
    return _result(shard, staged, errors)


def _paths(root: str, shard: int, num_shards: int) -> tuple[str, str, str]:
    return tuple(posixpath.join(root, p) for p in (layout.data_path(shard, num_shards),
                                                   layout.errors_path(shard, num_shards),
                                                   layout.stats_path(shard, num_shards)))


def read_errors(fs: pafs.FileSystem, root: str, shard: int, num_shards: int) -> pa.Table:
    path = _paths(root, shard, num_shards)[1]
    if not shards.exists(fs, path):
        return layout.ERRORS_SCHEMA.empty_table()
    with fs.open_input_file(path) as f:
        return pq.read_table(f).cast(layout.ERRORS_SCHEMA)


def commit_retried(fs: pafs.FileSystem, root: str, shard: int, num_shards: int, staged: pa.Table,
                   contract: pa.Schema, shard_inputs: pa.Table) -> ShardResult:
    """Rewrite a committed shard with its retried inputs: recovered rows join the data, the rest
    replace their old errors. `shard_inputs` (index, path, image_id) gives the input order."""
    data_path, errors_path, stats_path = _paths(root, shard, num_shards)
    with fs.open_input_file(data_path) as f:
        old_data = pq.read_table(f)
    old_errors = read_errors(fs, root, shard, num_shards)
    retried = pa.array(staged.column("path").to_pylist(), pa.string())
    kept_errors = old_errors.filter(pc.invert(pc.is_in(old_errors.column("path"), retried)))
    errors = pa.concat_tables([kept_errors, errors_table(staged)])
    data = pa.concat_tables([old_data.cast(contract), data_table(staged, contract)])
    by_path = dict(zip(shard_inputs.column("path").to_pylist(), shard_inputs.column("index").to_pylist()))
    by_id: dict[str, int] = {}
    for image_id, index in zip(shard_inputs.column("image_id").to_pylist(), shard_inputs.column("index").to_pylist()):
        by_id.setdefault(image_id, index)  # a duplicate id never has a data row
    data = data.take(pc.sort_indices(pa.array([by_id[i] for i in data.column("image_id").to_pylist()])))
    errors = errors.take(pc.sort_indices(pa.array([by_path[p] for p in errors.column("path").to_pylist()])))

    stats = layout.ShardStats.from_json(shards.read_bytes(fs, stats_path).decode())
    stats.errors, stats.errors_by_type = 0, {}
    for error_type in errors.column("error_type").to_pylist():
        stats.add_error(error_type)
    add_rows(stats, staged)
    validate_schema(data.schema, source=layout.data_path(shard, num_shards))

    writes = {
        errors_path: lambda s: shards.write_parquet(errors.cast(layout.ERRORS_SCHEMA), s),
        stats_path: lambda s: s.write(stats.to_json().encode()),
        data_path: lambda s: shards.write_parquet(data, s),
    }
    journal = []
    for target, write in writes.items():
        staging = posixpath.join(posixpath.dirname(target), f".{posixpath.basename(target)}.rewrite")
        with fs.open_output_stream(staging) as stream:
            write(stream)
        journal.append([staging, target])
    journal_path = posixpath.join(root, JOURNAL_DIR, f"shard-{shard:05d}.json")
    shards.write_bytes(fs, journal_path, json.dumps(journal).encode())  # the rewrite's commit point
    _apply(fs, journal_path)
    return _result(shard, staged, errors_table(staged))


def _apply(fs: pafs.FileSystem, journal_path: str) -> None:
    for staging, target in json.loads(shards.read_bytes(fs, journal_path).decode()):
        if shards.exists(fs, staging):
            fs.move(staging, target)
    fs.delete_file(journal_path)


def recover(fs: pafs.FileSystem, root: str) -> int:
    """Finish the renames of rewrites a killed run had committed; returns how many."""
    selector = pafs.FileSelector(posixpath.join(root, JOURNAL_DIR), allow_not_found=True)
    journals = sorted(i.path for i in fs.get_file_info(selector)
                      if i.type == pafs.FileType.File and i.path.endswith(".json"))
    for path in journals:
        _apply(fs, path)
    return len(journals)

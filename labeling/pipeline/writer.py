"""Writing on the workers: labeled rows -> part files -> committed shards. The driver only
coordinates (`labeling.pipeline.commits`); no image, mask or row ever reaches it.

1. `write_parts`, the pipeline's last stage (a CPU task), writes each batch's post-processed rows
   as one Parquet part per shard under `.parts/SSSSS/` (a new name for every attempt) and returns
   only what the driver tracks: shard, part name and input indices, tens of bytes per image.
2. When every input a shard owes has arrived, the driver starts `commit` as a Ray task. It reads
   the shard's parts (keeping each input index once: a retried task may have written a row twice),
   merges the rows and failures the shard already holds when it is being updated (the rows of
   inputs still listed and not being redone), checks that rows + failures equal the shard's
   inputs, and hands its rows, errors table, statistics and footer (run id, manifest hash, input
   digest and counts, and the environments its rows were made in) to the commit protocol (`shards.commit_shard`, journaled: a shard that
   already has a data file has its three files replaced together; a killed replacement is
   finished by the next run, `shards.recover`). No input is ever both in the data and in the
   errors table.

Both run on the cluster with the run's `OutputFolder` (pickled into the task), never a path to open again.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from dataset_card.contract import codecs, coverage, invariants, layout, painting, shards
from dataset_card.contract.layout import LEASE_FILE
from dataset_card.contract.lease import holder_of
from dataset_card.contract.output_folder import OutputFolder
from dataset_card.contract.schema import read_file_metadata, validate_schema
from labeling.pipeline import environment, failures

# What the write stage returns per part file: all the driver ever receives about labeled images.
PART_SCHEMA = pa.schema([
    ("shard", pa.int64()),
    ("part", pa.string()),  # file name in .parts/SSSSS/ ("" when the write failed)
    ("indices", pa.list_(pa.int64())),  # input indices whose rows it holds
    ("started_at", pa.float64()),  # earliest read of its rows (the run's labeling start is the min)
    ("error", pa.string()),  # a write that cannot succeed: the sentence the run stops with
])


class LeaseLost(RuntimeError):
    """Another run holds the folder's lease now; this run must not commit."""


@dataclass
class ShardResult:
    """What one commit did in this run (this run's share of the run summary)."""

    shard: int
    rows: int  # rows this run labeled into the shard
    errors_by_type: dict[str, int] = field(default_factory=dict)  # failures this run recorded
    instances: int = 0
    stage_time_s: dict[str, float] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=dict)  # the rows' count_* columns summed (semantic_fillers)

    @property
    def processed(self) -> int:
        return self.rows + sum(self.errors_by_type.values())


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
    return ok.select(contract.names).cast(contract)


def add_rows(stats: layout.ShardStats, staged: pa.Table) -> None:
    """Per-row statistics the post-process stage computed, for its successful rows."""
    ok = staged.filter(pc.equal(staged.column("error_type"), ""))
    columns = ok.select(["stat_instances", "stat_coverage", "stat_purities", "stat_semantic_ids",
                         "stat_semantic_counts", "stat_levels", "stat_figures", "stat_painted", "stat_regions",
                         "stat_largest"]).to_pydict()
    for n, covered, purities, ids, counts, levels, figures, painted, regions, largest in zip(*columns.values()):
        found = invariants.MapFigures(**json.loads(figures)) if figures else None
        if found is not None:  # JSON turned the agreement keys into strings
            found.agreement = {int(k): v for k, v in found.agreement.items()}
        stats.add_row(n, covered, purities, dict(zip(ids, counts)), json.loads(levels or "{}"), found,
                      coverage.RowCoverage(painted, regions, largest))


def add_stored_rows(stats: layout.ShardStats, rows: pa.Table, thing_ids: Sequence[int]) -> None:
    """Statistics of rows a shard already held (reused by an update), from their decoded maps."""
    for row in rows.select(["semantic_mask", "instance_mask", "instances"]).to_pylist():
        semantic = codecs.decode_mask(row["semantic_mask"]["bytes"])
        instance_map = codecs.decode_mask(row["instance_mask"]["bytes"])
        instances = row["instances"] or []
        classes, counts = np.unique(semantic, return_counts=True)
        stats.add_row(len(instances), float(np.count_nonzero(instance_map)) / max(1, instance_map.size),
                      [inst["category_purity"] for inst in instances], dict(zip(classes.tolist(), counts.tolist())),
                      painting.level_counts(instances), invariants.map_figures(instances, semantic, instance_map,
                                                                               thing_ids),
                      coverage.measure(instances, instance_map))


def _result(shard: int, staged: pa.Table) -> ShardResult:
    ok = staged.filter(pc.equal(staged.column("error_type"), ""))
    by_type: dict[str, int] = {}
    for t in staged.column("error_type").to_pylist():
        if t:
            by_type[t] = by_type.get(t, 0) + 1
    times = {c.removeprefix("time_"): float(pc.sum(staged.column(c)).as_py() or 0.0)
             for c in staged.column_names if c.startswith("time_")}
    counts = {c.removeprefix("count_"): int(pc.sum(staged.column(c)).as_py() or 0)
              for c in staged.column_names if c.startswith("count_")}
    return ShardResult(shard, ok.num_rows, by_type, int(pc.sum(ok.column("stat_instances")).as_py() or 0), times,
                       counts)


# ---------------------------------------------------------------------------------------------
# 1. The write stage


def _write_part(folder: OutputFolder, shard: int, rows: pa.Table, run_id: str) -> str:
    fs, parts = folder.fs, folder.path(layout.parts_dir(shard))

    def attempt() -> str:
        name = f"{run_id}-{uuid.uuid4().hex[:12]}.parquet"  # a new name for every attempt
        path = folder.path(layout.parts_dir(shard), name)
        try:
            fs.create_dir(parts, recursive=True)
            with fs.open_output_stream(path) as stream:  # temporary: uncompressed, one row group
                shards.write_parquet(rows, stream, row_group_size=max(1, rows.num_rows), compression=None)
        except BaseException:
            try:
                fs.delete_file(path)
            except OSError:
                pass
            raise
        return name

    return shards.retrying(attempt, parts, folder.retry_s)


def write_parts(batch: pa.Table, folder: OutputFolder, run_id: str) -> pa.Table:
    """The pipeline's last stage: post-processed rows (`postprocess.staged_schema`) -> one part file
    per shard they belong to in `folder`; returns PART_SCHEMA rows (no image, mask or label data)."""
    out = []
    shard_column = batch.column("shard")
    for shard in pc.unique(shard_column).to_pylist():
        rows = batch.filter(pc.equal(shard_column, shard))
        started = pc.min(rows.column("started_at")).as_py() or 0.0
        try:
            part, error = _write_part(folder, shard, rows, run_id), ""
        except shards.OutputWriteError as err:
            part, error = "", str(err)
        out.append({"shard": shard, "part": part, "indices": rows.column("index").to_pylist(), "started_at": started,
                    "error": error})
    return pa.Table.from_pylist(out, schema=PART_SCHEMA)


# ---------------------------------------------------------------------------------------------
# 2. The commit


@dataclass(frozen=True)
class CommitJob:
    """Everything a commit task needs (what the driver sends: the shard's input list, no rows)."""

    folder: OutputFolder
    shard: int
    num_shards: int
    inputs: pa.Table  # index, path, image_id, label: the shard's current inputs, in input order
    digest: str  # plan.inputs_digest of their paths
    parts: tuple[str, ...]  # part file names in .parts/SSSSS/
    todo: tuple[int, ...]  # input indices this run labeled for the shard
    contract: pa.Schema
    footer: dict  # run_id, manifest_sha256, image_storage
    thing_ids: tuple[int, ...] = ()
    reuse: bool = False  # merge what the shard already holds
    lost: pa.Table | None = None  # staged failure rows of inputs whose rows never came back
    check_lease: bool = True


def read_parts(folder: OutputFolder, shard: int, parts: Sequence[str], todo: Sequence[int]) -> pa.Table | None:
    """The staged rows of `todo` from the shard's part files, each input index once."""
    wanted = pa.array(sorted(set(todo)), pa.int64())
    tables = []
    for name in parts:
        path = folder.path(layout.parts_dir(shard), name)

        def read(path=path) -> pa.Table:
            with folder.fs.open_input_file(path) as f:
                return pq.read_table(f)

        table = shards.retrying(read, path, folder.retry_s)  # a storage outage is ridden out as for writes
        tables.append(table.filter(pc.is_in(table.column("index"), wanted)))
    if not tables:
        return None
    rows = pa.concat_tables(tables)
    _, first = np.unique(rows.column("index").to_numpy(), return_index=True)
    return rows.take(pa.array(np.sort(first)))


def commit(job: CommitJob) -> ShardResult:
    """Merge, check and commit one shard (see the module docstring); runs as a Ray task."""
    start = time.perf_counter()
    folder = job.folder
    data_path = folder.path(layout.data_path(job.shard, job.num_shards))
    staged = read_parts(folder, job.shard, job.parts, job.todo)
    if job.lost is not None and job.lost.num_rows:
        staged = job.lost if staged is None else pa.concat_tables([staged, job.lost.cast(staged.schema)])
    order = {p: i for p, i in zip(job.inputs.column("path").to_pylist(), job.inputs.column("index").to_pylist())}
    by_id: dict[str, int] = {}
    for image_id, index in zip(job.inputs.column("image_id").to_pylist(), job.inputs.column("index").to_pylist()):
        by_id.setdefault(image_id, index)  # a duplicate id never has a data row

    new_paths = set(staged.column("path").to_pylist()) if staged is not None else set()
    data_parts, error_parts, stats = [], [], layout.ShardStats(shard=job.shard)
    made_in: list[dict] = []  # the environments of the rows kept from the shard
    if job.reuse and shards.exists(folder.fs, data_path):
        with folder.fs.open_input_file(data_path) as f:
            old = pq.read_table(f)
        made_in = read_file_metadata(old.schema).get("environments", [])
        redone = {image_id for p, image_id in zip(staged.column("path").to_pylist(),
                                                  staged.column("image_id").to_pylist())} if staged else set()
        keep = [image_id in by_id and image_id not in redone for image_id in old.column("image_id").to_pylist()]
        old = old.filter(pa.array(keep, pa.bool_()))
        add_stored_rows(stats, old, job.thing_ids)
        data_parts.append(old.select(job.contract.names).cast(job.contract))
        old_errors = folder.read_errors(job.shard, job.num_shards)
        keep = [p in order and p not in new_paths for p in old_errors.column("path").to_pylist()]
        error_parts.append(old_errors.filter(pa.array(keep, pa.bool_())))
        if not (data_parts[-1].num_rows or error_parts[-1].num_rows):
            made_in = []
    if staged is not None:
        add_rows(stats, staged)
        data_parts.append(data_table(staged, job.contract))
        error_parts.append(errors_table(staged))
    data = pa.concat_tables(data_parts) if data_parts else job.contract.empty_table()
    errors = pa.concat_tables(error_parts) if error_parts else layout.ERRORS_SCHEMA.empty_table()
    data = data.take(pc.sort_indices(pa.array([by_id[i] for i in data.column("image_id").to_pylist()], pa.int64())))
    errors = errors.take(pc.sort_indices(pa.array([order[p] for p in errors.column("path").to_pylist()], pa.int64())))
    for error_type in errors.column("error_type").to_pylist():
        stats.add_error(error_type)
    if data.num_rows + errors.num_rows != job.inputs.num_rows:
        raise RuntimeError(f"shard {job.shard} would hold {data.num_rows} rows and {errors.num_rows} failures for "
                           f"{job.inputs.num_rows} inputs; not committed (a bug: please report it)")
    validate_schema(data.schema, source=layout.data_path(job.shard, job.num_shards))
    footer = {**job.footer, "shard": job.shard, "num_shards": job.num_shards, "inputs": job.inputs.num_rows,
              "inputs_sha256": job.digest, "rows": data.num_rows, "errors": errors.num_rows,
              "environments": environments(made_in, staged)}
    if job.check_lease:
        holder = shards.retrying(lambda: holder_of(folder), folder.path(LEASE_FILE), folder.retry_s)
        if holder is None or holder.run_id != job.footer.get("run_id"):
            raise LeaseLost(f"shard {job.shard} was not committed: another run took over the lease of {folder}")
    shards.commit_shard(folder, job.shard, job.num_shards, data, errors, stats, footer=footer,
                        row_group_size=shards.row_group_rows(data), journal=True)
    folder.delete_dir_quietly(layout.parts_dir(job.shard))
    result = _result(job.shard, staged) if staged is not None else ShardResult(job.shard, 0)
    result.stage_time_s["commit"] = time.perf_counter() - start
    return result


def environments(kept: Sequence[dict], staged: pa.Table | None) -> list[dict]:
    """The distinct environments that made a shard's rows: those recorded for the rows it keeps,
    and those the staged rows carry (`labeling.pipeline.environment`)."""
    encoded = {environment.encode(e) for e in kept}
    if staged is not None and "environment" in staged.column_names:
        encoded.update(pc.unique(staged.column("environment")).to_pylist())
    return environment.decode_all(encoded - {None})


def lost_rows(work: pa.Table, schema: pa.Schema) -> pa.Table:
    """Staged failure rows for inputs whose results never came back, even when labeled alone."""
    failure = failures.Failure("worker", failures.WORKER_CRASH,
                               "the worker labeling this image died on every attempt, even with the image alone")
    rows = []
    for row in work.to_pylist():
        row.update(failure.as_row())
        rows.append(row)
    return pa.Table.from_pylist(rows, schema=schema)

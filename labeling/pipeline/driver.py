"""The labeling run: list inputs, take the output's lease, plan shards, run the Ray pipeline whose
workers write, commit shards as they complete, verify the folder, close.

    input list ──► the Ray Data graph (`dataflow`: read, models, post-process, write parts)
        ──► driver: part results (shard, part, indices) ──► commit tasks (`writer.commit`)

The driver never sees a labeled row: the write stage leaves rows in per-shard part files and
returns tens of bytes per image; a shard's commit runs as a Ray task once every input it owes
has arrived (`commits`). Shards are hash buckets of image ids (`plan`), checked before a rerun
trusts them. Inputs whose rows never come back (a block Ray gave up on) get one more pass alone,
then are recorded as failures: every input ends up exactly once, in the data or the errors table.
Before its closing line the run checks the folder as `python -m dataset_card validate` does.
What a run is asked to do is a `config.LabelingConfig`.
"""

from __future__ import annotations

import dataclasses
import math
import sys
import time
import warnings
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import ray
from tqdm.auto import tqdm

from dataset_card.contract import layout, shards
from dataset_card.contract.lease import Lease, new_run_id, ttl_for
from dataset_card.contract.output_folder import OutputFolder
from dataset_card.contract.painting import PaintingRule
from dataset_card.contract.schema import arrow_schema
from labeling.inputs.input_list import InputError, Inputs
from labeling.inputs.kinds import list_inputs
from labeling.inputs.sample import draw_sample
from labeling.labelers.model_choice import TINY_RANDOM_WARNING, ModelChoice
from labeling.pipeline import cluster, commits, dataflow, failures, manifest, plan, writer
from labeling.pipeline import finish as summary
from labeling.pipeline.config import LabelingConfig, model_choice, painting_rule
from labeling.pipeline.postprocess import PostprocessConfig, staged_schema

# Output bytes per image, for the free-space check (estimates from ImageNet-sized photos: the
# JPEG ~110 KB plus the two label maps (zstd-compressed .npy) and the RLEs ~40 KB; labels only ~40 KB).
BYTES_PER_IMAGE = {"inline": 150_000, "reference": 40_000}


@dataclass
class _Progress:
    bar: object
    first_read: list[float]
    driver_bytes: int = 0


def _drive(ds: ray.data.Dataset, tracker: commits.ShardTracker, queue: commits.Commits, progress: _Progress,
           lease: Lease | None) -> None:
    """Feed the write stage's results to the tracker, committing shards as they complete."""
    for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
        progress.driver_bytes += batch.nbytes
        problems = [e for e in batch.column("error").to_pylist() if e]
        if problems:
            raise shards.OutputWriteError(problems[0])
        started = [t for t in batch.column("started_at").to_pylist() if t]
        if started:
            progress.first_read.append(min(started))
        for shard in tracker.add(batch):
            queue.submit(shard, *tracker.take(shard))
        progress.bar.update(int(pc.sum(pc.list_value_length(batch.column("indices"))).as_py() or 0))
        if queue.poll():
            progress.bar.set_postfix_str(f"shards {len(queue.results)}")
        if lease is not None and lease.lost:
            raise writer.LeaseLost(f"stopped: {lease.lost}; what this run committed is kept")


def _label(work_plan: plan.Plan, listed: Inputs, cfg: LabelingConfig, choice: ModelChoice, post: PostprocessConfig,
           schema: pa.Schema, queue: commits.Commits, folder: OutputFolder, run_id: str, lease: Lease | None,
           log, layout_: cluster.Layout) -> _Progress:
    """Label the plan's inputs and commit its shards; returns what the driver saw."""
    indices = work_plan.indices()
    shard_of = np.full(len(listed), -1, np.int64)  # 8 bytes an input, not a dict entry
    for s, state in work_plan.work.items():
        shard_of[np.asarray(state.todo, np.int64)] = s
    tracker = commits.ShardTracker(len(listed), {s: w.todo for s, w in work_plan.work.items() if w.todo})
    for s, state in sorted(work_plan.work.items()):
        if not state.todo:  # nothing to label: rewrite from what it holds (or commit it empty)
            queue.submit(s, [], [])
    progress = _Progress(tqdm(total=len(indices), unit="img", desc="labeling", disable=not cfg.progress,
                              file=sys.stderr, mininterval=1.0 if sys.stderr.isatty() else 30.0), [])
    if not indices:
        queue.poll(wait=True)
        return progress
    block_rows = max(1, min(256, math.ceil(len(indices) / 64)))
    dataflow.configure_ray_data(dataflow.errored_blocks(cfg.max_failure_rate, math.ceil(len(indices) / block_rows)))
    with progress.bar, warnings.catch_warnings(), cluster.filtered_stderr():
        for message in dataflow.QUIET_WARNINGS:
            warnings.filterwarnings("ignore", message=message)
        work = dataflow.work_table(listed, indices, shard_of)
        _drive(dataflow.parts_dataset(work, listed, cfg, choice, post, schema, block_rows, folder, run_id, layout_),
               tracker, queue, progress, lease)
        missing = sorted(int(i) for owed in tracker.missing().values() for i in owed)
        if missing:  # blocks Ray gave up on: each input once more, alone
            log(f"{len(missing)} inputs came back from no worker; labeling them again one at a time")
            alone = dataclasses.replace(cfg, read_batch_size=1, model_batch_size=1, postprocess_batch_size=1)
            work = dataflow.work_table(listed, missing, shard_of)
            _drive(dataflow.parts_dataset(work, listed, alone, choice, post, schema, 1, folder, run_id, layout_),
                   tracker, queue, progress, lease)
        for s, owed in tracker.missing().items():
            if owed.size:  # still nothing: recorded, so the shard commits and the run ends
                lost = writer.lost_rows(dataflow.work_table(listed, owed.tolist(), shard_of), schema)
                parts, todo = tracker.take(s)
                queue.submit(s, parts, todo, lost)
        queue.poll(wait=True)
        progress.bar.set_postfix_str(f"shards {len(queue.results)}")
    return progress


def _check_storage(cfg: LabelingConfig, listed: Inputs) -> None:
    if cfg.image_storage not in layout.IMAGE_STORAGES:
        raise InputError(f"--image-storage {cfg.image_storage!r} is not one of {', '.join(layout.IMAGE_STORAGES)}")
    if cfg.image_storage == "reference" and type(listed.source).__name__ != "FolderSource":
        raise InputError("--image-storage reference needs an image folder input (an ImageFolder tree or "
                         "--file-list): a table's images have no file of their own to refer to; use inline")


def _check_space(free: int | None, cfg: LabelingConfig, num_inputs: int, log) -> None:
    if free is None:
        return
    need = num_inputs * BYTES_PER_IMAGE[cfg.image_storage]
    shard = min(cfg.shard_size, num_inputs) * BYTES_PER_IMAGE[cfg.image_storage] * 3  # parts + the shard + slack
    gb = 2**30
    if free < shard:
        raise shards.OutputWriteError(f"{cfg.output} has {free / gb:.2f} GB free, less than one shard needs (about "
                                      f"{shard / gb:.2f} GB): free space there or choose another --output")
    if free < need:
        log(f"warning: {cfg.output} has {free / gb:.1f} GB free; this run may write about {need / gb:.1f} GB "
            "(an estimate from ImageNet-sized photos)")


def run_labeling(cfg: LabelingConfig, log=print, choice: ModelChoice | None = None) -> dict:
    """Label `cfg.input` into `cfg.output` (resuming a compatible earlier run); returns stats.json.

    `choice` replaces the models `cfg.models` names (benchmarks pass a model-free one).
    """
    start, wall_start = time.perf_counter(), time.time()
    if cfg.models == "tiny-random" and choice is None:
        log(TINY_RANDOM_WARNING)
    # Inputs, models and the output first: a bad path, a missing checkpoint or a folder this user
    # cannot write fails before Ray starts.
    listing_start = time.perf_counter()
    listed = list_inputs(cfg.input, cfg.input_format, cfg.file_list, cfg.image_column, cfg.label_column,
                         cfg.split, cfg.listing_workers, cfg.progress)
    listing_s = time.perf_counter() - listing_start
    for note in listed.notes:
        log(f"warning: {note}")
    if cfg.limit is not None and cfg.sample is not None:
        raise InputError("--limit and --sample both pick the inputs: pass one of them (--sample for a trial that "
                         "can grow into the full run)")
    if cfg.limit is not None:
        listed = listed.head(cfg.limit)
    if cfg.sample is not None:
        listed = draw_sample(listed, cfg.sample, cfg.sample_seed)
    _check_storage(cfg, listed)
    rule = painting_rule(cfg)
    folder = OutputFolder.open(cfg.output, retry_s=cfg.storage_retry_s)  # the one opening of the output in this run
    _check_space(shards.probe_output(folder), cfg, len(listed), log)
    # A hub model at one commit for every actor: on resume, the commit the folder's first run resolved.
    recorded = None if cfg.overwrite else (manifest.read(folder) or {}).get("models")
    choice = (choice or model_choice(cfg)).pinned(recorded)
    local_choice = choice.materialize()  # tiny twins built once here; actors build their own
    models = local_choice.describe()
    semantic_classes = local_choice.semantic_classes()
    run_id = new_run_id()
    lease = Lease(folder, run_id, ttl_s=ttl_for(folder.retry_s), log=log).take()
    try:
        return _run(cfg, folder, listed, rule, choice, models, semantic_classes, run_id, lease, log, start,
                    wall_start, listing_s)
    finally:
        lease.release()


def _run(cfg: LabelingConfig, folder: OutputFolder, listed: Inputs, rule: PaintingRule, choice: ModelChoice,
         models: dict, semantic_classes, run_id: str, lease: Lease, log, start: float, wall_start: float,
         listing_s: float) -> dict:
    metadata = layout.DatasetMetadata(listed.class_names, semantic_classes,
                                      semantic_source=models["semantic"]["checkpoint"], painting=rule)
    new_manifest = manifest.build(len(listed), listed.sha256(), cfg.shard_size, cfg.arguments(), models,
                                  cfg.execution(), listed.class_names, planned_inputs=listed.planned)
    resumed, used = manifest.prepare(folder, new_manifest, cfg.overwrite, cfg.strict_environment, log)
    labels_hash = manifest.labels_hash(used)
    folder.delete_dir_quietly(layout.PARTS_DIR)  # rows a killed run left uncommitted
    recovered = shards.recover(folder)
    folder.write_bytes(layout.METADATA_FILE, metadata.to_json().encode())
    work_plan = plan.make_plan(folder, listed, used["num_shards"], labels_hash, cfg.retry_errors, cfg.no_repair)
    retried = sum(len(w.todo) for w in work_plan.work.values() if not w.reason and w.reuse)
    sampled = f" (a sample of {listed.planned}, seed {cfg.sample_seed})" if listed.sampled_from is not None else ""
    log(f"{len(listed)} inputs{sampled} in {len(listed.class_names)} classes -> {work_plan.num_shards} shards of "
        f"about {cfg.shard_size}" + (f"; resuming: {len(work_plan.committed)} shards already committed" if resumed else "")
        + (f"; finished {recovered} interrupted shard rewrites" if recovered else "")
        + (f"; retrying {retried} failed inputs" if retried else ""))
    for s, state in sorted(work_plan.work.items()):
        if state.reason:
            action = "relabeling it" if not state.reuse else f"labeling {len(state.todo)} of its inputs again"
            log(f"{layout.data_path(s, work_plan.num_shards)}: {state.reason}; {action}")

    storage = cfg.image_storage
    contract = arrow_schema(metadata.class_names, metadata.semantic_class_names, rule.to_dict(), image_reference=True,
                            image_bytes=storage == "inline")
    schema = staged_schema(metadata.class_names, metadata.semantic_class_names, rule.to_dict())
    post = PostprocessConfig(len(semantic_classes), metadata.ignore_value, cfg.min_instance_area,
                             tuple(sorted(metadata.thing_ids)), rule, storage)
    check = summary.InstanceCountCheck(enabled=cfg.models == "default")
    inputs_of = {s.index: s for s in work_plan.shards}
    columns = listed.table.select(["path", "image_id", "label"])
    footer = {"run_id": run_id, "manifest_sha256": labels_hash, "image_storage": storage}

    def make_job(shard: int, parts, todo, lost=None) -> writer.CommitJob:
        mine = inputs_of[shard]
        inputs = columns.take(pa.array(mine.indices, pa.int64())).append_column(
            "index", pa.array(mine.indices, pa.int64()))
        return writer.CommitJob(folder, shard, work_plan.num_shards, inputs, mine.digest, tuple(parts),
                                tuple(int(i) for i in todo), contract, footer, tuple(sorted(metadata.thing_ids)),
                                reuse=work_plan.work[shard].reuse, lost=lost)

    needs_ray = bool(work_plan.work)
    resources = None
    if needs_ray:
        cluster.connect(cfg.address, cfg.num_cpus, cfg.object_store_memory)
        cluster.check_shared(cfg.input, "--input", probe_write=False)
        cluster.check_shared(cfg.output, "--output", probe_write=True)
        resources = dataflow.resource_layout(cfg, log)  # refuses a layout whose actors cannot all start
        if work_plan.indices():
            log(resources.describe())
    cpus = int(ray.cluster_resources().get("CPU", 1)) if needs_ray else 1
    queue = commits.Commits(make_job, resources.task_cpus if resources else 1.0,
                            failures.FailureWindow(cfg.max_failure_rate, cfg.failure_window), check.add,
                            max_in_flight=max(2, cpus // 4))
    try:
        progress = _label(work_plan, listed, cfg, choice, post, schema, queue, folder, run_id, lease, log,
                          resources) if needs_ray else None
    except BaseException as err:
        queue.drain()  # what is committing finishes; nothing else starts
        folder.delete_dir_quietly(layout.PARTS_DIR)
        no_device = cluster.actor_start_failure(err)  # a model actor without the GPU it was given
        if no_device:
            raise cluster.ClusterError(no_device) from None
        raise
    folder.delete_dir_quietly(layout.PARTS_DIR)
    check.judge(final=True)

    committed = shards.committed_shards(folder, work_plan.num_shards)
    total = summary.folder_stats(folder, committed, work_plan.num_shards)
    per_actor = resources.gpus_per_actor if resources and work_plan.indices() else 0.0
    actor_s = cluster.model_actor_seconds(since_s=wall_start) if per_actor else 0.0  # billed GPU time: the actors' lifetimes
    wall = time.perf_counter() - start
    # Start-up: listing, model checks, Ray and model actors; labeling: from the first read to the end.
    first_read = progress.first_read if progress else []
    startup = min(first_read) - wall_start if first_read else wall
    driver_bytes = (progress.driver_bytes if progress else 0) + queue.bytes_received
    stats = summary.run_stats(total, len(listed), queue.results, wall, 0.0, per_actor,
                              summary.read_previous(folder), startup_s=startup,
                              failed_by_type=summary.failures_in(folder, committed, work_plan.num_shards),
                              driver_bytes=driver_bytes, listing_s=listing_s, actor_lifetime_s=actor_s)
    stats["driver_restarts"] = cfg.driver_restarts
    stats["coverage"] = summary.coverage_stats(total)
    summary.write(folder, stats)
    summary.write_card(folder, metadata, has_errors=stats["failed"] > 0, log=log, options=cfg.card,
                       tiny_random=cfg.models == "tiny-random", image_bytes=cfg.image_storage == "inline")
    summary.verify_folder(folder)
    log(summary.coverage_line(stats["coverage"]))
    warning = summary.few_regions_warning(stats["coverage"]) if cfg.models == "default" else None
    if warning:
        log(warning)
    log(summary.closing_line(stats, cfg.output))
    return stats

"""The labeling run: list inputs, take the output's lease, plan shards, run the Ray pipeline whose
workers write, commit shards as they complete, verify the folder, close.

    input list ──► read + header check (CPU tasks) ──► ModelPredictor: decode, SAM + semantic (actors, GPU)
        ──► upsample + align + paint + encode maps (CPU tasks) ──► write parts (CPU tasks, `writer.write_parts`)
        ──► driver: part results (shard, part, indices) ──► commit tasks (`writer.commit`)

The driver never sees a labeled row: the write stage leaves rows in per-shard part files and
returns tens of bytes per image; a shard's commit runs as a Ray task once every input it owes
has arrived (`commits`). Shards are hash buckets of image ids (`plan`), checked before a rerun
trusts them. Inputs whose rows never come back (a block Ray gave up on) get one more pass alone,
then are recorded as failures: every input ends up exactly once, in the data or the errors table.
Before its closing line the run checks the folder as `python -m dataset_card validate` does.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import sys
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import ray
from tqdm.auto import tqdm

from dataset_card.card.source import CardOptions
from dataset_card.contract import layout, shards
from dataset_card.contract.lease import Lease, new_run_id, ttl_for
from dataset_card.contract.output_folder import OutputFolder
from dataset_card.contract.painting import DEFAULT_RULE, PaintingRule, rule_named
from dataset_card.contract.schema import arrow_schema
from labeling.inputs.input_list import InputError, Inputs
from labeling.inputs.kinds import list_inputs
from labeling.inputs.sample import draw_sample
from labeling.labelers.model_choice import TINY_RANDOM_WARNING, ModelChoice
from labeling.pipeline import cluster, commits, failures, manifest, plan, writer
from labeling.pipeline import finish as summary
from labeling.pipeline.postprocess import PostprocessConfig, postprocess_stage, staged_schema
from labeling.pipeline.predictors import ModelPredictor
from labeling.pipeline.preprocess import WORK_SCHEMA, read_stage

# Stop when more than this share of the most recent images failed (--max-failure-rate): ImageNet
# has a handful of odd files in 1.28M, so a tenth failing is a systematic fault, not bad luck.
DEFAULT_MAX_FAILURE_RATE = 0.1
# Output bytes per image, for the free-space check (estimates from ImageNet-sized photos: the
# JPEG ~110 KB plus the two label maps (zstd-compressed .npy) and the RLEs ~40 KB; labels only ~40 KB).
BYTES_PER_IMAGE = {"inline": 150_000, "reference": 40_000}


def label_shaping(default):
    """A `LabelingConfig` field that shapes the labels: recorded in the manifest's "arguments",
    compared on resume and part of every shard's footer hash (`manifest.labels_hash`). Any other
    field may change between a run and its resume."""
    return field(default=default, metadata={"labels": True})


@dataclass(frozen=True)
class LabelingConfig:
    """One labeling run. Fields made with `label_shaping` shape the output and are compared on resume;
    the models are compared by identity (`ModelChoice.describe`), not by the arguments that name them."""

    input: str
    output: str
    models: str = label_shaping("default")
    shard_size: int = label_shaping(1000)
    limit: int | None = None  # picks inputs; shards are keyed by image id, so it may change
    # --sample N: a class-stratified sample (labeling.inputs.sample) in shards planned for every input,
    # so a larger sample or the full run resumes the folder and labels only what is new.
    sample: int | None = None
    sample_seed: int = 0
    max_pixels: int = label_shaping(100_000_000)
    # What a row is: its image and its label.
    input_format: str = label_shaping("auto")
    file_list: str | None = None
    image_column: str = label_shaping("image")
    label_column: str = label_shaping("label")
    split: str = label_shaping("train")
    # The models, compared by what they are: SAM's weights by sha256, the semantic model by repo and
    # commit (resolved once, then reused on every resume) or a local folder's content hash.
    sam_type: str | None = None
    sam_checkpoint: str | None = None
    semantic_model: str | None = None
    semantic_revision: str | None = None
    staged_models: str | None = None  # a folder from `python -m labeling.stage_models`: actors load from it
    semantic_shortest_edge: int | None = label_shaping(None)
    model_max_side: int | None = label_shaping(None)
    points_per_side: int | None = label_shaping(None)
    pred_iou_thresh: float | None = label_shaping(None)
    stability_score_thresh: float | None = label_shaping(None)
    compile: bool | None = label_shaping(None)  # torch.compile SAM; None: on a GPU (float rounding may differ)
    min_instance_area: int = label_shaping(16)
    painting_rule: str = label_shaping(DEFAULT_RULE)
    min_purity: float | None = label_shaping(None)
    image_storage: str = label_shaping("inline")  # or "reference": a labels-only release (no image bytes)
    # Execution: may change between a run and its resume (batch sizes give the same labels:
    # tests/test_label_determinism.py).
    read_batch_size: int = 16
    model_batch_size: int = 8
    # SAM's prompts per decoder call, crops per encoder call and the semantic model's images per pass
    # (None: the labelers' defaults); every call is padded to them, so they change speed and memory, and
    # labels by float rounding at most (manifest.SPEED_PARAMS: recorded, not compared).
    sam_points_per_batch: int | None = None
    sam_encoder_batch_size: int | None = None
    semantic_batch_size: int | None = None  # images per semantic forward pass (bucket fillers included)
    postprocess_batch_size: int = 8
    device: str = "auto"  # model actors on "cuda", or "cpu" when asked (auto: CPUs only for the tiny twins)
    wait_for_gpus: float | None = None  # seconds to wait for a first GPU (None: 30 min with an autoscaler)
    model_actors: int | None = None  # a fixed pool; None: see cluster.plan_layout
    min_model_actors: int | None = None
    max_model_actors: int | None = None  # None: as many as the cluster fits, as it grows
    gpus_per_actor: float | None = None
    actor_cpus: float | None = None
    task_cpus: float | None = None
    listing_workers: int = 32
    address: str | None = None  # Ray cluster to join (default: $RAY_ADDRESS, else a local Ray)
    num_cpus: int | None = None  # of a local Ray
    object_store_memory: int | None = None  # of a local Ray
    overwrite: bool = False
    strict_environment: bool = False  # refuse, instead of warning, to resume under another environment
    retry_errors: bool = False
    no_repair: bool = False  # refuse, instead of repairing, committed shards that fail verification
    max_failure_rate: float = DEFAULT_MAX_FAILURE_RATE
    storage_retry_s: float = shards.RETRY_S  # writes retry a transient error this long (a storage outage)
    failure_window: int = 2000  # images of the most recent committed shards the rate is judged over
    driver_restarts: int = 0  # restarts of the driver before this one (`labeling/run.py --max-restarts`)
    progress: bool = True
    # What the dataset card says of the images (name, licence, source): OUTPUT/card.json keeps it.
    card: CardOptions = CardOptions()

    def arguments(self) -> dict:
        """What shapes the labels (manifest "arguments"): the `label_shaping` fields. Where inputs and
        output live is not in it: a moved dataset resumes, and each shard's footer pins its inputs."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.metadata.get("labels")}

    def execution(self) -> dict:
        """Everything else but the card (manifest "execution", recorded only)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                if not f.metadata.get("labels") and f.name != "card"}


# What `--models` implies where the user did not say: real models at SAM's size, twins at theirs.
PRESET_DEFAULTS = {
    # SA-1B's own mask filters (Kirillov et al. 2023): holes and islands under 100 px are cleaned,
    # and masks covering 95% of the image or more (the image itself, not an object) are dropped.
    "default": {"model_max_side": 1024, "instance": {"min_mask_region_area": 100, "max_mask_fraction": 0.95},
                "semantic": {}},
    # The twins' random scores are low: keep what their structure gives (tens of masks per image);
    # their images are small (256 px), so is their semantic input.
    "tiny-random": {"model_max_side": 256,
                    "instance": {"points_per_side": 8, "pred_iou_thresh": 0.65, "stability_score_thresh": 0.8},
                    "semantic": {"shortest_edge": 128}},
}


def model_choice(cfg: LabelingConfig) -> ModelChoice:
    preset = PRESET_DEFAULTS[cfg.models]
    instance = dict(preset["instance"])
    for name in ("points_per_side", "pred_iou_thresh", "stability_score_thresh"):
        if getattr(cfg, name) is not None:
            instance[name] = getattr(cfg, name)
    if cfg.compile is not None:
        instance["compile"] = cfg.compile
    for name in ("points_per_batch", "encoder_batch_size"):
        if getattr(cfg, f"sam_{name}") is not None:
            instance[name] = getattr(cfg, f"sam_{name}")
    semantic = dict(preset["semantic"])
    if cfg.semantic_shortest_edge is not None:
        semantic["shortest_edge"] = cfg.semantic_shortest_edge
    if cfg.semantic_batch_size is not None:
        semantic["batch_size"] = cfg.semantic_batch_size
    base = ModelChoice(preset=cfg.models)
    return dataclasses.replace(
        base,
        sam_type=cfg.sam_type or base.sam_type,
        sam_checkpoint=cfg.sam_checkpoint,
        semantic_model=cfg.semantic_model or base.semantic_model,
        semantic_revision=cfg.semantic_revision,
        staged=cfg.staged_models,
        instance_params=instance,
        semantic_params=semantic,
    )


def painting_rule(cfg: LabelingConfig) -> PaintingRule:
    try:
        return rule_named(cfg.painting_rule, min_purity=cfg.min_purity)
    except ValueError as err:
        raise InputError(f"{err}") from err


def model_max_side(cfg: LabelingConfig) -> int:
    return cfg.model_max_side or PRESET_DEFAULTS[cfg.models]["model_max_side"]




def work_table(listed: Inputs, indices: Sequence[int], shard_of: np.ndarray) -> pa.Table:
    """WORK_SCHEMA rows for `indices` (listing failures already marked with stage "list");
    `shard_of[i]` is input i's shard."""
    rows = listed.table.take(pa.array(indices, pa.int64()))
    index = pa.array(indices, pa.int64())
    listed_failure = pc.not_equal(rows.column("error_type"), "")
    stage = pc.if_else(listed_failure, failures.LIST, "")
    return pa.table({
        "index": index,
        "shard": pa.array(shard_of[np.asarray(indices, np.int64)], pa.int64()),
        "path": rows.column("path"),
        "image_id": rows.column("image_id"),
        "label": rows.column("label"),
        "image_path": rows.column("image_path"),
        "error_stage": stage,
        "error_type": rows.column("error_type"),
        "error_message": rows.column("error_message"),
    }).cast(WORK_SCHEMA)


def resource_layout(cfg: LabelingConfig, log=print) -> cluster.Layout:
    """The model actors' device and pool on the joined cluster (waiting for a first GPU where it can come)."""
    return cluster.plan_actors(cfg.device, cfg.models == "tiny-random", cfg.wait_for_gpus, log,
                               gpus_per_actor=cfg.gpus_per_actor, model_actors=cfg.model_actors,
                               actor_cpus=cfg.actor_cpus, task_cpus=cfg.task_cpus,
                               min_actors=cfg.min_model_actors, max_actors=cfg.max_model_actors)


def build_dataset(work: pa.Table, listed: Inputs, cfg: LabelingConfig, choice: ModelChoice,
                  post: PostprocessConfig, schema: pa.Schema, block_rows: int,
                  layout_: cluster.Layout) -> ray.data.Dataset:
    """The lazy Ray Data pipeline over `work` (WORK_SCHEMA rows), yielding `schema` batches."""
    blocks = [work.slice(i, block_rows) for i in range(0, work.num_rows, block_rows)]
    with warnings.catch_warnings():
        # Bounded retries go through `ray_remote_args`, deprecated in Ray 2.60 with no replacement yet.
        warnings.filterwarnings("ignore", message=".*ray_remote_args.* is deprecated")
        return _stages(ray.data.from_arrow(blocks), listed, cfg, choice, post, schema, layout_)


def _stages(ds, listed, cfg, choice, post, schema, plan: cluster.Layout) -> ray.data.Dataset:
    retries, actor_retries = failures.TASK_RETRIES, failures.ACTOR_RETRIES  # the failure policy's
    ds = ds.map_batches(read_stage, batch_size=cfg.read_batch_size, batch_format="pyarrow", num_cpus=plan.task_cpus,
                        fn_kwargs={"source": listed.source, "max_pixels": cfg.max_pixels}, **retries)
    # One pool of actors that each hold both models (no GPU waits for another's model); it grows onto
    # nodes that join (`Layout.pool`). The first actors have loaded their models before an image is read.
    model_args = {"choice": choice, "device": plan.device, "threads": plan.threads,
                  "max_side": model_max_side(cfg), "max_pixels": cfg.max_pixels}
    ds = ds.map_batches(ModelPredictor, batch_size=cfg.model_batch_size, batch_format="pyarrow",
                        fn_constructor_kwargs=model_args,
                        compute=plan.pool(),
                        num_gpus=plan.gpus_per_actor, num_cpus=plan.actor_cpus, **actor_retries)
    return ds.map_batches(postprocess_stage, batch_size=cfg.postprocess_batch_size, batch_format="pyarrow",
                          num_cpus=plan.task_cpus, fn_kwargs={"cfg": post, "schema": schema}, **retries)


# Model actors must start within this time (a cluster without the GPUs asked for fails clearly
# instead of waiting forever); no image is read before they are ready.
ACTOR_START_TIMEOUT_S = 1800
# Ray Data messages that ask nothing of the user (we turn its bars off on purpose; small inputs
# leave some actors of a fixed pool idle).
_QUIET_LOGGERS = ("ray.data._internal.progress",)
_QUIET_WARNINGS = ("The minimum number of concurrent actors",)


def _configure_ray_data(max_errored_blocks: int) -> None:
    ctx = ray.data.DataContext.get_current()
    ctx.wait_for_min_actors_s = ACTOR_START_TIMEOUT_S
    # A block Ray gives up on is labeled again alone, then recorded; more than the failure rate's
    # share of blocks stops the run (a systematic crash, not bad luck).
    ctx.max_errored_blocks = max_errored_blocks
    ctx.enable_progress_bars = False  # the driver shows one bar in images, and shard commits
    ctx.print_on_execution_start = False
    for name in _QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)


def _errored_blocks(rate: float, num_blocks: int) -> int:
    return -1 if rate >= 1 else max(1, int(rate * num_blocks))


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


def _pipeline(work: pa.Table, listed: Inputs, cfg: LabelingConfig, choice: ModelChoice, post: PostprocessConfig,
              schema: pa.Schema, block_rows: int, folder: OutputFolder, run_id: str,
              layout_: cluster.Layout) -> ray.data.Dataset:
    ds = build_dataset(work, listed, cfg, choice, post, schema, block_rows, layout_)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*ray_remote_args.* is deprecated")
        return ds.map_batches(writer.write_parts, batch_size=None, batch_format="pyarrow",
                              num_cpus=layout_.task_cpus,
                              fn_kwargs={"folder": folder, "run_id": run_id}, **failures.TASK_RETRIES)


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
    _configure_ray_data(_errored_blocks(cfg.max_failure_rate, math.ceil(len(indices) / block_rows)))
    with progress.bar, warnings.catch_warnings(), cluster.filtered_stderr():
        for message in _QUIET_WARNINGS:
            warnings.filterwarnings("ignore", message=message)
        work = work_table(listed, indices, shard_of)
        _drive(_pipeline(work, listed, cfg, choice, post, schema, block_rows, folder, run_id, layout_),
               tracker, queue, progress, lease)
        missing = sorted(int(i) for owed in tracker.missing().values() for i in owed)
        if missing:  # blocks Ray gave up on: each input once more, alone
            log(f"{len(missing)} inputs came back from no worker; labeling them again one at a time")
            alone = dataclasses.replace(cfg, read_batch_size=1, model_batch_size=1, postprocess_batch_size=1)
            work = work_table(listed, missing, shard_of)
            _drive(_pipeline(work, listed, alone, choice, post, schema, 1, folder, run_id, layout_),
                   tracker, queue, progress, lease)
        for s, owed in tracker.missing().items():
            if owed.size:  # still nothing: recorded, so the shard commits and the run ends
                lost = writer.lost_rows(work_table(listed, owed.tolist(), shard_of), schema)
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
        resources = resource_layout(cfg, log)  # refuses a layout whose actors cannot all start
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

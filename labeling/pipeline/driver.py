"""The labeling pipeline: an input list -> Ray Data stages -> committed shards.

    input paths ──► read + header check (CPU tasks) ──► ModelPredictor: decode, SAM + semantic (actors, GPU)
        ──► upsample + align + paint + PNG (CPU tasks)
        ──► driver: rows collected per shard ──► commit (errors, stats, data file)

Shards, not Ray blocks, are the unit of work and of commit: the sorted inputs are cut into fixed
shards of `shard_size`; only inputs of uncommitted shards (and, with `--retry-errors`, the failed
inputs of committed ones) enter the pipeline; the driver gathers post-processed rows per shard by
input index and commits a shard once all of its inputs are there, while later images are still
being labeled. Inputs whose rows never come back (a block Ray gave up on, e.g. after a worker
crash) get one more pass alone, then are recorded as failures: every input ends up exactly once,
in the data or in the errors table.
"""

from __future__ import annotations

import dataclasses
import math
import posixpath
import sys
import time
import warnings
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.compute as pc
import ray
from tqdm.auto import tqdm

from dataset_card import layout, shards
from dataset_card.card import minimal_card
from dataset_card.painting import DEFAULT_RULE, PaintingRule, rule_named
from dataset_card.schema import arrow_schema
from labeling.inputs.input_list import InputError, Inputs
from labeling.inputs.kinds import list_inputs
from labeling.labelers.model_choice import TINY_RANDOM_WARNING, ModelChoice
from labeling.pipeline import cluster, failures, manifest, summary, writer
from labeling.pipeline.postprocess import PostprocessConfig, postprocess_stage, staged_schema
from labeling.pipeline.predictors import ModelPredictor
from labeling.pipeline.preprocess import WORK_SCHEMA, read_stage


@dataclass(frozen=True)
class LabelingConfig:
    """One labeling run. Fields above `read_batch_size` shape the output and are compared on resume."""

    input: str
    output: str
    models: str = "default"
    shard_size: int = 1000
    limit: int | None = None
    max_pixels: int = 100_000_000
    input_format: str = "auto"
    file_list: str | None = None
    image_column: str = "image"
    label_column: str = "label"
    split: str = "train"
    sam_type: str | None = None
    sam_checkpoint: str | None = None
    semantic_model: str | None = None
    semantic_revision: str | None = None
    semantic_shortest_edge: int | None = None
    model_max_side: int | None = None
    points_per_side: int | None = None
    pred_iou_thresh: float | None = None
    stability_score_thresh: float | None = None
    min_instance_area: int = 16
    painting_rule: str = DEFAULT_RULE
    min_purity: float | None = None
    # Execution only: may change between a run and its resume.
    read_batch_size: int = 16
    model_batch_size: int = 8
    postprocess_batch_size: int = 8
    instance_actors: int | None = None  # None: see cluster.plan_layout
    semantic_actors: int | None = None
    gpus_per_actor: float | None = None
    actor_cpus: float | None = None
    task_cpus: float | None = None
    listing_workers: int = 32
    address: str | None = None  # Ray cluster to join (default: $RAY_ADDRESS, else a local Ray)
    num_cpus: int | None = None  # of a local Ray
    object_store_memory: int | None = None  # of a local Ray
    overwrite: bool = False
    retry_errors: bool = False
    progress: bool = True

    def arguments(self) -> dict:
        """What shapes the output (manifest "arguments"). Where inputs and output live is not in it:
        a moved dataset resumes, and `inputs_hash` pins what the inputs are."""
        names = [f.name for f in dataclasses.fields(self)]
        return {n: getattr(self, n) for n in names[: names.index("read_batch_size")] if n not in _LOCATIONS}

    def execution(self) -> dict:
        names = [f.name for f in dataclasses.fields(self)]
        return {n: getattr(self, n) for n in names[names.index("read_batch_size"):] + list(_LOCATIONS)}


_LOCATIONS = ("input", "output", "file_list")


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
    semantic = dict(preset["semantic"])
    if cfg.semantic_shortest_edge is not None:
        semantic["shortest_edge"] = cfg.semantic_shortest_edge
    base = ModelChoice(preset=cfg.models)
    return dataclasses.replace(
        base,
        sam_type=cfg.sam_type or base.sam_type,
        sam_checkpoint=cfg.sam_checkpoint,
        semantic_model=cfg.semantic_model or base.semantic_model,
        semantic_revision=cfg.semantic_revision,
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


@dataclass
class Plan:
    num_inputs: int
    shard_size: int
    num_shards: int
    committed: set[int]
    new: dict[int, list[int]] = field(default_factory=dict)  # shard -> all its inputs
    retry: dict[int, list[int]] = field(default_factory=dict)  # committed shard -> its failed inputs

    def bounds(self, shard: int) -> tuple[int, int]:
        return shard * self.shard_size, min(self.num_inputs, (shard + 1) * self.shard_size)

    def indices(self) -> list[int]:
        return sorted(i for part in (self.new, self.retry) for indices in part.values() for i in indices)


def plan_work(fs, root: str, listed: Inputs, shard_size: int, retry_errors: bool) -> Plan:
    """Which inputs this run labels: all of each uncommitted shard, plus failed ones to retry."""
    n = len(listed)
    num_shards = manifest.num_shards(n, shard_size)
    committed = shards.committed_shards(fs, root, num_shards)
    plan = Plan(n, shard_size, num_shards, committed)
    for shard in range(num_shards):
        if shard not in committed:
            plan.new[shard] = list(range(*plan.bounds(shard)))
    if retry_errors and committed:
        index_of = {p: i for i, p in enumerate(listed.table.column("path").to_pylist())}
        for shard in sorted(committed):
            failed = writer.read_errors(fs, root, shard, num_shards).column("path").to_pylist()
            if failed:
                plan.retry[shard] = sorted(index_of[p] for p in failed)
    return plan


def work_table(listed: Inputs, indices: list[int], shard_size: int) -> pa.Table:
    """WORK_SCHEMA rows for `indices` (listing failures already marked with stage "list")."""
    rows = listed.table.take(pa.array(indices, pa.int64()))
    index = pa.array(indices, pa.int64())
    listed_failure = pc.not_equal(rows.column("error_type"), "")
    stage = pc.if_else(listed_failure, failures.LIST, "")
    return pa.table({
        "index": index,
        "shard": pa.array([i // shard_size for i in indices], pa.int64()),
        "path": rows.column("path"),
        "image_id": rows.column("image_id"),
        "label": rows.column("label"),
        "image_path": rows.column("image_path"),
        "error_stage": stage,
        "error_type": rows.column("error_type"),
        "error_message": rows.column("error_message"),
    }).cast(WORK_SCHEMA)


def resource_layout(cfg: LabelingConfig) -> cluster.Layout:
    return cluster.current_layout(gpus_per_actor=cfg.gpus_per_actor, instance_actors=cfg.instance_actors,
                                  semantic_actors=cfg.semantic_actors, actor_cpus=cfg.actor_cpus,
                                  task_cpus=cfg.task_cpus)


def build_dataset(work: pa.Table, listed: Inputs, cfg: LabelingConfig, choice: ModelChoice,
                  post: PostprocessConfig, schema: pa.Schema, block_rows: int) -> ray.data.Dataset:
    """The lazy Ray Data pipeline over `work` (WORK_SCHEMA rows), yielding `schema` batches."""
    blocks = [work.slice(i, block_rows) for i in range(0, work.num_rows, block_rows)]
    with warnings.catch_warnings():
        # Bounded retries go through `ray_remote_args`, deprecated in Ray 2.60 with no replacement yet.
        warnings.filterwarnings("ignore", message=".*ray_remote_args.* is deprecated")
        return _stages(ray.data.from_arrow(blocks), listed, cfg, choice, post, schema, resource_layout(cfg))


def _stages(ds, listed, cfg, choice, post, schema, plan: cluster.Layout) -> ray.data.Dataset:
    retries = {"max_retries": 3}  # a crash-looping input must not retry forever (Ray Data's default)
    actor_retries = {"max_restarts": -1, "max_task_retries": 3}
    ds = ds.map_batches(read_stage, batch_size=cfg.read_batch_size, batch_format="pyarrow", num_cpus=plan.task_cpus,
                        fn_kwargs={"source": listed.source, "max_pixels": cfg.max_pixels}, **retries)
    # One pool of actors that each hold both models (no GPU waits for another's model); the layout's
    # two counts are its size. Fixed size: every actor has loaded its models before an image is read.
    model_args = {"choice": choice, "num_gpus": plan.gpus_per_actor, "threads": plan.threads,
                  "max_side": model_max_side(cfg), "max_pixels": cfg.max_pixels}
    ds = ds.map_batches(ModelPredictor, batch_size=cfg.model_batch_size, batch_format="pyarrow",
                        fn_constructor_kwargs=model_args,
                        compute=ray.data.ActorPoolStrategy(size=plan.instance_actors + plan.semantic_actors),
                        num_gpus=plan.gpus_per_actor, num_cpus=plan.actor_cpus, **actor_retries)
    return ds.map_batches(postprocess_stage, batch_size=cfg.postprocess_batch_size, batch_format="pyarrow",
                          num_cpus=plan.task_cpus, fn_kwargs={"cfg": post, "schema": schema}, **retries)


def lost_rows(work: pa.Table, schema: pa.Schema) -> pa.Table:
    """Staged failure rows for inputs whose results never came back, even when labeled alone."""
    failure = failures.Failure("worker", failures.WORKER_CRASH,
                               "the worker labeling this image died on every attempt, even with the image alone")
    rows = []
    for row in work.to_pylist():
        row.update(failure.as_row())
        rows.append(row)
    return pa.Table.from_pylist(rows, schema=schema)


class Committer:
    """Commits complete shards on background threads while the pipeline keeps running."""

    def __init__(self, fs, root: str, plan: Plan, contract: pa.Schema, listed: Inputs, check):
        self.fs, self.root, self.plan, self.contract, self.listed, self.check = fs, root, plan, contract, listed, check
        self.pool = ThreadPoolExecutor(2)
        self.pending: list[Future] = []
        self.results: list[writer.ShardResult] = []
        self.seconds = 0.0

    def _commit(self, shard: int, staged: pa.Table) -> writer.ShardResult:
        start = time.perf_counter()
        if shard in self.plan.retry:
            lo, hi = self.plan.bounds(shard)
            shard_inputs = self.listed.table.slice(lo, hi - lo).select(["path", "image_id"]).append_column(
                "index", pa.array(range(lo, hi), pa.int64()))
            result = writer.commit_retried(self.fs, self.root, shard, self.plan.num_shards, staged, self.contract,
                                           shard_inputs)
        else:
            result = writer.commit(self.fs, self.root, shard, self.plan.num_shards, staged, self.contract)
        self.seconds += time.perf_counter() - start
        return result

    def submit(self, shard: int, staged: pa.Table) -> None:
        self.pending.append(self.pool.submit(self._commit, shard, staged))

    def collect(self, wait: bool = False) -> list[writer.ShardResult]:
        """Results of finished commits (re-raising a failed one); all of them when `wait`."""
        done = [f for f in self.pending if wait or f.done()]
        self.pending = [f for f in self.pending if f not in done]
        new = [f.result() for f in done]
        if wait:
            self.pool.shutdown()
        self.results.extend(new)
        for result in new:
            self.check.add(result)
        return new


def _drive(ds: ray.data.Dataset, assembler: writer.ShardAssembler, committer: Committer, bar,
           first_read: list[float]) -> None:
    """Feed the pipeline's batches to the assembler, committing shards as they complete.
    `first_read` collects the wall clock of the earliest read (when labeling proper began)."""
    for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
        started = pc.min(batch.column("started_at")).as_py()
        if started:
            first_read.append(started)
        for shard in assembler.add(batch):
            committer.submit(shard, assembler.take(shard))
        bar.update(batch.num_rows)
        if committer.collect():
            bar.set_postfix_str(f"shards {len(committer.results)}")


# Model actors must start within this time (a cluster without the GPUs asked for fails clearly
# instead of waiting forever); no image is read before they are ready.
ACTOR_START_TIMEOUT_S = 1800


def _configure_ray_data() -> None:
    ctx = ray.data.DataContext.get_current()
    ctx.wait_for_min_actors_s = ACTOR_START_TIMEOUT_S
    ctx.max_errored_blocks = -1  # a block Ray gives up on is retried alone, then recorded: never fatal
    ctx.enable_progress_bars = False  # the driver shows one bar in images, and shard commits
    ctx.print_on_execution_start = False


def _label(indices: list[int], plan: Plan, listed: Inputs, cfg: LabelingConfig, choice: ModelChoice,
           post: PostprocessConfig, schema: pa.Schema, committer: Committer, log) -> list[float]:
    """Run `indices` through the pipeline and commit their shards; returns the reads' start times."""
    _configure_ray_data()
    assembler = writer.ShardAssembler({**plan.new, **plan.retry})
    first_read: list[float] = []
    bar = tqdm(total=len(indices), unit="img", desc="labeling", disable=not cfg.progress, file=sys.stderr,
               mininterval=1.0 if sys.stderr.isatty() else 30.0)
    with bar:
        block_rows = max(1, min(256, math.ceil(len(indices) / 64)))
        work = work_table(listed, indices, cfg.shard_size)
        _drive(build_dataset(work, listed, cfg, choice, post, schema, block_rows), assembler, committer, bar,
               first_read)
        missing = sorted(i for owed in assembler.missing().values() for i in owed)
        if missing:  # blocks Ray gave up on: each input once more, alone
            log(f"{len(missing)} inputs came back from no worker; labeling them again one at a time")
            alone = dataclasses.replace(cfg, read_batch_size=1, model_batch_size=1, postprocess_batch_size=1)
            work = work_table(listed, missing, cfg.shard_size)
            _drive(build_dataset(work, listed, alone, choice, post, schema, 1), assembler, committer, bar,
                   first_read)
        missing = sorted(i for owed in assembler.missing().values() for i in owed)
        if missing:
            for shard in assembler.add(lost_rows(work_table(listed, missing, cfg.shard_size), schema)):
                committer.submit(shard, assembler.take(shard))
        committer.collect(wait=True)
        bar.set_postfix_str(f"shards {len(committer.results)}")
    return first_read


def run_labeling(cfg: LabelingConfig, log=print) -> dict:
    """Label `cfg.input` into `cfg.output` (resuming a compatible earlier run); returns stats.json."""
    start, wall_start = time.perf_counter(), time.time()
    if cfg.models == "tiny-random":
        log(TINY_RANDOM_WARNING)
    # Inputs and models first: a bad path or a missing checkpoint fails before Ray starts.
    listed = list_inputs(cfg.input, cfg.input_format, cfg.file_list, cfg.image_column, cfg.label_column,
                                cfg.split, cfg.listing_workers)
    if cfg.limit is not None:
        listed = listed.head(cfg.limit)
    rule = painting_rule(cfg)
    choice = model_choice(cfg).pinned()  # a hub model at one commit for every actor
    local_choice = choice.materialize()  # tiny twins built once here; actors build their own
    models = local_choice.describe()
    semantic_classes = local_choice.semantic_classes()
    cluster.connect(cfg.address, cfg.num_cpus, cfg.object_store_memory)
    cluster.check_shared(cfg.input, "--input", probe_write=False)
    cluster.check_shared(cfg.output, "--output", probe_write=True)
    resources = resource_layout(cfg)  # refuses a layout whose actors cannot all start
    metadata = layout.DatasetMetadata(listed.class_names, semantic_classes,
                                      semantic_source=models["semantic"]["checkpoint"], painting=rule)
    fs, root = shards.filesystem(cfg.output)
    new_manifest = manifest.build(len(listed), listed.sha256(), cfg.shard_size, cfg.arguments(), models,
                                  cfg.execution())
    resumed = manifest.prepare(fs, root, new_manifest, cfg.overwrite, cfg.output)
    recovered = writer.recover(fs, root)
    shards.write_bytes(fs, posixpath.join(root, layout.METADATA_FILE), metadata.to_json().encode())
    plan = plan_work(fs, root, listed, cfg.shard_size, cfg.retry_errors)
    log(f"{len(listed)} inputs in {len(listed.class_names)} classes -> {plan.num_shards} shards of {cfg.shard_size}"
        + (f"; resuming: {len(plan.committed)} shards already committed" if resumed else "")
        + (f"; finished {recovered} interrupted retry rewrites" if recovered else "")
        + (f"; retrying {sum(map(len, plan.retry.values()))} failed inputs" if plan.retry else ""))
    log(f"model actors: {resources.instance_actors + resources.semantic_actors}, each with SAM and the semantic "
        f"model, {resources.gpus_per_actor:g} GPU and {resources.actor_cpus:g} CPU each")

    contract = arrow_schema(metadata.class_names, metadata.semantic_class_names, rule.to_dict())
    schema = staged_schema(metadata.class_names, metadata.semantic_class_names, rule.to_dict())
    post = PostprocessConfig(len(semantic_classes), metadata.ignore_value, cfg.min_instance_area,
                             tuple(sorted(metadata.thing_ids)), rule)
    check = summary.InstanceCountCheck(enabled=cfg.models == "default")
    committer = Committer(fs, root, plan, contract, listed, check)
    indices = plan.indices()
    first_read = _label(indices, plan, listed, cfg, choice, post, schema, committer, log) if indices else []
    check.judge(final=True)

    committed = shards.committed_shards(fs, root, plan.num_shards)
    total = summary.folder_stats(fs, root, committed, plan.num_shards)
    per_actor = resources.gpus_per_actor if indices else 0.0
    wall = time.perf_counter() - start
    # Start-up: listing, model checks, Ray and model actors; labeling: from the first read to the end.
    startup = min(first_read) - wall_start if first_read else wall
    stats = summary.run_stats(total, len(listed), committer.results, wall, committer.seconds, per_actor,
                              summary.read_previous(fs, root), startup_s=startup)
    summary.write(fs, root, stats)
    write_card(cfg.output, root, metadata, has_errors=total.errors > 0, log=log)
    log(summary.closing_line(stats))
    return stats


def write_card(output: str, root: str, metadata: layout.DatasetMetadata, has_errors: bool, log=print) -> None:
    """The full dataset card; the minimal one if building it fails (the labels are done either way)."""
    from dataset_card.build import build_card

    try:
        build_card(output)
        return
    except Exception as err:  # the labels are done; a card failure must not hide that
        log(f"the full dataset card failed ({type(err).__name__}: {err}); writing the minimal card instead. "
            f"Rebuild it later with: python -m dataset_card build {output}")
    fs, _ = shards.filesystem(output)
    card = minimal_card(metadata, has_errors)
    shards.write_bytes(fs, posixpath.join(root, layout.CARD_FILE), str(card).encode())

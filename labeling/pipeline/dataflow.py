"""The Ray Data graph of a labeling run: one lazy dataset from the inputs to the workers' part files.

    WORK_SCHEMA rows (`work_table`) ──► read + header check (CPU tasks, `preprocess.read_stage`)
        ──► ModelPredictor: decode, SAM + semantic (actors, GPU, `predictors`)
        ──► upsample + align + paint + encode maps (CPU tasks, `postprocess.postprocess_stage`)
        ──► write parts (CPU tasks, `writer.write_parts`) ──► part results (shard, part, indices)

Every stage retries under the failure policy (`failures.TASK_RETRIES`, `ACTOR_RETRIES`); the
model actors' pool and resources come from `cluster` (`resource_layout`). The driver iterates the
part results and commits shards (`driver`).
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import ray

from dataset_card.contract.output_folder import OutputFolder
from labeling.inputs.input_list import Inputs
from labeling.labelers.model_choice import ModelChoice
from labeling.pipeline import cluster, failures, writer
from labeling.pipeline.config import LabelingConfig, model_max_side
from labeling.pipeline.postprocess import PostprocessConfig, postprocess_stage
from labeling.pipeline.predictors import ModelPredictor
from labeling.pipeline.preprocess import WORK_SCHEMA, read_stage


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


def parts_dataset(work: pa.Table, listed: Inputs, cfg: LabelingConfig, choice: ModelChoice,
                  post: PostprocessConfig, schema: pa.Schema, block_rows: int, folder: OutputFolder, run_id: str,
                  layout_: cluster.Layout) -> ray.data.Dataset:
    """`build_dataset` and the write stage: each batch the driver iterates is the part files' results
    (shard, part, indices, errors), never a labeled row."""
    ds = build_dataset(work, listed, cfg, choice, post, schema, block_rows, layout_)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*ray_remote_args.* is deprecated")
        return ds.map_batches(writer.write_parts, batch_size=None, batch_format="pyarrow",
                              num_cpus=layout_.task_cpus,
                              fn_kwargs={"folder": folder, "run_id": run_id}, **failures.TASK_RETRIES)


def resource_layout(cfg: LabelingConfig, log=print) -> cluster.Layout:
    """The model actors' device and pool on the joined cluster (waiting for a first GPU where it can come)."""
    return cluster.plan_actors(cfg.device, cfg.models == "tiny-random", cfg.wait_for_gpus, log,
                               gpus_per_actor=cfg.gpus_per_actor, model_actors=cfg.model_actors,
                               actor_cpus=cfg.actor_cpus, task_cpus=cfg.task_cpus,
                               min_actors=cfg.min_model_actors, max_actors=cfg.max_model_actors)


# Model actors must start within this time (a cluster without the GPUs asked for fails clearly
# instead of waiting forever); no image is read before they are ready.
ACTOR_START_TIMEOUT_S = 1800
# Ray Data messages that ask nothing of the user (we turn its bars off on purpose; small inputs
# leave some actors of a fixed pool idle).
_QUIET_LOGGERS = ("ray.data._internal.progress",)
QUIET_WARNINGS = ("The minimum number of concurrent actors",)


def configure_ray_data(max_errored_blocks: int) -> None:
    ctx = ray.data.DataContext.get_current()
    ctx.wait_for_min_actors_s = ACTOR_START_TIMEOUT_S
    # A block Ray gives up on is labeled again alone, then recorded; more than the failure rate's
    # share of blocks stops the run (a systematic crash, not bad luck).
    ctx.max_errored_blocks = max_errored_blocks
    ctx.enable_progress_bars = False  # the driver shows one bar in images, and shard commits
    ctx.print_on_execution_start = False
    for name in _QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)


def errored_blocks(rate: float, num_blocks: int) -> int:
    return -1 if rate >= 1 else max(1, int(rate * num_blocks))

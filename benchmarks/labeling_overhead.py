"""What the Ray pipeline costs over a bare loop, with the same tiny models on the same images.

    python benchmarks/labeling_overhead.py [--images N] [--cpus 2] [--batch-size 8]

Two arms label the same ImageFolder (crops of the skimage colour photos) at N and 2N images:
  bare      one process: read -> decode + SAM twin + semantic twin -> upsample/align/paint/encode maps ->
            shard write (Parquet, once per shard), batch by batch, with the pipeline's own stage
            functions; torch uses `--cpus` threads.
  pipeline  `labeling.pipeline.driver.run_labeling` on a local Ray with `--cpus` CPUs and its default
            CPU layout (`cluster.plan_layout`): single-threaded model actors (each with both
            twins), single-threaded CPU tasks. Both arms get the same `--cpus` cores; the
            bare arm's torch runs `--cpus` threads, the pipeline's one per process.
Both decode, run both models at the same batch size, encode RLE and label maps and write Parquet. Model
loading, `ray.init` and the pipeline's start-up (listing, model checks, actor start) are reported
but not timed: the pipeline is timed from its first read to its last commit (`labeling_s`).

Each arm runs `--repeats` times at each size, interleaved, and its fastest run counts (a shared
machine's load comes and goes). Prints a table and, last, `pipeline_over_bare=<bare time / pipeline time at 2N>
scaling=<pipeline per-image time at 2N / at N> driver_bytes_per_image=<bytes the driver received per
image at 2N>`: the pipeline's workers write (parts, then a commit task per shard), so the driver
receives only part names and input indices; the figure is measured from what it received. The
share of bare time spent inside the two models is printed too: below one half, the models are too
small to measure overhead against.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Idle OpenMP threads sleep instead of spinning: on a shared machine spinning threads make the
# multi-threaded bare arm look far slower than it is. Both arms (and Ray's workers) inherit it.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402


def write_images(root: Path, count: int, seed: int = 0) -> None:
    """`count` random 144x192 crops of the skimage colour photos, in two class folders, as JPEG."""
    import skimage.data
    from PIL import Image

    names = ("astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field", "immunohistochemistry")
    photos = [getattr(skimage.data, n)()[:, :, :3] for n in names]
    rng = np.random.default_rng(seed)
    for i in range(count):
        photo = photos[i % len(photos)]
        y, x = rng.integers(0, photo.shape[0] - 144), rng.integers(0, photo.shape[1] - 192)
        folder = root / f"class_{i % 2}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(photo[y : y + 144, x : x + 192]).save(folder / f"img_{i:05d}.jpg", quality=90)


def bare_loop(listed, n: int, cfg, models, output: str) -> dict:
    """The pipeline's stages in one process, batch by batch, each shard written once when it is
    full (no parts, no commit tasks); returns seconds and model seconds."""
    import pyarrow as pa
    import pyarrow.compute as pc

    from dataset_card.contract import layout, shards
    from dataset_card.contract.output_folder import OutputFolder
    from dataset_card.contract.schema import arrow_schema
    from labeling.pipeline import manifest, writer
    from labeling.pipeline.dataflow import work_table
    from labeling.pipeline.postprocess import PostprocessConfig, postprocess_stage, staged_schema
    from labeling.pipeline.preprocess import read_stage

    classes = models.labeler.semantic.classes
    post = PostprocessConfig(len(classes), models.labeler.semantic.ignore_value, cfg.min_instance_area,
                             tuple(c.id for c in classes if c.isthing))
    names = [c.name for c in classes]
    schema = staged_schema(listed.class_names, names)
    contract = arrow_schema(listed.class_names, names, image_reference=True)
    num_shards = manifest.num_shards(n, cfg.shard_size)
    work = work_table(listed, list(range(n)), np.arange(len(listed)) // cfg.shard_size)
    folder = OutputFolder.open(output)
    model_s, pending, shard = 0.0, [], 0
    start = time.perf_counter()
    for lo in range(0, n, cfg.model_batch_size):
        batch = models(read_stage(work.slice(lo, cfg.model_batch_size), listed.source, cfg.max_pixels))
        model_s += pc.sum(batch.column("time_instance")).as_py() + pc.sum(batch.column("time_semantic")).as_py()
        pending.append(postprocess_stage(batch, post, schema))
        rows = sum(t.num_rows for t in pending)
        if rows >= cfg.shard_size or lo + cfg.model_batch_size >= n:
            staged = pa.concat_tables(pending)
            stats = layout.ShardStats(shard=shard)
            writer.add_rows(stats, staged)
            data = writer.data_table(staged, contract)
            shards.commit_shard(folder, shard, max(num_shards, shard + 1), data, writer.errors_table(staged), stats,
                                row_group_size=shards.row_group_rows(data))
            pending, shard = [], shard + 1
    return {"seconds": time.perf_counter() - start, "model_s": model_s}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=150, help="N: the arms run at N and 2N images (default 150)")
    p.add_argument("--cpus", type=int, default=2, help="CPUs / threads for each arm (default 2)")
    p.add_argument("--batch-size", type=int, default=8, help="images per read, model and post-process batch")
    p.add_argument("--shard-size", type=int, default=50, help="images per output shard")
    p.add_argument("--repeats", type=int, default=2,
                   help="runs of each arm at each size, interleaved; the fastest counts (default 2)")
    args = p.parse_args(argv)

    import ray
    import torch

    from labeling.pipeline.config import LabelingConfig, model_choice, model_max_side
    from labeling.pipeline.driver import run_labeling
    from labeling.pipeline.predictors import ModelPredictor

    work_dir = Path(tempfile.mkdtemp(prefix="labeling-overhead-"))
    images = work_dir / "train"
    write_images(images, 2 * args.images)
    sizes = (args.images, 2 * args.images)
    base = LabelingConfig(input=str(images), output="", models="tiny-random", shard_size=args.shard_size,
                          read_batch_size=args.batch_size, model_batch_size=args.batch_size,
                          postprocess_batch_size=args.batch_size, progress=False)

    from labeling.inputs.kinds import list_inputs

    listed = list_inputs(str(images))
    choice = model_choice(base)
    start = time.perf_counter()
    models = ModelPredictor(choice, threads=args.cpus, max_side=model_max_side(base))
    load_s = time.perf_counter() - start
    bare_loop(listed, args.batch_size, base, models, str(work_dir / "warmup"))  # first-call costs
    bare, pipe, init_s = {}, {}, []
    for repeat in range(args.repeats):  # arms side by side at each size, so both see the same machine load
        for n in sizes:
            torch.set_num_threads(args.cpus)
            result = bare_loop(listed, n, base, models, str(work_dir / f"bare-{n}-{repeat}"))
            bare[n] = min(bare.get(n, result), result, key=lambda r: r["seconds"])
            torch.set_num_threads(1)  # the pipeline's driver only collects and commits
            start = time.perf_counter()
            ray.init(address="local", num_cpus=args.cpus, object_store_memory=300 * 2**20, include_dashboard=False,
                     runtime_env={"env_vars": {"PYTHONPATH": str(ROOT)}}, log_to_driver=False)
            init_s.append(time.perf_counter() - start)
            cfg = LabelingConfig(**{**base.__dict__, "output": str(work_dir / f"pipeline-{n}-{repeat}"), "limit": n})
            stats = run_labeling(cfg, log=lambda message: None)
            ray.shutdown()
            assert stats["written"] + stats["failed"] == n, stats
            result = {"seconds": stats["labeling_s"], "startup_s": stats["startup_s"],
                      "driver_bytes": stats["driver_bytes_per_image"]}
            pipe[n] = min(pipe.get(n, result), result, key=lambda r: r["seconds"])

    print(f"\nlabeling overhead: tiny-random models, {args.cpus} CPUs, batch {args.batch_size}, best of {args.repeats}, "
          f"144x192 JPEG crops; not timed: model load {load_s:.1f} s (bare), ray.init {max(init_s):.1f} s")
    print(f"{'arm':<10}{'images':>8}{'timed s':>10}{'ms/image':>10}{'images/s':>10}{'model share':>13}"
          f"{'start-up s':>12}{'driver B/img':>14}")
    for arm, results in (("bare", bare), ("pipeline", pipe)):
        for n in sizes:
            r = results[n]
            share = f"{r['model_s'] / r['seconds']:.2f}" if arm == "bare" else "-"
            startup = f"{r['startup_s']:.1f}" if arm == "pipeline" else "-"
            driver = f"{r['driver_bytes']:.1f}" if arm == "pipeline" else "-"
            print(f"{arm:<10}{n:>8}{r['seconds']:>10.2f}{1000 * r['seconds'] / n:>10.1f}{n / r['seconds']:>10.2f}"
                  f"{share:>13}{startup:>12}{driver:>14}")
    share = bare[sizes[1]]["model_s"] / bare[sizes[1]]["seconds"]
    print(f"share of bare time inside the models: {share:.2f}"
          + ("" if share >= 0.5 else " (under one half: the models are too small to measure overhead against)"))
    ratio = bare[sizes[1]]["seconds"] / pipe[sizes[1]]["seconds"]
    scaling = (pipe[sizes[1]]["seconds"] / sizes[1]) / (pipe[sizes[0]]["seconds"] / sizes[0])
    shutil.rmtree(work_dir, ignore_errors=True)
    print(f"pipeline_over_bare={ratio:.3f} scaling={scaling:.3f} "
          f"driver_bytes_per_image={pipe[sizes[1]]['driver_bytes']:.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

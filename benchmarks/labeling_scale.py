"""How the labeling pipeline's own cost grows with the number of inputs, on one machine, without models.

    python benchmarks/labeling_scale.py [--sizes 10000 100000] [--classes 1000] [--cpus 2]

For each size it writes an ImageFolder of tiny generated JPEGs (32x32, in `--classes` class folders,
as ImageNet is laid out) and runs the real pipeline (`labeling.pipeline.driver.run_labeling`:
listing, planning, the Ray stages, the workers' part writes, the commit tasks, stats, the card and
the final check) with a `null` labeler: the model actors return no masks and an empty class map at
no model cost, so what is measured is everything but the models. Each size runs in its own process
with its own local Ray (`--cpus` CPUs), so its peak memory is its own.

Prints a table (images/s of the labeling phase, listing seconds, start-up and card+check seconds,
the driver's peak RSS, bytes per image the driver received and the output holds) and, last,
`scale_cost_ratio=<per-image labeling time at the largest size / at the smallest>` (want <= 1.1:
per-image cost flat as the input grows) with the other figures as key=value.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402


def write_images(root: Path, count: int, classes: int, seed: int = 0) -> None:
    """`count` 32x32 JPEGs of smooth random colour, dealt round-robin into `classes` class folders."""
    import cv2

    rng = np.random.default_rng(seed)
    for c in range(classes):
        (root / f"n{c:08d}").mkdir(parents=True, exist_ok=True)
    for i in range(count):
        small = rng.integers(0, 255, (4, 4, 3), dtype=np.uint8)
        image = cv2.resize(small, (32, 32), interpolation=cv2.INTER_LINEAR)
        ok, data = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, 85])
        (root / f"n{i % classes:08d}" / f"n{i % classes:08d}_{i:07d}.JPEG").write_bytes(data.tobytes())


class NullLabelers:
    """A model choice whose labelers cost nothing: no instance masks, an all-background class map.

    It has what the driver and the predictors use of `labeling.labelers.model_choice.ModelChoice`.
    """

    preset = "null"

    @property
    def instance_params(self) -> dict:
        return {}

    def pinned(self, recorded=None):
        return self

    def materialize(self):
        return self

    def describe(self) -> dict:
        return {"instance": {"name": "null", "checkpoint": "null", "sha256": None, "params": {}},
                "semantic": {"name": "null", "checkpoint": "null", "sha256": None, "revision": None, "params": {}}}

    def semantic_classes(self):
        from dataset_card.contract.layout import SemanticClass

        return (SemanticClass(0, "background", False), SemanticClass(1, "thing", True))

    def instance_labeler(self, device: str):
        return _NullInstance()

    def semantic_labeler(self, device: str):
        return _NullSemantic()


class _NullInstance:
    """The instance labeler's interface as `labeling.labelers.paired.PairedLabeler` drives it: no masks."""

    def prepare(self, pixels):
        return None

    def device_pass(self, prepared):
        for _ in prepared:
            yield None

    def finish(self, result) -> list:
        return []


class _NullSemantic:
    """The semantic labeler's interface as `PairedLabeler` drives it: an all-background map."""

    def prepare(self, pixels, size):
        return size

    def label(self, sizes) -> list:
        return [np.zeros(size, np.uint8) for size in sizes]


def run_one(images: str, output: str, cpus: int, shard_size: int) -> dict:
    """One labeling run in this process (a child of main); returns its figures."""
    from labeling.pipeline.config import LabelingConfig
    from labeling.pipeline.driver import run_labeling

    cfg = LabelingConfig(input=images, output=output, models="tiny-random", shard_size=shard_size, num_cpus=cpus,
                         model_actors=2, actor_cpus=0.25, task_cpus=0.25,
                         read_batch_size=64, model_batch_size=64, postprocess_batch_size=64, progress=False,
                         object_store_memory=512 * 2**20)
    start = time.perf_counter()
    stats = run_labeling(cfg, log=lambda message: None, choice=NullLabelers())
    total = time.perf_counter() - start
    out_bytes = sum(p.stat().st_size for p in Path(output).rglob("*") if p.is_file())
    return {"n": stats["inputs"], "written": stats["written"], "labeling_s": stats["labeling_s"],
            "startup_s": stats["startup_s"], "listing_s": stats["listing_s"], "total_s": total,
            "card_check_s": total - stats["wall_time_s"], "driver_bytes": stats["driver_bytes_per_image"],
            "output_bytes": out_bytes / max(1, stats["inputs"]),
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000], help="input counts (default 10k 100k)")
    p.add_argument("--classes", type=int, default=1000, help="class folders (default 1000, as ImageNet)")
    p.add_argument("--cpus", type=int, default=2, help="CPUs of each run's local Ray (default 2)")
    p.add_argument("--shard-size", type=int, default=1000, help="images per shard (default 1000)")
    p.add_argument("--run", nargs=2, metavar=("IMAGES", "OUTPUT"), help=argparse.SUPPRESS)  # a child run
    args = p.parse_args(argv)
    if args.run:
        print(json.dumps(run_one(*args.run, args.cpus, args.shard_size)))
        return 0

    work = Path(tempfile.mkdtemp(prefix="labeling-scale-"))
    results = []
    try:
        for n in sorted(args.sizes):
            images, output = work / f"images-{n}", work / f"out-{n}"
            start = time.perf_counter()
            write_images(images, n, args.classes)
            made = time.perf_counter() - start
            env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
            done = subprocess.run([sys.executable, __file__, "--run", str(images), str(output), "--cpus",
                                   str(args.cpus), "--shard-size", str(args.shard_size)], env=env,
                                  capture_output=True, text=True)
            if done.returncode:
                print(done.stderr[-4000:], file=sys.stderr)
                return done.returncode
            result = json.loads(done.stdout.strip().splitlines()[-1])
            result["generate_s"] = made
            results.append(result)
            shutil.rmtree(images, ignore_errors=True)
            shutil.rmtree(output, ignore_errors=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"\nlabeling at scale: null labeler, 32x32 JPEGs in {args.classes} class folders, shards of "
          f"{args.shard_size}, {args.cpus} CPUs; load average {load:.1f} when done")
    print(f"{'images':>8}{'images/s':>10}{'ms/image':>10}{'listing s':>11}{'start-up s':>12}{'card+check s':>14}"
          f"{'driver MB':>11}{'driver B/img':>14}{'output B/img':>14}")
    for r in results:
        print(f"{r['n']:>8}{r['n'] / r['labeling_s']:>10.1f}{1000 * r['labeling_s'] / r['n']:>10.2f}"
              f"{r['listing_s']:>11.2f}{r['startup_s']:>12.1f}{r['card_check_s']:>14.1f}{r['peak_rss_mb']:>11.0f}"
              f"{r['driver_bytes']:>14.1f}{r['output_bytes']:>14.0f}")
    small, large = results[0], results[-1]
    ratio = (large["labeling_s"] / large["n"]) / (small["labeling_s"] / small["n"])
    print(f"scale_cost_ratio={ratio:.3f} images_per_s_{small['n']}={small['n'] / small['labeling_s']:.1f} "
          f"images_per_s_{large['n']}={large['n'] / large['labeling_s']:.1f} listing_s_{large['n']}={large['listing_s']:.2f} "
          f"driver_peak_mb_{large['n']}={large['peak_rss_mb']:.0f} driver_bytes_per_image={large['driver_bytes']:.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""How a labeling run ends: it writes stats.json (counts over the whole output folder, speed of this
run) and the dataset card, checks the folder, prints the closing line, and warns loudly when real
models find almost no instances.
"""

from __future__ import annotations

import json
import posixpath
import sys
from collections.abc import Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor

from dataset_card.card.readme import minimal_card
from dataset_card.card.source import CardOptions
from dataset_card.contract import coverage, layout, shards
from dataset_card.contract.output_folder import OutputFolder
from labeling.pipeline.writer import ShardResult

# With real models ImageNet images have tens of instances; under one on average means a wrong
# checkpoint or thresholds. Judged once this many images are committed (or the run ends).
LOW_INSTANCE_MIN_IMAGES = 200
LOW_INSTANCE_MEAN = 1.0


def folder_stats(folder: OutputFolder, committed: Iterable[int], num_shards: int) -> layout.ShardStats:
    """Per-shard statistics of the committed shards, summed (no mask is decoded)."""
    def read(shard: int) -> layout.ShardStats:
        return layout.ShardStats.from_json(folder.read_bytes(layout.stats_path(shard, num_shards)).decode())

    total = layout.ShardStats(shard=-1)
    with ThreadPoolExecutor(16) as pool:  # thousands of small files on an object store
        for stats in pool.map(read, sorted(committed)):
            total = total.merge(stats)
    return total


def failures_in(folder: OutputFolder, committed: Iterable[int], num_shards: int) -> dict[str, int]:
    """Failed inputs by reason, counted in the committed shards' errors tables."""
    from dataset_card.card.run_summary import errors_by_type

    names = [layout.errors_path(s, num_shards) for s in sorted(committed)]
    return errors_by_type(folder, [n for n in names if folder.exists(n)])


def run_stats(total: layout.ShardStats, num_inputs: int, results: Iterable[ShardResult], wall_time_s: float,
              commit_time_s: float, gpus_per_actor: float, previous: Mapping | None = None,
              startup_s: float = 0.0, failed_by_type: Mapping[str, int] | None = None, driver_bytes: int = 0,
              listing_s: float = 0.0, actor_lifetime_s: float | None = None) -> dict:
    """stats.json: totals over the folder; wall time, images/s, stage times and work counters (`counts`:
    the semantic model's filler images) of this run.

    startup_s: the part of the wall time before the first image was read (listing, model checks,
    starting Ray and the model actors); `labeling_s` is the rest. failed_by_type: the errors
    tables' counts (the card's source too); by default the statistics files'. driver_bytes: what
    the driver received from the cluster (the write stage's results and the commits' results).
    actor_lifetime_s: the model actors' summed lifetimes (`gpu_time`).
    """
    results = list(results)
    processed = sum(r.processed for r in results)
    failed = dict(sorted((failed_by_type if failed_by_type is not None else total.errors_by_type).items()))
    stage: dict[str, float] = {}
    for r in results:
        for name, seconds in r.stage_time_s.items():
            stage[name] = stage.get(name, 0.0) + seconds
    stage["commit"] = stage.get("commit", 0.0) + commit_time_s
    counts: dict[str, int] = {}
    for r in results:
        for name, value in r.counts.items():
            counts[name] = counts.get(name, 0) + value
    model_s = stage.get("instance", 0.0) + stage.get("semantic", 0.0)
    runs = list((previous or {}).get("previous_runs", []))
    if previous:
        runs.append({k: previous.get(k) for k in ("processed", "wall_time_s", "startup_s", "images_per_s",
                                                  "gpu_hours", "billed_gpu_hours")})
    return {
        "inputs": num_inputs,
        "written": total.rows,
        "failed": sum(failed.values()),
        "failed_by_type": failed,
        "instances": total.instances,
        "processed": processed,
        "wall_time_s": round(wall_time_s, 3),
        "startup_s": round(startup_s, 3),
        "labeling_s": round(wall_time_s - startup_s, 3),
        "images_per_s": round(processed / wall_time_s, 3) if wall_time_s > 0 else 0.0,
        "listing_s": round(listing_s, 3),
        "driver_bytes_per_image": round(driver_bytes / processed, 1) if processed else 0.0,
        "stage_time_s": {k: round(v, 3) for k, v in stage.items()},
        "counts": counts,
        **gpu_time(model_s, gpus_per_actor, actor_lifetime_s),
        "previous_runs": runs,
    }


def gpu_time(model_s: float, gpus_per_actor: float, actor_lifetime_s: float | None) -> dict:
    """This run's GPU time, two ways: `gpu_hours`, the models' own seconds per image summed (SAM and the
    semantic model) x GPUs each, and `billed_gpu_hours`, the model actors' lifetimes x GPUs each: the GPU
    time the run held, as a cluster bills it (loading the models and waiting for images included; None
    when Ray could not say). Their ratio is how busy the GPUs were kept."""
    billed = None if actor_lifetime_s is None else round(actor_lifetime_s * gpus_per_actor / 3600.0, 6)
    return {"gpu_hours": round(model_s * gpus_per_actor / 3600.0, 6), "billed_gpu_hours": billed}


def read_previous(folder: OutputFolder) -> dict | None:
    name = layout.RUN_STATS_FILE
    return json.loads(folder.read_bytes(name).decode()) if folder.exists(name) else None


def write(folder: OutputFolder, stats: Mapping) -> None:
    folder.write_bytes(layout.RUN_STATS_FILE, json.dumps(stats, indent=2).encode())


def closing_line(stats: Mapping, output: str = "OUTPUT") -> str:
    """"labeled W of N inputs, F failed (too_large 2, undecodable 1); this run processed P in 12.3 s
    (4.1 images/s)", and where the failures are listed when there are any."""
    reasons = ", ".join(f"{k} {v}" for k, v in stats["failed_by_type"].items())
    failed = f"{stats['failed']} failed" + (f" ({reasons})" if reasons else "")
    where = (f"; the failed inputs and why: {posixpath.join(output, layout.ERRORS_DIR)}/ "
             f"(datasets.load_dataset({output!r}, 'errors'))" if stats["failed"] else "")
    return (f"labeled {stats['written']} of {stats['inputs']} inputs, {failed}; this run processed "
            f"{stats['processed']} in {stats['wall_time_s']:.1f} s ({stats['images_per_s']:.2f} images/s){where}")


class InstanceCountCheck:
    """Warns once, loudly, if the first committed images average under one instance per image."""

    def __init__(self, enabled: bool, min_images: int = LOW_INSTANCE_MIN_IMAGES):
        self.enabled, self.min_images = enabled, min_images
        self.rows = self.instances = 0
        self.done = False

    def add(self, result: ShardResult, final: bool = False) -> str | None:
        if self.done or not self.enabled:
            return None
        self.rows += result.rows
        self.instances += result.instances
        return self.judge(final)

    def judge(self, final: bool = False) -> str | None:
        if self.done or not self.enabled or self.rows == 0 or (self.rows < self.min_images and not final):
            return None
        self.done = True
        mean = self.instances / self.rows
        if mean >= LOW_INSTANCE_MEAN:
            return None
        message = (f"WARNING: the first {self.rows} labeled images average {mean:.2f} instances per image (fewer "
                   "than one): the SAM checkpoint or the thresholds (--pred-iou-thresh, --stability-score-thresh, "
                   "--min-instance-area) are probably wrong. Stop the run and check them.")
        bar = "!" * 100
        print(f"\n{bar}\n{message}\n{bar}\n", file=sys.stderr, flush=True)
        return message


# Instance-guided masking falls back to random masking on an image with fewer than
# `coverage.MIN_REGIONS` instance regions at the trainer's patch grid; when more than this share of
# the images do, the curriculum's instance phase would be mostly random masking, and the run warns.
FEW_REGIONS_SHARE = 0.5


def coverage_stats(total: layout.ShardStats) -> dict:
    """stats.json's "coverage": per-image histograms of what instance-guided masking will see
    (`dataset_card.contract.coverage`), summed from the shard statistics, keyed by readable bins."""
    from dataset_card.card.run_summary import bin_labels

    labels = bin_labels(coverage.COUNT_EDGES)
    images = total.coverage_measured
    few = sum(total.regions_per_image[:coverage.MIN_REGIONS])  # the bins 0 and 1
    return {
        "images": images,
        "patch_grid": f"{coverage.IMG_SIZE} px, patch {coverage.PATCH_SIZE}",
        "painted_objects_per_image": dict(zip(labels, total.painted_per_image)),
        "instance_regions_per_image": dict(zip(labels, total.regions_per_image)),
        "largest_mask_level": dict(sorted(total.largest_mask.items(), key=lambda kv: -kv[1])),
        "share_under_min_regions": round(few / images, 4) if images else 0.0,
    }


def coverage_line(cov: Mapping) -> str:
    """The run's coverage in one line (printed before the closing line)."""
    images = cov["images"]
    if not images:
        return "coverage: no image measured"
    largest = cov["largest_mask_level"]
    painted = cov["painted_objects_per_image"]
    return (f"coverage of {images} images: {cov['share_under_min_regions']:.1%} have under {coverage.MIN_REGIONS} "
            f"instance regions at the trainer's patch grid ({cov['patch_grid']}; instance-guided masking falls back "
            f"to random there), {painted.get('0', 0) / images:.1%} no painted object; the largest mask is stuff in "
            f"{largest.get('stuff', 0) / images:.1%} and dropped in {largest.get('dropped', 0) / images:.1%}"
            + (f", a class-agnostic object in {largest['object_agnostic'] / images:.1%}"
               if largest.get("object_agnostic") else ""))


def few_regions_warning(cov: Mapping, threshold: float = FEW_REGIONS_SHARE) -> str | None:
    """A warning when more than `threshold` of the images have under `coverage.MIN_REGIONS` regions."""
    if not cov["images"] or cov["share_under_min_regions"] <= threshold:
        return None
    return (f"warning: {cov['share_under_min_regions']:.0%} of the images have fewer than {coverage.MIN_REGIONS} "
            f"instance regions at the trainer's patch grid (more than {threshold:.0%}): instance-guided masking "
            "falls back to random masking on them, so the curriculum's instance phase would be mostly random. The "
            "card's \"Regions for instance-guided masking\" shows why (no painted object, the largest mask stuff or "
            "dropped); where the images' subjects lie outside the semantic taxonomy, `python -m dataset_card repaint "
            "OUTPUT --rule salient` paints them as class-agnostic objects.")


class OutputInvalid(RuntimeError):
    """The run finished but the folder fails validation; the message says what to do."""


def verify_folder(folder: OutputFolder) -> None:
    """Raise OutputInvalid unless `folder` passes `python -m dataset_card validate` (the fast form)."""
    from dataset_card.validate import validate

    report = validate(folder)
    if not report.ok:
        raise OutputInvalid(f"the run ended but {folder} fails validation:\n{report.format(limit=20)}\n"
                            "Rerun the same command to repair the shards named above.")


def _is_full_card(text: str) -> bool:
    return text.startswith("---") and "\npretty_name:" in text.split("\n---", 1)[0]


def write_card(folder: OutputFolder, metadata: layout.DatasetMetadata, has_errors: bool, log=print,
               options: CardOptions | None = None, tiny_random: bool = False, image_bytes: bool = True) -> None:
    """The full dataset card (`options`: what the user told it). If building it fails, an earlier
    full card is kept (it is then out of date, and the run says so), else the minimal card is
    written (declaring `image` as the data files do: `image_bytes=False` for a labels-only run);
    the labels are done either way."""
    from dataset_card.card.build import BuildConfig, build_card

    try:
        build_card(folder, BuildConfig(options=options or CardOptions()))
        return
    except Exception as err:  # the labels are done; a card failure must not hide that
        reason = f"{type(err).__name__}: {err}" if not isinstance(err, shards.OutputWriteError) else str(err)
    name = layout.CARD_FILE
    previous = folder.read_bytes(name).decode(errors="replace") if folder.exists(name) else ""
    rebuild = f"rebuild it with: python -m dataset_card build {folder}"
    if _is_full_card(previous):
        log(f"warning: the dataset card could not be rebuilt ({reason}); the previous full card is kept and is out "
            f"of date: {rebuild}")
        return
    log(f"warning: the full dataset card failed ({reason}); writing the minimal card instead: {rebuild}")
    try:
        body = ("# Multi-granular labeled images\n\n**Labeled with `--models tiny-random`: randomly initialised "
                "tiny models, so these labels are meaningless** (for offline smoke runs and tests only).") \
            if tiny_random else ""
        card = minimal_card(metadata, has_errors, body, image_reference=True, image_bytes=image_bytes)
        folder.write_bytes(name, str(card).encode())
    except shards.OutputWriteError as err:
        log(f"warning: no dataset card was written ({err})")

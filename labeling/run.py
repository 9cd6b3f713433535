"""Label an image folder (or a Parquet / datasets table) into Parquet shards with Ray.

    python labeling/run.py --input /data/imagenet/train --output /data/imagenet-c2f --models default
    python labeling/run.py --input /data/imagenet/train --output /data/imagenet-c2f --models default --sample 1000
    ray job submit --working-dir . -- python labeling/run.py --input ... --output s3://bucket/imagenet-c2f --models default
    python labeling/run.py --input demo_images --output /tmp/out --models tiny-random   # offline smoke run

Without a cluster address it starts Ray on this machine; as a Ray job, with --address or with
RAY_ADDRESS it joins that cluster. Rerunning the same command resumes: committed shards are
checked and skipped, and only new inputs are labeled. Rerunning with other label-shaping arguments,
other model weights or a new labels version of the code is refused unless --overwrite; under other
library versions, CUDA or GPUs it resumes with a warning (--strict-environment refuses), and each
shard records what made it. One run at a time writes a folder (OUTPUT/.lease.json).
The dataset card names no dataset and no licence it is not told (ImageNet-1K is recognised by its
1000 synsets): --pretty-name, --license and --source-dataset tell it.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys

if __package__ in (None, ""):  # run as a script: import this checkout's packages, not labeling/*.py
    _ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    sys.path[0] = _ROOT


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python labeling/run.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    io = p.add_argument_group("inputs and outputs")
    io.add_argument("--input", required=True,
                    help="ImageFolder root (<root>/<class>/<image>), Parquet file or folder, or datasets.save_to_disk "
                         "folder; a local/shared path or a URL pyarrow understands (s3://, gs://)")
    io.add_argument("--output", required=True,
                    help="output folder (local/shared path or URL): data/, errors/, stats/, manifest.json, stats.json, "
                         "metadata.json, README.md")
    io.add_argument("--models", required=True, choices=("default", "tiny-random"),
                    help="default: SAM vit_h (with SA-1B's mask filters) + facebook/mask2former-swin-large-coco-panoptic; "
                         "tiny-random: small random twins for offline smoke runs (meaningless labels)")
    io.add_argument("--shard-size", type=positive_int, default=1000,
                    help="images per output shard; a shard is the unit of work and of commit (default 1000)")
    io.add_argument("--limit", type=positive_int, default=None,
                    help="label only the first N inputs in sorted order (the first classes: a smoke test, not a "
                         "sample; its folder is sized for N inputs)")
    io.add_argument("--sample", type=positive_int, default=None,
                    help="label a class-stratified sample of N inputs (round-robin over the classes, seeded), in "
                         "shards planned for every input: the trial folder grows into a larger --sample or the "
                         "full run (the same command without --sample), which label only what is new")
    io.add_argument("--sample-seed", type=int, default=0,
                    help="which sample --sample draws (default 0); keep it when growing a trial")
    io.add_argument("--overwrite", action="store_true",
                    help="delete an earlier run's files in --output and start over (needed when label-shaping "
                         "arguments or models changed)")
    io.add_argument("--strict-environment", action="store_true",
                    help="refuse to resume a folder labeled under another environment (Python, library versions, "
                         "the package's version) instead of warning once and going on")
    io.add_argument("--retry-errors", action="store_true",
                    help="also re-attempt the inputs listed in the errors tables of committed shards")
    io.add_argument("--no-repair", action="store_true",
                    help="refuse, instead of repairing, committed shards that fail verification (unreadable, "
                         "counts that disagree, a missing errors table)")
    io.add_argument("--image-storage", default="inline", choices=("inline", "reference"),
                    help="inline (default): rows hold the original image bytes, the folder is self-contained; "
                         "reference: labels only (no image bytes; each row keeps the image's relative path, size and "
                         "sha256), for publishing labels of images you may not redistribute; image folders only")
    io.add_argument("--max-pixels", type=positive_int, default=100_000_000,
                    help="images with more pixels go to the errors table as too_large (default 1e8)")
    io.add_argument("--input-format", default="auto", choices=("auto", "imagefolder", "parquet", "arrow"),
                    help="what --input is (default: detected)")
    io.add_argument("--file-list", default=None,
                    help="text file of image paths relative to --input (<class>/<file> per line), instead of listing")
    io.add_argument("--image-column", default="image", help="image column of a table input (default image)")
    io.add_argument("--label-column", default="label", help="label column of a table input (default label)")
    io.add_argument("--split", default="train", help="split of a table input (default train)")

    models = p.add_argument_group("models (part of the output: other weights or settings need --overwrite)")
    models.add_argument("--sam-type", default=None, help="SAM model type: vit_h (default), vit_l, vit_b")
    models.add_argument("--sam-checkpoint", default=None,
                        help="path of the SAM checkpoint (default: the official file for --sam-type, cached)")
    models.add_argument("--semantic-model", default=None,
                        help="transformers segmentation model: hub id or local folder "
                             "(default facebook/mask2former-swin-large-coco-panoptic)")
    models.add_argument("--semantic-revision", default=None,
                        help="hub branch, tag or commit of --semantic-model (default: its default branch); the "
                             "manifest records the commit it resolved to, which every model actor loads and a "
                             "resume without this flag reuses")
    models.add_argument("--staged-models", default=None,
                        help="a folder python -m labeling.stage_models filled (shared by the nodes, or the same path "
                             "on each): every actor loads both models from it, nothing is downloaded; the manifest "
                             "names the models as without it")
    models.add_argument("--semantic-shortest-edge", type=positive_int, default=None,
                        help="shorter side of the semantic model's input, aspect kept (default 640; 128 for tiny)")
    models.add_argument("--model-max-side", type=positive_int, default=None,
                        help="images are shrunk to this longest side for the models (default 1024; 256 for tiny)")
    models.add_argument("--points-per-side", type=positive_int, default=None,
                        help="SAM automatic-mask point grid per side (default: the labeler's; 8 for tiny)")
    models.add_argument("--pred-iou-thresh", type=float, default=None, help="SAM predicted-IoU threshold")
    models.add_argument("--stability-score-thresh", type=float, default=None, help="SAM stability threshold")
    models.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                        help="torch.compile SAM's encoder and decoder call (one graph each, compiled once per actor; "
                             "masks equal eager ones up to float rounding, within tests/test_instance_labeler.py's "
                             "tolerance). Default: on where the models run on a GPU, off on CPUs")
    models.add_argument("--min-instance-area", type=int, default=16,
                        help="instances smaller than this many pixels (at full size) are dropped (default 16)")
    models.add_argument("--painting-rule", default="objects", choices=("objects", "salient", "parts"),
                        help="what instance_mask shows: objects (default: thing objects clipped to their semantic "
                             "class), salient (objects, plus whole, salient SAM masks with no thing class as "
                             "class-agnostic objects: for images whose subjects the taxonomy lacks, e.g. ImageNet) or "
                             "parts (every mask, smaller on top: schema v1's map); python -m dataset_card repaint "
                             "changes it later without the models")
    models.add_argument("--min-purity", type=float, default=None,
                        help="a thing mask with less of its class than this is dropped, not an object (default 0.75)")

    from dataset_card.card.source import CardOptions
    from dataset_card.contract.lease import TTL_S
    from dataset_card.contract.shards import RETRY_S

    CardOptions.add_arguments(p.add_argument_group(
        "dataset card (what it says of the images; may change when resuming; kept in OUTPUT/card.json)"))

    run = p.add_argument_group("execution (may change when resuming)")
    run.add_argument("--address", default=None,
                     help="Ray cluster to join (default: $RAY_ADDRESS, set for Ray jobs; else start Ray locally)")
    run.add_argument("--num-cpus", type=int, default=None, help="CPUs of a locally started Ray (default: all)")
    run.add_argument("--object-store-memory", type=int, default=None,
                     help="object store bytes of a locally started Ray (default: Ray's)")
    run.add_argument("--device", default="auto", choices=("auto", "cuda", "cpu"),
                     help="where the model actors run: auto (default) is a GPU, and the CPUs only for "
                          "--models tiny-random on a cluster without GPUs; cpu runs real models on CPUs (slow); "
                          "a model actor given a GPU it cannot use stops the run")
    run.add_argument("--wait-for-gpus", type=float, default=None, metavar="SECONDS",
                     help="on a cluster without GPUs yet, wait this long for the first GPU node (default: 1800 "
                          "when the cluster's autoscaler can add GPU nodes, else refuse at once)")
    run.add_argument("--gpus-per-actor", type=float, default=None,
                     help="GPUs per model actor (default 1; 0.5 on a one-GPU cluster, so two actors share it, "
                          "unless the run waited for its first GPU)")
    run.add_argument("--model-actors", type=positive_int, default=None,
                     help="a fixed number of model actors, each holding SAM and the semantic model (default: "
                          "a pool that starts at one per GPU slot, or one per CPU with --device cpu, and grows "
                          "onto nodes that join)")
    run.add_argument("--min-model-actors", type=positive_int, default=None,
                     help="the pool never shrinks below this many model actors (default 1)")
    run.add_argument("--max-model-actors", type=positive_int, default=None,
                     help="the pool never grows beyond this many model actors (default: what the cluster fits)")
    run.add_argument("--actor-cpus", type=float, default=None,
                     help="CPUs Ray reserves per model actor (default 1 with GPUs, 0.5 without)")
    run.add_argument("--task-cpus", type=float, default=None,
                     help="CPUs per read / post-process task (default 1 with GPUs, 0.25 without)")
    run.add_argument("--read-batch-size", type=positive_int, default=16, help="images per read/decode batch")
    run.add_argument("--model-batch-size", type=positive_int, default=8, help="images per model call")
    run.add_argument("--sam-points-per-batch", type=positive_int, default=None,
                     help="SAM prompts per decoder call, padded (default 256 on a GPU, 64 on CPUs); speed and memory "
                          "only: labels change by float rounding at most")
    run.add_argument("--sam-encoder-batch-size", type=positive_int, default=None,
                     help="image crops per SAM encoder call, padded (default 4 on a GPU, 1 on CPUs); speed and memory "
                          "only: labels change by float rounding at most")
    run.add_argument("--semantic-batch-size", type=positive_int, default=None,
                     help="images per semantic-model pass, same-shape buckets padded with blank fillers (default 2 on "
                          "a GPU, 1 on CPUs); speed and memory only: an image's label does not depend on its batch")
    run.add_argument("--postprocess-batch-size", type=positive_int, default=8, help="images per post-process batch")
    run.add_argument("--listing-workers", type=positive_int, default=32, help="threads listing class folders")
    run.add_argument("--max-failure-rate", type=float, default=0.1,
                     help="stop (committed shards kept) when more than this share of the images in the most recent "
                          "committed shards (2000 images) failed (default 0.1; 1 never stops)")
    run.add_argument("--storage-retry-seconds", type=float, default=RETRY_S,
                     help="how long a write to --output retries a transient error (a storage outage) before the "
                          f"run stops, committed shards kept (default {RETRY_S:g}; the lease's time-to-live is kept "
                          f"at twice this, at least {TTL_S:g} s)")
    run.add_argument("--max-restarts", type=int, default=0,
                     help="restart the driver up to this many times when it dies (killed, out of memory, a crash; "
                          "not after an error it explains): the run resumes; each restart is in the log and "
                          "stats.json (default 0)")
    run.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def config_from_args(args: argparse.Namespace):
    from dataset_card.card.source import CardOptions
    from labeling.pipeline.driver import LabelingConfig

    return LabelingConfig(
        input=args.input, output=args.output, models=args.models, shard_size=args.shard_size, limit=args.limit,
        sample=args.sample, sample_seed=args.sample_seed,
        max_pixels=args.max_pixels, input_format=args.input_format, file_list=args.file_list,
        image_column=args.image_column, label_column=args.label_column, split=args.split,
        sam_type=args.sam_type, sam_checkpoint=args.sam_checkpoint, semantic_model=args.semantic_model,
        semantic_revision=args.semantic_revision, staged_models=args.staged_models,
        semantic_shortest_edge=args.semantic_shortest_edge,
        model_max_side=args.model_max_side, points_per_side=args.points_per_side,
        pred_iou_thresh=args.pred_iou_thresh, compile=args.compile, stability_score_thresh=args.stability_score_thresh,
        min_instance_area=args.min_instance_area, painting_rule=args.painting_rule, min_purity=args.min_purity,
        read_batch_size=args.read_batch_size,
        model_batch_size=args.model_batch_size, postprocess_batch_size=args.postprocess_batch_size,
        sam_points_per_batch=args.sam_points_per_batch, sam_encoder_batch_size=args.sam_encoder_batch_size,
        semantic_batch_size=args.semantic_batch_size,
        model_actors=args.model_actors, min_model_actors=args.min_model_actors,
        max_model_actors=args.max_model_actors, device=args.device, wait_for_gpus=args.wait_for_gpus,
        gpus_per_actor=args.gpus_per_actor, actor_cpus=args.actor_cpus, task_cpus=args.task_cpus,
        listing_workers=args.listing_workers, address=args.address, num_cpus=args.num_cpus,
        object_store_memory=args.object_store_memory, overwrite=args.overwrite,
        strict_environment=args.strict_environment, retry_errors=args.retry_errors,
        progress=not args.no_progress, image_storage=args.image_storage, no_repair=args.no_repair,
        max_failure_rate=args.max_failure_rate, storage_retry_s=args.storage_retry_seconds,
        driver_restarts=int(os.environ.get(RESTARTS_ENV, "0")),
        card=CardOptions.from_args(args),
    )


# Set in the driver processes `supervise` starts: how many restarts came before this one.
RESTARTS_ENV = "C2FMAE_LABELING_RESTARTS"
# Exit statuses after which a restart would only repeat the error: done (0), an error the driver
# explained in one sentence (2), a command-line error (2), stopped by the user (130).
_FINAL = (0, 2, 130, -signal.SIGINT, -signal.SIGTERM)


def supervise(argv: list[str], max_restarts: int) -> int:
    """Run the driver as a child process, and start it again (up to `max_restarts` times) when it
    dies; every rerun resumes the folder. SIGINT / SIGTERM reach the child and end supervision."""
    stopping = []

    def forward(signum, frame):
        stopping.append(signum)
        if child is not None:
            child.send_signal(signum)

    child = None
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, forward)
    for restart in range(max_restarts + 1):
        env = dict(os.environ, **{RESTARTS_ENV: str(restart)})
        child = subprocess.Popen([sys.executable, os.path.abspath(__file__), *argv], env=env)
        code = child.wait()
        if code in _FINAL or stopping:
            return 130 if stopping and code != 0 else code
        how = f"was killed by {signal.Signals(-code).name}" if code < 0 else f"exited with status {code}"
        if restart == max_restarts:
            print(f"error: the labeling driver {how} after {max_restarts} restarts; rerun the same command to "
                  "resume (what it committed is kept)", file=sys.stderr, flush=True)
            return code if code > 0 else 1
        print(f"the labeling driver {how}; restarting it ({restart + 1} of {max_restarts}): the run resumes",
              file=sys.stderr, flush=True)
    raise AssertionError("unreachable")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parser().parse_args(argv)
    if args.max_restarts > 0 and RESTARTS_ENV not in os.environ:
        return supervise(argv, args.max_restarts)
    from dataset_card.contract.lease import LeaseHeld
    from dataset_card.contract.shards import OutputWriteError
    from labeling.inputs.input_list import InputError
    from labeling.labelers.model_choice import ModelLoadError
    from labeling.pipeline import cluster
    from labeling.pipeline.driver import run_labeling
    from labeling.pipeline.failures import FailureRateExceeded
    from labeling.pipeline.finish import OutputInvalid
    from labeling.pipeline.manifest import ResumeRefused
    from labeling.pipeline.plan import RepairRefused
    from labeling.pipeline.writer import LeaseLost

    cfg = config_from_args(args)
    if cfg.driver_restarts:
        print(f"driver restart {cfg.driver_restarts} of {args.max_restarts}: resuming {cfg.output}", flush=True)
    try:
        run_labeling(cfg, log=lambda message: print(message, flush=True))
    except FailureRateExceeded as err:
        print(f"error: stopped: {err}. The committed shards are kept; the failures and their reasons are in "
              f"{cfg.output}/errors/. Fix the cause and rerun the same command to resume (or raise "
              "--max-failure-rate).", file=sys.stderr)
        return 2
    except (InputError, ResumeRefused, RepairRefused, ModelLoadError, cluster.ClusterError, LeaseHeld, LeaseLost,
            OutputWriteError, OutputInvalid) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

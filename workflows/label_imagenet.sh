#!/usr/bin/env bash
# Label ImageNet-1K train (1,281,167 images) on a Ray cluster, as a Ray job. The README's "Running
# the real job" is the step-by-step runbook (cluster, staging the models, credentials, a trial first).
#
#   RAY_ADDRESS=http://HEAD:8265 bash workflows/label_imagenet.sh /data/imagenet/train s3://bucket/imagenet-c2f \
#       --staged-models /shared/c2fmae-models --max-restarts 3
#
# Needs: a Ray cluster whose every node has this project's dependencies installed and sees INPUT and
# OUTPUT (one shared filesystem at the same path, or s3:// / gs:// with credentials on every node).
# Models: without --staged-models the driver and every node fetch the SAM ViT-H checkpoint (2.5 GB,
# hash-checked, into ~/.cache/torch) and every model actor fetches Mask2Former from the Hub; on nodes
# without internet stage both first (python -m labeling.stage_models --out DIR) and pass
# --staged-models DIR.
# Rerun the same command after any failure: committed shards are checked (footer, counts, errors
# table) and kept, damaged ones repaired, and every input ends up exactly once, in the data or in
# the errors table; --max-restarts N also restarts a driver that dies. One run writes OUTPUT at a
# time (OUTPUT/.lease.json); a second is refused and names the first. Workers write the shards; the
# driver only coordinates. To publish the labels (ImageNet's images may not be redistributed), add
# --image-storage reference: rows keep each image's path, size and sha256, not its bytes, and
# `python -m pretraining.train --images /data/imagenet/train` reads the images from there.
#
# Resources: one model actor per GPU (--gpus-per-actor 1), each holding both SAM and Mask2Former
# and decoding its images in its own CPU threads; CPU tasks read the files, and upsample, align,
# paint and encode the labels (zstd-compressed .npy maps, COCO RLE masks; schema v3).
# Speed, estimates only (no GPU has run this code yet): ours, from FLOP counts (docs/labelers.md),
# 12-20 images/s per H100, i.e. 18-30 H100-hours for the train split; an independent one from the
# code's structure (issue 30), 4-8 images/s, i.e. 45-90 H100-hours. A trial (--sample N) measures
# it: stats.json's processed / labeling_s / GPUs, and billed_gpu_hours. On 16 GPUs, 18-90
# H100-hours is about 1-6 hours of wall time, plus listing (minutes: class folders are listed in
# parallel) and model loading.
set -euo pipefail
input=${1:?usage: label_imagenet.sh INPUT OUTPUT [extra labeling/run.py flags]}
output=${2:?usage: label_imagenet.sh INPUT OUTPUT [extra labeling/run.py flags]}
shift 2
cd "$(dirname "$0")/.."
# --working-dir uploads this checkout (the files git does not ignore) to every node and puts it first
# on the workers' PYTHONPATH; the nodes' Python environment must already have the project's
# dependencies (pip install -e ".[s3]" in the cluster image): nothing is installed per job.
# --painting-rule salient: subjects outside COCO's 80 thing classes (fish, insects, instruments...) are
# painted as class-agnostic objects (docs/DESIGN.md, "ImageNet's default").
ray job submit --working-dir . -- python labeling/run.py --input "$input" --output "$output" --models default \
       --shard-size 1000 --gpus-per-actor 1 --painting-rule salient "$@"

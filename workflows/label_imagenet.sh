#!/usr/bin/env bash
# Label ImageNet-1K train (1,281,167 images) on a Ray cluster.
#
#   RAY_ADDRESS=http://HEAD:8265 bash workflows/label_imagenet.sh /data/imagenet/train s3://bucket/imagenet-c2f
#
# Needs: a Ray cluster whose every node sees INPUT and OUTPUT (shared filesystem or object store),
# the SAM ViT-H checkpoint (downloaded and hash-checked on first use into ~/.cache, or pass
# --sam-checkpoint /shared/sam_vit_h_4b8939.pth) and the Mask2Former weights from the Hub
# (or a local folder via --semantic-model). Rerun the same command after any failure: committed
# shards are checked (footer, counts, errors table) and kept, damaged ones repaired, and every
# input ends up exactly once, in the data or in the errors table. One run writes OUTPUT at a time
# (OUTPUT/.lease.json); a second is refused and names the first. Workers write the shards; the
# driver only coordinates. To publish the labels (ImageNet's images may not be redistributed), add
# --image-storage reference: rows keep each image's path, size and sha256, not its bytes, and
# `python -m pretraining.train --images /data/imagenet/train` reads the images from there.
#
# Resources: one model actor per GPU slot (3/4 SAM, 1/4 Mask2Former by default), CPU tasks for
# decoding, alignment and PNG/RLE encoding. Expected: 12-20 images/s per GPU for both models
# together on an H100 (an estimate from FLOP counts, see docs/labelers.md), i.e. 18-30 GPU-hours
# for the whole train split; the budget we hold ourselves to is 100 GPU-hours (3.6 images/s/GPU).
# On 16 GPUs that is roughly 1-2 hours of wall time, plus listing (minutes: class folders are
# listed in parallel).
set -euo pipefail
input=${1:?usage: label_imagenet.sh INPUT OUTPUT [extra labeling/run.py flags]}
output=${2:?usage: label_imagenet.sh INPUT OUTPUT [extra labeling/run.py flags]}
shift 2
cd "$(dirname "$0")/.."
# --working-dir ships this checkout to every node; the nodes' Python environment must already
# have the project's dependencies (pip install -e . in the cluster image).
# --painting-rule salient: subjects outside COCO's 80 thing classes (fish, insects, instruments...) are
# painted as class-agnostic objects (docs/DESIGN.md, "ImageNet's default").
ray job submit --working-dir . -- python labeling/run.py --input "$input" --output "$output" --models default \
       --shard-size 1000 --gpus-per-actor 1 --painting-rule salient "$@"

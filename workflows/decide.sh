#!/usr/bin/env bash
# The study that decides, before the GPU-hours (docs/evaluation.md, "The study that decides"): label an
# ImageNet-100-style subset, pretrain MAE and three C2FMAE arms at one recipe and one global batch,
# probe and fine-tune them, print one table with intervals and a go / no-go reading. Rerun to resume.
#   bash workflows/decide.sh --images /data/imagenet/train --val-images /data/imagenet/val --output runs/decide \
#       --launcher "torchrun --nproc_per_node 8"
#   bash workflows/decide.sh --tiny --output /tmp/decide        # the tiny twin: bundled photos, CPU
#   bash workflows/decide.sh --images /data/imagenet/train --output runs/decide --estimate   # GPU-hours only
set -euo pipefail
cd "$(dirname "$0")/.."
exec python -m pretraining.study.decide "$@"

#!/usr/bin/env bash
# Pretrain C2FMAE with torchrun on one node or several.
#
#   One node, 8 GPUs:
#     bash workflows/pretrain.sh /data/imagenet-c2f runs/c2fmae_base_400ep c2fmae_base_400ep
#   Two nodes (run on each; NODE_RANK 0 and 1, MASTER_ADDR = node 0's address):
#     NNODES=2 NODE_RANK=0 MASTER_ADDR=10.0.0.1 bash workflows/pretrain.sh /data/imagenet-c2f runs/c2fmae_base_400ep c2fmae_base_400ep
#
# Arguments after CONFIG go to `python -m pretraining.train` (`--set key=value`, `--amend key=value`,
# `--dry-run`). Rerun the same command to resume from the newest checkpoint in RUN. The recipe owns
# its global batch (4096 for the base recipes): the run splits it over the GPUs it finds (256 per GPU
# x 2 accumulation steps on 8, 128 x 1 on 32) and prints the split, the peak lr and the schedule at
# start; nothing here changes it. Cost: the paper reports C2FMAE at about 1.3x MAE's; our
# forward+backward FLOPs at ViT-B are 1.09x MAE's (benchmarks/pretrain_step.py).
set -euo pipefail
data=${1:?usage: pretrain.sh DATA RUN [CONFIG] [--set key=value ...]}
run=${2:?usage: pretrain.sh DATA RUN [CONFIG] [--set key=value ...]}
config=${3:-c2fmae_base_400ep}
shift $(( $# < 3 ? $# : 3 ))
cd "$(dirname "$0")/.."
torchrun --nnodes "${NNODES:-1}" --node_rank "${NODE_RANK:-0}" --nproc_per_node "${GPUS_PER_NODE:-8}" \
    --master_addr "${MASTER_ADDR:-127.0.0.1}" --master_port "${MASTER_PORT:-29500}" \
    -m pretraining.train --data "$data" --config "$config" --output "$run" "$@"

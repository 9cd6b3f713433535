#!/usr/bin/env bash
# The main job on bundled defaults, offline. For now (the labeling and pretraining stages are
# being built) it checks the dataset contract end to end: synthetic rows are written as Parquet
# shards, loaded back with `datasets.load_dataset`, and validated.
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
out=${DEMO_OUTPUT:-demo_output}
rm -rf "$out/contract"
python -m dataset_card check "$out/contract"

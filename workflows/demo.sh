#!/usr/bin/env bash
# The main job on bundled defaults, offline: label the skimage.data photos with tiny random models on
# local Ray, build and validate the dataset card, pretrain the tiny C2FMAE, export it to timm and
# probe it. Safe to rerun (it resumes); `--fresh` starts clean; `--help` lists the options.
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-1} HF_DATASETS_OFFLINE=${HF_DATASETS_OFFLINE:-1}
exec python workflows/demo.py "$@"

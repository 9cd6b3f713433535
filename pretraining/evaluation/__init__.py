"""Downstream evaluation of an exported encoder (`python -m pretraining.evaluate`).

The command (`pretraining/evaluate.py`) parses and runs; `backbones` loads the encoder; one module per
protocol: `finetune`, `linear_probe` (MAE's protocol),
`probe` (the cached-feature k-NN / linear probes), `segment` (+ `segmenters`: UperNet, the linear
probe), `detect` (+ `maskrcnn`: ViTDet's Mask R-CNN), `vitdet` (weights for detectron2); shared
parts: `loop` (the resumable iteration loop, layer-wise lr decay), `transforms` (augmentations),
the data readers `folders` and `coco`, and `synthetic_layouts` (tiny ADE20K / COCO folders).
"""

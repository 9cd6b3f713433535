"""The segmentation models that make the labels, usable without Ray.

`instance` (SAM automatic masks) with `mask_postprocess` (exact upsampling and RLE inside
windows) and `checkpoints` (SAM weights by path or name); `semantic` (any `transformers`
segmentation checkpoint); `alignment` (instances matched to the semantic map and painted);
`model_choice` (`--models`); `tiny_models` (random twins for tests and the demo).
"""

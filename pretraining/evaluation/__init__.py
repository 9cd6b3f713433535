"""Downstream evaluation of an exported encoder (`python -m pretraining.evaluate`): `cli`, the data
it reads (`folders`), and one module per protocol: `probe` (k-NN, linear), `finetune`, `segment`,
`vitdet` (weights for detectron2)."""

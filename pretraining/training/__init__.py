"""The parts of a training run that `pretraining/train.py` drives: `config` (dataclasses and
`--set`), `recipes` (`--config NAME`), `checkpoint` (atomic save, resume), `monitor` (TensorBoard
and reconstruction figures)."""

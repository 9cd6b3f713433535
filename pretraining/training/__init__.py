"""The parts of a training run that `pretraining/train.py` drives: `trainer` (the run set up: fresh,
resumed or `--init`; its steps and saving), `run_folder` (the run's files, its stored config read
back), `config` (dataclasses and `--set`), `recipes` (`--config NAME`), `checkpoint` (atomic save,
resume), `monitor` (TensorBoard and reconstruction figures)."""

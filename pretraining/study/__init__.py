"""Research on whether C2FMAE learns what the paper claims: the controlled ablation study on
procedural scenes (`python -m pretraining.study.ablations`; its arms in `arms.py`, reports in
`tables.py`) and the probes only it uses (`probes.py`: linear, k-NN, short fine-tune, dense texture,
instance loss against the constant predictor; attention mass on objects; a per-patch linear probe);
and the study that decides on real images before the GPU-hours (`python -m pretraining.study.decide`:
an ImageNet-100-style subset in `subset.py`, per-image probe predictions in `scoring.py`, intervals
and the go / no-go reading in `decision.py`). Not part of the downstream protocols in `evaluation/`."""

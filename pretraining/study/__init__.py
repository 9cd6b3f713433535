"""Research on whether C2FMAE learns what the paper claims: the controlled ablation study on
procedural scenes (`python -m pretraining.study.ablations`) and the probes only it uses (attention
mass on objects, a per-patch semantic probe). Not part of the downstream protocols in `evaluation/`."""

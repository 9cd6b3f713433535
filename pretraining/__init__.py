"""C2FMAE pretraining: model, baselines, data loading, training loop and timm export."""

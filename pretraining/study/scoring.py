"""Per-image correctness of the decision study's probes, for its bootstrap (pretraining/study/decision.py).

The same evaluation code as `python -m pretraining.evaluate` (pretraining/evaluation/: the timm
encoder from an export folder, its evaluation transform, cached features, DINO's k-NN, MAE's linear
head on cached features, the fine-tuned classifier), with the prediction for every held-out image
kept instead of only the top-1: so the top-1 here is what `pretraining.evaluate knn` / `linear-probe
--config cached` print for the same encoder, data and recipe (tests/test_study_decide.py checks it).
"""

from __future__ import annotations

import numpy as np
import torch
from timm.data import create_transform
from torch.utils.data import DataLoader

from pretraining.evaluation import probe
from pretraining.evaluation.backbones import load_timm_model
from pretraining.evaluation.finetune import FinetuneConfig, model_data_config
from pretraining.evaluation.folders import ClassificationSet, EvalData, Source


def _pool_args(pool: str) -> dict:
    """timm's pooling as `pretraining.evaluate` asks for it: the class token, or the mean patch token."""
    return {"global_pool": "avg", "fc_norm": False} if pool == "avg" else {"global_pool": "token"}


def _features(model: torch.nn.Module, split: Source, batch_size: int, num_workers: int,
              device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    transform = create_transform(**model_data_config(model), is_training=False)
    loader = DataLoader(ClassificationSet(split, transform), batch_size, num_workers=num_workers,
                        pin_memory=device.type == "cuda")
    return probe.extract_features(model, loader, device, progress=False)


def _correct(scores: torch.Tensor, labels: torch.Tensor) -> np.ndarray:
    """(M, C) scores, (M,) labels -> (M,) bool: top-1 hits, ranked as `probe.topk_accuracy` ranks."""
    return (scores.topk(1, dim=1).indices[:, 0].cpu() == labels.cpu()).numpy()


def encoder_scores(spec: str, data: EvalData, knn: probe.KnnConfig, linear: probe.LinearProbeConfig,
                   device: torch.device, random_init: bool = False) -> dict[str, np.ndarray]:
    """{"knn", "linear"}: (held-out images,) bool correctness of the frozen encoder `spec` (local-dir:EXPORT;
    `random_init`: its architecture with the weights `pretraining.evaluate --random-init` gives)."""
    classes = len(data.class_names)
    out, cached = {}, {}
    for kind, cfg in (("knn", knn), ("linear", linear)):
        if cfg.pool not in cached:
            torch.manual_seed(0)  # as pretraining.evaluate: a --random-init encoder is the same in every run
            model = load_timm_model(spec, None, random_init, num_classes=0, **_pool_args(cfg.pool)).to(device).eval()
            batch = cfg.batch_size if kind == "knn" else cfg.extract_batch_size
            cached[cfg.pool] = (*_features(model, data.train, batch, cfg.num_workers, device),
                                *_features(model, data.val, batch, cfg.num_workers, device))
        train_x, train_y, val_x, val_y = cached[cfg.pool]
        if kind == "knn":
            scores = probe.knn_scores(train_x.to(device), train_y, val_x, classes, cfg.k, cfg.temperature)
        else:
            head = probe.train_linear_probe(train_x, train_y, classes, cfg, device)
            scores = probe.head_scores(head, val_x, device)
        out[kind] = _correct(scores, val_y)
    return out


@torch.no_grad()
def classifier_scores(export: str, weights: str, data: EvalData, cfg: FinetuneConfig,
                      device: torch.device) -> np.ndarray:
    """(held-out images,) bool correctness of the classifier `pretraining.evaluate finetune` wrote
    (`weights`: its model/model.safetensors), rebuilt on the architecture of the export it started from."""
    model = load_timm_model(export, weights, num_classes=len(data.class_names), global_pool=cfg.global_pool,
                            img_size=cfg.img_size).to(device).eval()
    transform = create_transform(**model_data_config(model), is_training=False)
    loader = DataLoader(ClassificationSet(data.val, transform), 64, num_workers=cfg.num_workers,
                        pin_memory=device.type == "cuda")
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")
    hits = []
    for images, labels in loader:
        with autocast:
            logits = model(images.to(device, non_blocking=True))
        hits.append(_correct(logits.float(), labels))
    return np.concatenate(hits)

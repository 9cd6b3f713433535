"""What the study measures of one pretrained model, on held-out scenes of the appearance task.

Label-independent (the class is the largest object's texture, which the label maps cannot tell;
dataset_card/synthetic/scenes.py), so they can rank the arms:
  linear        linear probe on the mean-pooled patch tokens (frozen encoder)
  knn           weighted k-NN on the same features
  finetune      a short end-to-end fine-tune of the encoder with a linear head (the paper's protocol, short)
  texture_miou  per-patch linear probe of each object pixel's texture: a dense task no arm trains on
Label-informed (the label maps carry them, so label-reading arms are trained on them; they rank nothing):
  linear_shape  linear probe of the largest object's shape (the old image class)
  miou          per-patch linear probe of the semantic classes
And attn_objects (the class token's last-block attention on the objects) and, for models with an
instance head, instance_loss and instance_constant: the held-out instance loss and the loss of the
best constant predictor on the same targets, and instance_share: the instance term's share of the
gradient (pretraining.study.instance_head).
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch
import torch.nn.functional as F

from dataset_card.contract import codecs
from dataset_card.synthetic.scenes import APPEARANCE_FILE, APPEARANCES, SEMANTIC_CLASSES, STUFF


def read_probe_split(path: str) -> dict[str, torch.Tensor]:
    """images (N, 3, S, S) normalised; label (N,) appearance class; shape (N,) the largest object's shape;
    semantic (N, S, S); instance_ids (N, S, S); appearance (N, S, S) texture per object pixel, -1 on stuff;
    objects and target (N, S, S) bool (any object, the largest one)."""
    from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

    rows = pq.read_table(next(Path(path, "data").glob("train-*.parquet"))).to_pylist()
    images = np.stack([codecs.decode_image(r["image"]["bytes"]) for r in rows])
    semantic = np.stack([codecs.decode_mask(r["semantic_mask"]["bytes"]) for r in rows])
    ids = np.stack([codecs.decode_mask(r["instance_mask"]["bytes"]) for r in rows]).astype(np.int64)
    largest = [max(r["instances"], key=lambda inst: inst["area"]) for r in rows]
    mean, std = torch.tensor(IMAGENET_DEFAULT_MEAN).view(1, 3, 1, 1), torch.tensor(IMAGENET_DEFAULT_STD).view(1, 3, 1, 1)
    return {"images": (torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255 - mean) / std,
            "label": torch.tensor([r["label"] for r in rows]),
            "shape": torch.tensor([inst["category_id"] - len(STUFF) for inst in largest]),
            "semantic": torch.from_numpy(semantic).long(), "instance_ids": torch.from_numpy(ids),
            "appearance": torch.from_numpy(np.load(Path(path, APPEARANCE_FILE)).astype(np.int64)),
            "objects": torch.from_numpy(ids > 0),
            "target": torch.from_numpy(np.stack([ids[i] == inst["id"] for i, inst in enumerate(largest)]))}


def _features(model, images: torch.Tensor, patch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean-pooled patch tokens (N, D), patch tokens (N, h, w, D)) of the frozen encoder, and the
    class token's last-block attention (N, h * w)."""
    from pretraining.study.attention import cls_attention

    model.eval()
    tokens, attn = [], []
    with torch.no_grad():
        for i in range(0, len(images), 256):
            x = images[i:i + 256]
            tokens.append(model.encode_rgb(x)[:, 1:])
            attn.append(cls_attention(model.encoder.rgb_input_tokens(x), model.encoder.blocks))
    tokens = torch.cat(tokens)
    h = images.shape[-1] // patch_size
    return tokens.reshape(len(tokens), h, h, -1), torch.cat(attn)


def finetune_accuracy(model, train: dict, val: dict, epochs: int, seed: int, lr: float = 1e-3,
                      batch_size: int = 64) -> float:
    """Top-1 (percent) on `val` of the encoder fine-tuned end to end with a linear head on mean-pooled
    patch tokens for `epochs` over `train` (AdamW, cosine, no layer decay or augmentation: a short protocol).
    Works on a copy: `model` is left as it was."""
    import copy

    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    encoder = copy.deepcopy(model.encoder).train()
    head = torch.nn.Linear(model.cfg.embed_dim, len(APPEARANCES))
    params = [*encoder.parameters(), *head.parameters()]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.05)
    steps = epochs * max(1, len(train["images"]) // batch_size)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, max(1, steps))
    for _ in range(epochs):
        order = torch.randperm(len(train["images"]), generator=generator)
        for i in range(0, len(order) - batch_size + 1, batch_size):
            idx = order[i:i + batch_size]
            logits = head(encoder.encode_rgb(train["images"][idx])[:, 1:].mean(1))
            loss = F.cross_entropy(logits, train["label"][idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
    encoder.eval()
    with torch.no_grad():
        preds = torch.cat([head(encoder.encode_rgb(val["images"][i:i + 256])[:, 1:].mean(1)).argmax(1)
                           for i in range(0, len(val["images"]), 256)])
    return 100.0 * (preds == val["label"]).float().mean().item()


def instance_losses(model, val: dict, seed: int) -> dict[str, float]:
    """Held-out instance loss of a model with an instance head, the best constant predictor's on the
    same targets and masks (random masking's end of the curriculum), and the instance term's share of
    the gradient (`pretraining.study.instance_head`); {} for models without one."""
    from pretraining.models.instances import instance_representation
    from pretraining.study.instance_head import measure_instance_head

    if "instance" not in model.cfg.modalities:
        return {}
    ids = val["instance_ids"]
    batch = {"rgb": val["images"], "semantic": val["semantic"], "instance_ids": ids,
             "instance": instance_representation(ids, model.cfg.offset_unit_pixels, int(ids.max()))}
    reading = measure_instance_head(model, [batch], torch.Generator().manual_seed(seed))
    return {"instance_loss": reading.head, "instance_constant": reading.constant,
            "instance_share": reading.grad_shares["instance"]}


def probe(model, train: dict, val: dict, patch_size: int, seed: int, probe_epochs: int, patch_probe_epochs: int,
          finetune_epochs: int) -> dict[str, float]:
    """Every measure of the module docstring, in percent (losses as they are)."""
    from pretraining.evaluation.probe import knn_accuracy, linear_probe_accuracy, linear_probe_tiny
    from pretraining.study.attention import attention_mass, patch_fraction
    from pretraining.study.patch_probe import PatchProbeConfig, patch_probe_miou

    patches_train, _ = _features(model, train["images"], patch_size)
    patches_val, attn_val = _features(model, val["images"], patch_size)
    avg_train, avg_val = patches_train.flatten(1, 2).mean(1), patches_val.flatten(1, 2).mean(1)
    lin = replace(linear_probe_tiny(), epochs=probe_epochs, warmup_epochs=min(5, probe_epochs // 2), seed=seed)
    dense = PatchProbeConfig(epochs=patch_probe_epochs, seed=seed)
    return {
        "linear": linear_probe_accuracy(avg_train, train["label"], avg_val, val["label"], lin),
        "knn": knn_accuracy(avg_train, train["label"], avg_val, val["label"], k=20),
        "finetune": finetune_accuracy(model, train, val, finetune_epochs, seed) if finetune_epochs else float("nan"),
        "texture_miou": patch_probe_miou(patches_train, train["appearance"], patches_val, val["appearance"],
                                         len(APPEARANCES), dense),
        "linear_shape": linear_probe_accuracy(avg_train, train["shape"], avg_val, val["shape"], lin),
        "miou": patch_probe_miou(patches_train, train["semantic"], patches_val, val["semantic"],
                                 len(SEMANTIC_CLASSES), dense),
        "attn_objects": 100 * attention_mass(attn_val, patch_fraction(val["objects"], patch_size)).mean().item(),
        **instance_losses(model, val, seed),
    }

"""Does the instance head predict anything its input tells it? Its loss beside the best constant's.

A head that learned nothing input-dependent can at best output one fixed patch of values for every
masked patch (`losses.best_constant_instance_prediction`: the boundary rate's logit per pixel, the
weighted median of each offset). `measure_instance_head` scores the model's instance predictions and
that constant on the same held-out masked patches, and each loss term's share of the gradient on
the encoder's output (what `term_gradient_norms` gives the trainer's `grad_share/*` logs):

    reading = measure_instance_head(model, batches, torch.Generator().manual_seed(0))
    reading.instance_minus_constant  # constant's loss - head's loss: > 0 the head beats the constant

The constant is fitted on the very patches it is scored on (the best any constant could do there),
so a positive difference is not luck of the split.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

from dataset_card.synthetic.scenes import render_scene
from pretraining.models import losses
from pretraining.models.instances import instance_representation


@dataclass(frozen=True)
class InstanceHeadReading:
    head: float  # the model's instance loss on the held-out masked patches
    constant: float  # the best input-independent prediction's instance loss on the same patches
    instance_minus_constant: float  # constant - head: > 0 when the head beats the constant (higher is better)
    grad_shares: dict[str, float]  # modality -> its weighted term's share of the gradient on the encoder output
    samples: int  # held-out samples scored

    @property
    def relative(self) -> float:
        """`instance_minus_constant` as a fraction of the constant's loss (0: no better than a constant)."""
        return self.instance_minus_constant / self.constant if self.constant else 0.0


def measure_instance_head(model, batches: Iterable[dict[str, torch.Tensor]], generator: torch.Generator | None = None,
                          progress: float = 1.0) -> InstanceHeadReading:
    """The instance head's loss, the best constant's, and their difference on held-out `batches`.

    model: a `MaskedAutoencoder` with an "instance" modality. batches: dicts of docs/model.md's layout
    ("rgb", "semantic", "instance", "instance_ids"); a batch without "visible" is masked here by
    `model.mask_batch(batch, generator, progress)` (progress 1.0: the curriculum's last phase, random
    masking, by default). Both losses use the model's `loss_reduction` over all batches pooled, the
    constant fitted on that pool (both with the model's `instance_offset_loss`). Gradient shares: the mean over batches of each term's gradient norm
    (`term_gradient_norms`, weights included), as shares of their sum. The model is left in the
    training mode it came in; its parameters get no gradients.
    """
    if "instance" not in model.cfg.modalities:
        raise ValueError(f"{model.cfg.arch or 'This model'} predicts no instance modality "
                         f"({model.cfg.modalities}); measure the instance head of a C2FMAE or MultiMAE model.")
    was_training = model.training
    model.eval()
    predictions, targets, masked, norms = [], [], [], []
    try:
        for batch in batches:
            if "visible" not in batch:
                if generator is None:
                    raise ValueError("The held-out batches carry no masks; pass a torch.Generator to draw them.")
                batch = model.mask_batch(batch, generator, progress)
            with torch.no_grad():
                out = model(batch)
            predictions.append(out.predictions["instance"].float())
            targets.append(batch["instance"].float())
            masked.append(~model.visible_mask(out)["instance"])
            norms.append(model.term_gradient_norms(batch).float())
    finally:
        model.train(was_training)
    if not predictions:
        raise ValueError("No held-out batches were given; pass at least one batch of scenes.")
    P, reduction = model.cfg.patch_size, model.cfg.loss_reduction
    offset_loss = getattr(model.cfg, "instance_offset_loss", "l1")
    pred, target, mask = torch.cat(predictions), torch.cat(targets), torch.cat(masked)
    head = float(losses.instance_loss(pred, target, mask, P, reduction, offset_loss))
    constant = float(losses.constant_instance_loss(target, mask, P, reduction, offset_loss))
    mean_norms = torch.stack(norms).mean(0)
    shares = (mean_norms / mean_norms.sum().clamp(min=1e-30)).tolist()
    return InstanceHeadReading(head, constant, constant - head, dict(zip(model.cfg.modalities, shares)), len(pred))


def scene_batch(n: int, size: int, seed: int, patch: int) -> dict[str, torch.Tensor]:
    """n procedural scenes (the ablation's, `dataset_card.synthetic.scenes`) as a pretraining batch:
    ImageNet-normalised RGB, semantic map, instance ids and their representation at `patch`."""
    rng = np.random.default_rng([seed, 0])
    scenes = [render_scene(rng, size, target=i % 6) for i in range(n)]
    ids = torch.zeros(n, size, size, dtype=torch.long)
    for b, scene in enumerate(scenes):
        for i, mask in enumerate(scene.masks):
            ids[b][torch.from_numpy(mask)] = i + 1
    rgb = torch.from_numpy(np.stack([s.rgb for s in scenes])).permute(0, 3, 1, 2).float() / 255
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in (IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD))
    return {"rgb": (rgb - mean) / std, "semantic": torch.from_numpy(np.stack([s.semantic for s in scenes])).long(),
            "instance_ids": ids, "instance": instance_representation(ids, offset_unit=patch)}

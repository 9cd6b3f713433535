"""One rank's batch on the device: the workers' chunks joined, normalised, and masked (`Batch.to`).

Everything derived from the cropped maps runs here, batched: the semantic ignore value becomes -1,
the instance representation, and each sample's strategy and visible tokens from the random numbers
the workers drew (`assemble_visible`, the masking assembly the model's own path calls too). Nothing
waits for the device (docs/training.md).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

from pretraining.data.samples import HOST_KEYS, SampleSpec
from pretraining.models.curriculum import curriculum_weights
from pretraining.models.instances import instance_representation
from pretraining.models.masking import assemble_visible

_NORMALISATION: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}


def _normalisation(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """ImageNet's mean and std as (1, 3, 1, 1) tensors on `device`, made once per device (a copy from
    the host waits for the device, so it is not done per batch)."""
    if device not in _NORMALISATION:
        _NORMALISATION[device] = tuple(torch.tensor(v, device=device).view(1, 3, 1, 1)
                                       for v in (IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD))
    return _NORMALISATION[device]


@dataclass
class Batch:
    epoch: int
    step: int
    chunks: list[dict[str, torch.Tensor]]
    spec: SampleSpec
    instance_max: int | None = None  # the largest instance id of the batch, read on the host (None: unknown)

    def moved(self, device: torch.device) -> Batch:
        """This batch with its chunks copied to `device` as they are (compact dtypes; asynchronous from
        pinned memory): what `DevicePrefetcher` does on a side stream while the previous batch computes."""
        chunks = [{k: v if k in HOST_KEYS else v.to(device, non_blocking=True) for k, v in c.items()}
                  for c in self.chunks]
        return Batch(self.epoch, self.step, chunks, self.spec, self.instance_max)

    def to(self, device: torch.device, weights: Sequence[float] | torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """The batch dict of docs/model.md on `device`. Chunks are moved in their compact dtypes and
        joined there; then, batched on the device (cheap on a GPU, and off the loader workers): RGB is
        normalised, label maps widened to int64, the instance representation computed from the id
        maps, and the masking draws turned into each sample's strategy (under the curriculum `weights`
        (w_sem, w_inst, w_rand) the trainer gives for this step; by default the scheduled weights at
        the start of this epoch) and visible tokens (with patch-majority labels for the guided
        strategies the weights can draw), through `assemble_visible`. Adds "visible" (B, V), "strategy"
        (as used) and "strategy_requested" (B,).

        Nothing here waits for the device: label ranges come from the contract (semantic ids are below
        the ignore value) and the loader (`instance_max`), and host values go over asynchronously."""
        spec = self.spec
        moved = self.moved(device).chunks  # a no-op for chunks already there (`DevicePrefetcher`)
        batch = {k: torch.cat([c[k] for c in moved]) for k in moved[0] if k not in HOST_KEYS}
        mean, std = _normalisation(device)
        batch["rgb"] = (batch["rgb"].float() / 255 - mean) / std  # (B, 3, S, S)
        for key in ("semantic", "instance_ids"):
            if key in batch:
                batch[key] = batch[key].long()
        if "semantic" in batch:
            batch["semantic"] = batch["semantic"].masked_fill(batch["semantic"] == spec.ignore_value, -1)  # (B, S, S)
        if "instance_ids" in batch:
            batch["instance"] = instance_representation(batch["instance_ids"], spec.instance_offset_unit,
                                                        self.instance_max)  # (B, 3, S, S)
        if weights is None:
            weights = curriculum_weights(self.epoch / spec.epochs, spec.masking.curriculum)
        # The label maps are in the batch when the spec reads masks (`make_sample`).
        batch["visible"], batch["strategy"], batch["strategy_requested"] = assemble_visible(
            batch.pop("strategy_key"), batch.pop("proportions"), batch.pop("keys"), weights,
            batch.get("semantic"), batch.get("instance_ids"), spec.masking, spec.patch_size,
            semantic_range=(-1, spec.ignore_value - 1),
            instance_range=None if self.instance_max is None else (0, self.instance_max))
        return batch

"""One sample, in a loader worker: a raw row -> decoded, jointly cropped maps and the masking's draws.

`make_sample` decodes with the contract's codecs, checks the maps against the image and metadata's
taxonomy, crops and flips the three maps jointly and draws the masking's random numbers from the
sample's own seed. `collate` stacks a worker's chunk;
`pretraining.data.batch.Batch` finishes it on the device.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import torch

from dataset_card.contract import codecs
from dataset_card.contract.schema import TRAINING_COLUMNS
from pretraining.data.augment import AugmentConfig, augment, sample_seeds
from pretraining.models.masking import MaskingConfig, draw_masking


class DataError(ValueError):
    """The dataset on disk cannot be used for training (missing, empty, wrong schema, too small, a bad row)."""


@dataclass(frozen=True)
class SampleSpec:
    """Everything that turns a decoded row into a training sample (all of it from the model and config)."""

    img_size: int
    patch_size: int
    modalities: tuple[str, ...]
    masking: MaskingConfig
    augment: AugmentConfig
    ignore_value: int
    seed: int
    epochs: int
    instance_offset_unit: int | None = None  # pixels per unit of the instance offsets; None: the image size
    num_semantic_classes: int | None = None  # metadata's taxonomy: other ids (but the ignore value) are refused

    @property
    def semantic_dtype(self) -> type:
        """What a cropped semantic map travels as: uint8 for 8-bit taxonomies (as stored), else int32."""
        return np.uint8 if self.ignore_value < 256 else np.int32

    @property
    def reads_masks(self) -> bool:
        """Label maps are read when the model takes them as inputs, or when they guide its masking."""
        return len(self.modalities) > 1 or self.masking.guided

    @property
    def columns(self) -> tuple[str, ...]:
        return TRAINING_COLUMNS if self.reads_masks else ("image", "label")


def make_sample(row: dict, index: int, epoch: int, spec: SampleSpec, transform) -> dict[str, torch.Tensor]:
    """One raw row (encoded bytes + label) -> one sample of a loader chunk: rgb (3, S, S) uint8, label,
    index, semantic (S, S) and instance_ids (S, S) (models that read masks), and the masking draws
    (strategy_key, proportions (M,), keys (K, N)). `Batch.to` finishes the batch on the device.
    """
    augment_seed, masking_seed = sample_seeds(spec.seed, epoch, index)
    rgb = image_tensor(row["image"])
    height, width = rgb.shape[-2:]
    semantic = instance = None
    if spec.reads_masks:
        # As stored (uint8 / uint16): the crop comes before any widening.
        semantic = codecs.decode_mask(row["semantic_mask"], dtype=None)
        instance = codecs.decode_mask(row["instance_mask"], dtype=None)
        if semantic.shape != (height, width) or instance.shape != (height, width):
            raise DataError(f"the image is {(height, width)} but its masks are {semantic.shape} and "
                            f"{instance.shape}; the shard breaks the contract, relabel it.")
        check_taxonomy(semantic, spec.num_semantic_classes, spec.ignore_value)
    sample = {"label": int(row["label"]), "index": index}  # plain ints: collate makes one tensor of each
    image, semantic_c, instance_c = augment(rgb, semantic, instance, transform, augment_seed)
    sample["rgb"] = image  # (3, S, S) uint8: normalised by Batch.to on the device (4x fewer bytes than float)
    if spec.reads_masks:
        # Label maps travel in the smallest dtype that holds them, the same for every row (the ignore
        # value is the largest semantic value); Batch.to makes them int64 and the ignore value -1.
        sample["semantic"] = torch.from_numpy(semantic_c.astype(spec.semantic_dtype, copy=False))  # (S, S)
        # The (3, S, S) instance representation is computed from these by Batch.to, batched on the device.
        sample["instance_ids"] = torch.from_numpy(instance_c.astype(np.int32))  # (S, S), ids < 2**16
        # Its largest id, known here on the host for free: it sizes the device's count tables (no sync there).
        sample["instance_max"] = int(instance_c.max(initial=0))
    # The masking's random numbers; Batch.to turns them into visible tokens, batched on the device.
    draws = draw_masking(np.random.default_rng(masking_seed), spec.masking, len(spec.modalities))
    sample.update({k: torch.from_numpy(np.asarray(v)) for k, v in draws.items()})  # strategy_key, proportions, keys
    return sample


def check_taxonomy(semantic: np.ndarray, num_classes: int | None, ignore_value: int) -> None:
    """Refuse a semantic map (H, W) with ids outside metadata's `num_classes` classes (the ignore value
    aside), before they reach the model's class embedding. One max over the map; a second pass only
    when the max is out of range (as it is whenever the map has ignore pixels)."""
    if num_classes is None or semantic.size == 0 or int(semantic.max()) < num_classes:
        return
    outside = semantic[(semantic >= num_classes) & (semantic != ignore_value)]
    if outside.size:
        ids = np.unique(outside)
        raise DataError(f"semantic ids {ids[:5].tolist()} lie outside metadata.json's {num_classes} classes "
                        f"(0..{num_classes - 1}, ignore {ignore_value}); the shard was labeled with another "
                        "taxonomy than the folder's metadata.json: relabel it, or restore the metadata it was "
                        "labeled with.")


def image_tensor(data: bytes) -> torch.Tensor:
    """Encoded image -> (C, H, W) uint8 whose first three channels are the contract's RGB pixels
    (`codecs.decode_image`'s). C = 4: PIL's own pixel buffer, which stores RGB in 4 bytes a pixel,
    read through its Arrow export without a copy (`decode_image` copies the whole image twice, and
    a tensor of it needs a third); the crop reads three channels of four at the speed of three.
    C = 3 for an image too large for PIL's one-block buffer (its rows are not contiguous)."""
    img = codecs.rgb_image(data)
    try:
        pixels = torch.from_dlpack(pa.array(img).flatten()).view(img.height, img.width, 4)  # (H, W, 4)
    except ValueError:
        pixels = torch.from_numpy(np.require(np.asarray(img), requirements=("C", "W")))  # (H, W, 3)
    return pixels.permute(2, 0, 1)


HOST_KEYS = ("instance_max",)  # chunk entries Batch.to reads on the host


def collate(samples: Sequence[dict[str, torch.Tensor | int]]) -> dict[str, torch.Tensor]:
    """Stack each key (ints become one int64 tensor)."""
    def stacked(key: str) -> torch.Tensor:
        values = [s[key] for s in samples]
        return torch.tensor(values, dtype=torch.int64) if isinstance(values[0], int) else torch.stack(values)

    return {key: stacked(key) for key in samples[0]}

"""Coverage: what instance-guided masking will see of each labeled image, measured where labels are made.

Per image (`measure`, from its `instances` and `instance_mask`; the labeler, a shard update and
`repaint` all call it, and the shard statistics sum it):

- painted objects: the instance ids that have pixels in `instance_mask`;
- instance regions at the trainer's patch grid: the map resized whole to `IMG_SIZE` x `IMG_SIZE`
  with nearest-exact sampling (as the trainer resizes label maps: `pretraining/data/augment.py`),
  cut into `PATCH_SIZE` patches, each patch taking its most frequent id (ties to the smaller id;
  0 = no instance), and the distinct ids >= 1 among the patches counted: the regions
  `pretraining/models/masking.py` (`patch_majority`, `guided_masked`) forms. Instance-guided masking
  needs at least `MIN_REGIONS` and falls back to random masking below that. This package does not
  import the trainer's code; `tests/test_coverage.py` checks the two agree. The whole image is the
  trainer's crop of scale 1: its random crops (scale 0.2 to 1) show part of it, usually with fewer
  regions;
- the level of the largest mask SAM kept (id 1: ids are numbered by area): "object" when it is
  painted, "object_agnostic" when it is painted as an object the taxonomy has no class for (rule
  "salient"), "stuff" or "dropped" when the image's biggest segment is no painted object, "none"
  when the image kept no mask.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

# The base recipe's input (c2fmae_vit_base_patch16 at 224 px): a 14 x 14 patch grid.
IMG_SIZE = 224
PATCH_SIZE = 16
MIN_REGIONS = 2  # instance-guided masking's minimum (pretraining/models/masking.py `guided_masked`)
# Histogram bins of painted objects and regions per image: [0,1), [1,2), ..., [50, inf).
COUNT_EDGES = (0, 1, 2, 3, 4, 5, 10, 20, 50, 10**9)
LARGEST_LEVELS = ("object", "object_agnostic", "part", "stuff", "dropped", "none")


@dataclass(frozen=True)
class RowCoverage:
    painted: int  # instance ids with pixels in the map
    regions: int  # distinct instance ids among the patch-grid majorities
    largest: str  # level of the largest kept mask, or "none"


def nearest_exact_index(length: int, size: int) -> np.ndarray:
    """(size,) int64 source pixel of each output pixel when `length` pixels are resized to `size` by
    torch's `nearest-exact` mode (float32 scale, the product rounded to float32, then floored)."""
    scale = np.float64(np.float32(length) / np.float32(size))
    source = np.floor(((np.arange(size) + 0.5) * scale).astype(np.float32)).astype(np.int64)
    return np.minimum(source, length - 1)


def patch_ids(instance_map: np.ndarray, img_size: int = IMG_SIZE, patch_size: int = PATCH_SIZE) -> np.ndarray:
    """(H, W) instance ids -> (img_size // patch_size) ** 2 int64: each patch's most frequent id (ties
    to the smaller), patches row-major, after resizing the map to img_size x img_size."""
    H, W = instance_map.shape
    small = instance_map[nearest_exact_index(H, img_size)][:, nearest_exact_index(W, img_size)].astype(np.int64)
    g, P = img_size // patch_size, patch_size
    patches = small[: g * P, : g * P].reshape(g, P, g, P).transpose(0, 2, 1, 3).reshape(g * g, P * P)
    values, inverse = np.unique(patches, return_inverse=True)  # ids in this image only: a small table
    cells = np.arange(g * g)[:, None] * len(values) + inverse.reshape(g * g, P * P)
    counts = np.bincount(cells.ravel(), minlength=g * g * len(values)).reshape(g * g, len(values))
    return values[counts.argmax(axis=1)]  # argmax takes the first maximum: the smaller id


def regions(instance_map: np.ndarray, img_size: int = IMG_SIZE, patch_size: int = PATCH_SIZE) -> int:
    """Distinct instance ids (>= 1) among the patch-grid majorities of `instance_map`."""
    ids = patch_ids(instance_map, img_size, patch_size)
    return int(np.unique(ids[ids > 0]).size)


def measure(instances: Sequence[Mapping], instance_map: np.ndarray) -> RowCoverage:
    """One labeled image's coverage (see the module doc); `instances` in id order, with their levels."""
    ids = np.zeros(1, np.int64)
    for y in range(0, instance_map.shape[0], 512):  # row slices: an 8000 x 8000 map is never copied whole
        counts = np.bincount(instance_map[y : y + 512].ravel())
        ids = np.pad(ids, (0, max(0, counts.size - ids.size))) + np.pad(counts, (0, max(0, ids.size - counts.size)))
    painted = int(np.count_nonzero(ids[1:]))
    largest = str(instances[0]["level"]) if instances else "none"
    return RowCoverage(painted, regions(instance_map), largest)


def histogram(values: Sequence[int], edges: Sequence[int] = COUNT_EDGES) -> list[int]:
    """Counts of `values` in the bins [edges[i], edges[i + 1])."""
    return np.histogram(np.asarray(values, np.int64), bins=np.asarray(edges, np.int64))[0].tolist()

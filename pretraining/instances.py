"""Instance masks as a dense, permutation-invariant input and target.

Instance ids carry no meaning across images (id 3 is a dog here and a cup there), so the model
never sees them. `instance_representation` turns an id map into what an id map *means*: where the
object boundaries are, and for each pixel where its object's centre is. Renumbering the ids leaves
the output unchanged. It is a pure function of CPU tensors, run in the data loader after cropping
(the crop changes boundaries and centres). See docs/model.md for the alternatives considered.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

NUM_CHANNELS = 3  # boundary, dy, dx


def instance_boundaries(instance_map: torch.Tensor) -> torch.Tensor:
    """Pixels of an instance that touch a different id (another instance or no instance).

    instance_map: (H, W) int64, 0 = no instance.  Returns (H, W) bool.
    The image border is not a boundary: the object may continue outside the crop.
    """
    ids = instance_map
    # Compare with the 4 neighbours; replicate padding makes the image border never differ.
    padded = F.pad(ids[None, None].float(), (1, 1, 1, 1), mode="replicate")[0, 0]  # (H+2, W+2)
    centre = padded[1:-1, 1:-1]
    differs = (
        (padded[:-2, 1:-1] != centre)
        | (padded[2:, 1:-1] != centre)
        | (padded[1:-1, :-2] != centre)
        | (padded[1:-1, 2:] != centre)
    )
    return differs & (ids != 0)


def instance_offsets(instance_map: torch.Tensor) -> torch.Tensor:
    """Offset from each pixel to the centre of mass of its instance, in units of the image size.

    instance_map: (H, W) int64, 0 = no instance.  Returns (2, H, W) float32 (dy / H, dx / W),
    each in [-1, 1]; zero where the id is 0.
    """
    H, W = instance_map.shape
    _, dense = torch.unique(instance_map, return_inverse=True)  # (H, W) ids -> 0..K-1
    dense = dense.flatten()
    grid = [torch.arange(n, dtype=torch.float32, device=instance_map.device) for n in (H, W)]
    ys, xs = torch.meshgrid(*grid, indexing="ij")  # (H, W) each
    count = torch.bincount(dense).float()  # (K,)
    cy = torch.bincount(dense, weights=ys.flatten()) / count  # (K,) centre row of each id
    cx = torch.bincount(dense, weights=xs.flatten()) / count  # (K,)
    dy = (cy[dense] - ys.flatten()) / H  # (H*W,)
    dx = (cx[dense] - xs.flatten()) / W
    offsets = torch.stack([dy, dx]).view(2, H, W).float()
    return offsets * (instance_map != 0)


def instance_representation(instance_map: torch.Tensor) -> torch.Tensor:
    """Dense permutation-invariant encoding of an instance id map.

    instance_map: (H, W) integer ids, 0 = no instance.
    Returns (3, H, W) float32: channel 0 the boundary map in {0, 1}; channels 1-2 the offset
    (dy / H, dx / W) from each pixel to its instance's centre of mass, in [-1, 1]. All zero where
    the id is 0.
    """
    if instance_map.dim() != 2:
        raise ValueError(f"instance_representation takes one (H, W) id map, got shape {tuple(instance_map.shape)}.")
    instance_map = instance_map.long()
    boundary = instance_boundaries(instance_map).float()[None]  # (1, H, W)
    return torch.cat([boundary, instance_offsets(instance_map)])  # (3, H, W)

"""Instance masks as a dense, permutation-invariant input and target.

Instance ids carry no meaning across images (id 3 is a dog here and a cup there), so the model
never sees them. `instance_representation` turns an id map into what an id map *means*: where the
object boundaries are, and for each pixel where its object's centre is. Renumbering the ids leaves
the output unchanged. It is a pure function, computed after cropping (the crop changes boundaries
and centres): the trainer runs it batched on the device from the loader's cropped id maps. See docs/model.md for the alternatives considered.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

NUM_CHANNELS = 3  # boundary, dy, dx


def instance_boundaries(instance_map: torch.Tensor) -> torch.Tensor:
    """Pixels of an instance that touch a different id (another instance or no instance).

    instance_map: (..., H, W) integer ids, 0 = no instance.  Returns (..., H, W) bool.
    The image border is not a boundary: the object may continue outside the crop.
    """
    *lead, H, W = instance_map.shape
    ids = instance_map.reshape(-1, 1, H, W)
    # Compare with the 4 neighbours; replicate padding makes the image border never differ.
    padded = F.pad(ids.float(), (1, 1, 1, 1), mode="replicate")[:, 0]  # (B, H+2, W+2), ids < 2**24 exact
    centre = padded[:, 1:-1, 1:-1]
    differs = (
        (padded[:, :-2, 1:-1] != centre)
        | (padded[:, 2:, 1:-1] != centre)
        | (padded[:, 1:-1, :-2] != centre)
        | (padded[:, 1:-1, 2:] != centre)
    )
    return (differs & (ids[:, 0] != 0)).reshape(*lead, H, W)


def _dense_keys(ids: torch.Tensor, max_id: int | None) -> tuple[torch.Tensor, int]:
    """One key per (image, id) of a (B, H*W) batch of id maps, in 0..K-1: ((B, H*W) int64, K).

    With the largest id known (`max_id`, from the loader) and not too sparse, the key is
    image * (max_id + 1) + id; else each image's ids are renumbered by rank (a sort). Both are
    fixed-shape: no value is read back to the host.
    """
    B, HW = ids.shape
    if max_id is not None and B * (max_id + 1) <= max(4 * ids.numel(), 1 << 20):
        return ids + torch.arange(B, device=ids.device)[:, None] * (max_id + 1), B * (max_id + 1)
    sorted_ids, order = ids.sort(dim=1)
    new = torch.ones_like(sorted_ids, dtype=torch.bool)
    new[:, 1:] = sorted_ids[:, 1:] != sorted_ids[:, :-1]
    rank = torch.empty_like(order).scatter_(1, order, new.long().cumsum(1) - 1)  # (B, H*W) in 0..H*W-1
    return rank + torch.arange(B, device=ids.device)[:, None] * HW, B * HW


def instance_offsets(instance_map: torch.Tensor, unit: float | None = None, max_id: int | None = None) -> torch.Tensor:
    """Offset from each pixel to the centre of mass of its instance, in units of `unit` pixels (the
    patch size, say) or, when None, of the image size.

    instance_map: (..., H, W) integer ids, 0 = no instance; max_id: an upper bound of the ids, when
    known (cheaper), else None.  Returns (..., 2, H, W) float32 (dy / unit, dx / unit), or
    (dy / H, dx / W) each in [-1, 1]; zero where the id is 0. Each map in a batch is its own image.
    """
    *lead, H, W = instance_map.shape
    ids = instance_map.reshape(-1, H * W).long()  # (B, H*W)
    B = ids.shape[0]
    key, K = _dense_keys(ids, max_id)
    key = key.flatten()  # (B*H*W,)
    ys = torch.arange(H, device=ids.device).view(1, H, 1).expand(B, H, W).flatten()
    xs = torch.arange(W, device=ids.device).view(1, 1, W).expand(B, H, W).flatten()
    # Sums into fixed-size bins (index_add_, not bincount, whose output size is read from the data);
    # integer coordinates sum exactly, so the centres do not depend on the order of the additions.
    sums = torch.zeros(3, K, dtype=torch.int64, device=ids.device)
    sums[0].index_add_(0, key, torch.ones_like(key))
    sums[1].index_add_(0, key, ys)
    sums[2].index_add_(0, key, xs)
    count = sums[0].clamp(min=1).double()  # keys of no pixel get 0 / 1, never read
    cy, cx = (sums[1] / count).float(), (sums[2] / count).float()  # (K,) centre of each (image, id)
    dy = (torch.take(cy, key).view(B, H, W) - ys.view(B, H, W)) / (unit or H)  # (B, H, W)
    dx = (torch.take(cx, key).view(B, H, W) - xs.view(B, H, W)) / (unit or W)
    offsets = torch.stack([dy, dx], dim=1)  # (B, 2, H, W)
    return (offsets * (ids.view(B, 1, H, W) != 0)).reshape(*lead, 2, H, W)


def instance_representation(instance_map: torch.Tensor, offset_unit: float | None = None,
                            max_id: int | None = None) -> torch.Tensor:
    """Dense permutation-invariant encoding of an instance id map, or of a batch of them.

    instance_map: (H, W) or (B, H, W) integer ids, 0 = no instance; offset_unit: pixels per offset
    unit (the models use the patch size), None for the image size.
    Returns (3, H, W) or (B, 3, H, W) float32: channel 0 the boundary map in {0, 1}; channels 1-2
    the offset (dy, dx) from each pixel to its instance's centre of mass, in `offset_unit`s (or
    (dy / H, dx / W), in [-1, 1]). All zero where the id is 0. The batched form computes each map exactly as the single one does; the
    trainer uses it on the device, so data-loader workers only crop the id map. `max_id`: an upper
    bound of the ids when the caller knows one (the loader does); the result does not depend on it.
    Nothing is read back to the host.
    """
    if instance_map.dim() not in (2, 3):
        raise ValueError(f"instance_representation takes an (H, W) id map or a (B, H, W) batch, "
                         f"got shape {tuple(instance_map.shape)}.")
    instance_map = instance_map.long()
    boundary = instance_boundaries(instance_map).float().unsqueeze(-3)  # (..., 1, H, W)
    return torch.cat([boundary, instance_offsets(instance_map, offset_unit, max_id)], dim=-3)  # (..., 3, H, W)

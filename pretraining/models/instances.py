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


def instance_offsets(instance_map: torch.Tensor, unit: float | None = None) -> torch.Tensor:
    """Offset from each pixel to the centre of mass of its instance, in units of `unit` pixels (the
    patch size, say) or, when None, of the image size.

    instance_map: (..., H, W) integer ids, 0 = no instance.  Returns (..., 2, H, W) float32
    (dy / unit, dx / unit), or (dy / H, dx / W) each in [-1, 1]; zero where the id is 0. Each map in
    a batch is its own image.
    """
    *lead, H, W = instance_map.shape
    ids = instance_map.reshape(-1, H * W).long()  # (B, H*W)
    B = ids.shape[0]
    # One key per (image, id), so one bincount serves the whole batch.
    key = ids + torch.arange(B, device=ids.device)[:, None] * (int(ids.max()) + 1 if ids.numel() else 1)
    if key.numel() and int(key.max()) < 4 * key.numel():  # small ids (the usual case): keys index bins directly
        dense = key.flatten()
    else:  # ids up to 2**16 in a big batch: renumber the keys first (a sort; slower, bounded memory)
        dense = torch.unique(key, return_inverse=True)[1].flatten()  # (B*H*W,) in 0..K-1
    ys = torch.arange(H, dtype=torch.float32, device=ids.device).view(1, H, 1)
    xs = torch.arange(W, dtype=torch.float32, device=ids.device).view(1, 1, W)
    count = torch.bincount(dense).clamp(min=1)  # (K,); keys of no pixel get 0 / 1, never read
    cy = torch.bincount(dense, weights=ys.expand(B, H, W).flatten()) / count  # (K,) centre row of each (image, id)
    cx = torch.bincount(dense, weights=xs.expand(B, H, W).flatten()) / count  # (K,)
    dy = (torch.take(cy.float(), dense).view(B, H, W) - ys) / (unit or H)  # (B, H, W)
    dx = (torch.take(cx.float(), dense).view(B, H, W) - xs) / (unit or W)
    offsets = torch.stack([dy, dx], dim=1)  # (B, 2, H, W)
    return (offsets * (ids.view(B, 1, H, W) != 0)).reshape(*lead, 2, H, W)


def instance_representation(instance_map: torch.Tensor, offset_unit: float | None = None) -> torch.Tensor:
    """Dense permutation-invariant encoding of an instance id map, or of a batch of them.

    instance_map: (H, W) or (B, H, W) integer ids, 0 = no instance; offset_unit: pixels per offset
    unit (the models use the patch size), None for the image size.
    Returns (3, H, W) or (B, 3, H, W) float32: channel 0 the boundary map in {0, 1}; channels 1-2
    the offset (dy, dx) from each pixel to its instance's centre of mass, in `offset_unit`s (or
    (dy / H, dx / W), in [-1, 1]). All zero where the id is 0. The batched form computes each map exactly as the single one does; the
    trainer uses it on the device, so data-loader workers only crop the id map.
    """
    if instance_map.dim() not in (2, 3):
        raise ValueError(f"instance_representation takes an (H, W) id map or a (B, H, W) batch, "
                         f"got shape {tuple(instance_map.shape)}.")
    instance_map = instance_map.long()
    boundary = instance_boundaries(instance_map).float().unsqueeze(-3)  # (..., 1, H, W)
    return torch.cat([boundary, instance_offsets(instance_map, offset_unit)], dim=-3)  # (..., 3, H, W)

"""Which tokens the encoder sees: random, semantic-guided and instance-guided masking, and the
progressive curriculum that moves from one to the next during training.

Tokens of all modalities form one sequence in `MODALITIES` order, each modality a block of
`num_positions` patch positions (14 x 14 = 196 at 224 px, patch 16); token `m * N + p` is
position `p` of modality `m`. Every sample keeps exactly `num_visible` tokens, so batches stack.

All sampling functions are pure and take an explicit `torch.Generator`: the data loader calls
`sample_visible` once per sample with a generator seeded from (seed, epoch, index).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

MODALITIES = ("semantic", "instance", "rgb")
STRATEGIES = ("semantic", "instance", "random")  # strategy ids 0, 1, 2 in batches and logs
SEMANTIC, INSTANCE, RANDOM = 0, 1, 2
# Patch labels below these values belong to no region: -1 is the semantic ignore value, 0 is "no instance".
_FIRST_REGION_LABEL = {SEMANTIC: 0, INSTANCE: 1}


@dataclass(frozen=True)
class CurriculumConfig:
    """Strategy weights over training progress: semantic-guided, then instance-guided, then random.

    Each boundary is the centre of a linear transition `transition` wide, so with the defaults
    w_sem = 1 until 0.2 and 0 from 0.4; w_rand = 0 until 0.5 and 1 from 0.7.
    """

    semantic_until: float = 0.3  # centre of the semantic -> instance transition (progress in [0, 1])
    instance_until: float = 0.6  # centre of the instance -> random transition
    transition: float = 0.2  # width of each linear transition; 0 gives hard switches

    def __post_init__(self):
        half = self.transition / 2
        if not (half <= self.semantic_until and self.semantic_until + half <= self.instance_until - half
                and self.instance_until + half <= 1.0 + 1e-9):
            raise ValueError(
                "CurriculumConfig needs transition/2 <= semantic_until, semantic_until + transition <= "
                f"instance_until and instance_until + transition/2 <= 1, got {self}."
            )


@dataclass(frozen=True)
class MaskingConfig:
    strategy: str = "progressive"  # progressive | random | semantic | instance
    num_visible: int = 98  # encoder tokens per sample, over all modalities
    guided_mask_ratio: float = 0.75  # share of positions a guided strategy masks in every modality
    dirichlet_alpha: float = 1.0  # concentration of the per-sample split of `num_visible` over modalities
    num_positions: int = 196  # patch positions per modality, (img_size / patch_size) ** 2
    curriculum: CurriculumConfig = field(default_factory=CurriculumConfig)

    def __post_init__(self):
        if self.strategy not in ("progressive", *STRATEGIES):
            raise ValueError(f"Unknown masking strategy {self.strategy!r}; use progressive, random, semantic or instance.")
        if not 0.0 <= self.guided_mask_ratio < 1.0:
            raise ValueError(f"guided_mask_ratio must be in [0, 1), got {self.guided_mask_ratio}.")


def _ramp(x: float, centre: float, width: float) -> float:
    """0 before the transition, 1 after it, linear across it."""
    if width <= 0:
        return float(x >= centre)
    return min(1.0, max(0.0, (x - centre + width / 2) / width))


def curriculum_weights(progress: float, cfg: CurriculumConfig) -> tuple[float, float, float]:
    """(w_sem, w_inst, w_rand) at training progress in [0, 1]; they sum to 1.

    Monotone: w_sem never rises and w_rand never falls as progress grows.
    """
    progress = min(1.0, max(0.0, float(progress)))
    w_sem = 1.0 - _ramp(progress, cfg.semantic_until, cfg.transition)
    w_rand = _ramp(progress, cfg.instance_until, cfg.transition)
    return w_sem, 1.0 - w_sem - w_rand, w_rand


def patch_majority(label_map: torch.Tensor, patch_size: int) -> torch.Tensor:
    """Most frequent label of each patch (ties go to the smaller label).

    label_map: (H, W) integer labels, H and W multiples of patch_size.  Returns (h * w,) int64, row-major.
    """
    H, W = label_map.shape
    if H % patch_size or W % patch_size:
        raise ValueError(f"Label map of size {H}x{W} is not a multiple of the patch size {patch_size}.")
    h, w, P = H // patch_size, W // patch_size, patch_size
    patches = label_map.long().reshape(h, P, w, P).permute(0, 2, 1, 3).reshape(h * w, P * P)  # (N, P*P)
    low = int(patches.min())
    K = int(patches.max()) - low + 1  # label range
    if K * h * w <= 1 << 22:  # a (N, K) count table fits: count by direct indexing (no sort)
        values, dense = torch.arange(low, low + K, device=label_map.device), patches - low
    else:  # a wide id range: renumber the labels that occur first (a sort)
        values, dense = torch.unique(patches, return_inverse=True)  # dense: (N, P*P) in 0..K-1
        K = len(values)
    rows = torch.arange(h * w, device=label_map.device)[:, None] * K
    counts = torch.bincount((rows + dense).flatten(), minlength=h * w * K).view(h * w, K)  # (N, K)
    return values[counts.argmax(dim=1)]  # argmax picks the first maximum: the smallest label


def dirichlet_proportions(num_modalities: int, alpha: float, generator: torch.Generator) -> torch.Tensor:
    """One Dirichlet(alpha, ..., alpha) draw, (M,) float64. torch's sampler takes no generator, so
    the draw goes through numpy seeded from `generator`."""
    seed = int(torch.randint(0, 2**62, (1,), generator=generator))
    return torch.from_numpy(np.random.default_rng(seed).dirichlet([alpha] * num_modalities))


def split_budget(total: int, capacity: Sequence[int], proportions: torch.Tensor) -> torch.Tensor:
    """Split `total` tokens over modalities near `proportions`, exactly, and at most `capacity` each.

    capacity: (M,) tokens each modality can give; proportions: (M,) summing to 1. Returns (M,) int64.
    """
    capacity = torch.as_tensor(capacity, dtype=torch.int64)
    if int(capacity.sum()) < total:
        raise ValueError(f"Cannot keep {total} visible tokens out of {int(capacity.sum())} available.")
    share = proportions.double() * total
    counts = share.floor().long()
    remainder = total - int(counts.sum())
    counts[torch.argsort(share - counts, descending=True)[:remainder]] += 1  # largest remainders
    counts = torch.minimum(counts, capacity)
    while int(counts.sum()) < total:  # give what a full modality could not take to the one with most room
        counts[int(torch.argmax(capacity - counts))] += 1
    return counts


def random_visible(
    num_visible: int,
    num_modalities: int,
    num_positions: int,
    alpha: float,
    generator: torch.Generator,
    available: torch.Tensor | None = None,
) -> torch.Tensor:
    """MultiMAE's random masking: a Dirichlet split of the budget, uniform positions per modality.

    available: optional (N,) bool, positions that may be visible (the same in every modality).
    Returns (num_visible,) int64 sorted indices into the (M * N,) token sequence.
    """
    if available is None:
        available = torch.ones(num_positions, dtype=torch.bool)
    free = torch.nonzero(available).flatten()  # (F,)
    proportions = dirichlet_proportions(num_modalities, alpha, generator)
    counts = split_budget(num_visible, [len(free)] * num_modalities, proportions)
    picks = [m * num_positions + free[torch.randperm(len(free), generator=generator)[: int(k)]]
             for m, k in enumerate(counts)]
    return torch.sort(torch.cat(picks)).values


def guided_masked_positions(
    patch_labels: torch.Tensor,
    mask_ratio: float,
    max_masked: int,
    first_label: int,
    generator: torch.Generator,
) -> torch.Tensor | None:
    """Mask whole regions (positions sharing a patch-majority label) in random order.

    patch_labels: (N,) int64; labels below `first_label` belong to no region. Regions are masked
    until round(mask_ratio * N) positions (at most `max_masked`) are masked, the last one partially.
    Returns (N,) bool, True = masked in every modality; None when there are fewer than two regions.
    """
    regions = torch.unique(patch_labels[patch_labels >= first_label])
    if len(regions) < 2:
        return None
    N = len(patch_labels)
    target = min(round(mask_ratio * N), max_masked)
    masked = torch.zeros(N, dtype=torch.bool)
    for label in regions[torch.randperm(len(regions), generator=generator)]:
        room = target - int(masked.sum())
        if room <= 0:
            break
        positions = torch.nonzero(patch_labels == label).flatten()
        if len(positions) > room:  # the last region: a random part of it
            positions = positions[torch.randperm(len(positions), generator=generator)[:room]]
        masked[positions] = True
    return masked


def sample_visible(
    weights: Sequence[float],
    semantic_patches: torch.Tensor | None,
    instance_patches: torch.Tensor | None,
    cfg: MaskingConfig,
    num_modalities: int,
    generator: torch.Generator,
) -> tuple[torch.Tensor, int]:
    """Visible tokens of one sample and the strategy that chose them.

    weights: (w_sem, w_inst, w_rand), used when cfg.strategy is "progressive" (otherwise that
    strategy is forced). semantic_patches / instance_patches: (N,) patch-majority labels, or None
    (RGB-only models). A guided strategy without labels or with fewer than two regions falls back
    to random, and the returned id says so (2).
    Returns ((cfg.num_visible,) int64 sorted indices into the (M * N,) sequence, strategy id).
    """
    N = cfg.num_positions
    if cfg.strategy == "progressive":
        strategy = int(torch.multinomial(torch.tensor(weights, dtype=torch.float), 1, generator=generator))
    else:
        strategy = STRATEGIES.index(cfg.strategy)
    labels = {SEMANTIC: semantic_patches, INSTANCE: instance_patches}.get(strategy)
    masked = None
    if labels is not None:
        if len(labels) != N:
            raise ValueError(f"Got {len(labels)} patch labels for {N} positions per modality.")
        max_masked = N - math.ceil(cfg.num_visible / num_modalities)  # leave room for the visible budget
        masked = guided_masked_positions(labels, cfg.guided_mask_ratio, max_masked,
                                         _FIRST_REGION_LABEL[strategy], generator)
    if masked is None:
        strategy = RANDOM
        masked = torch.zeros(N, dtype=torch.bool)
    visible = random_visible(cfg.num_visible, num_modalities, N, cfg.dirichlet_alpha, generator, ~masked)
    return visible, strategy


# Token bookkeeping shared by the encoder and decoders.

def gather_tokens(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """x: (B, N, D), index: (B, V) -> (B, V, D)."""
    return torch.gather(x, 1, index[..., None].expand(-1, -1, x.shape[-1]))


def scatter_tokens(x: torch.Tensor, index: torch.Tensor, num_tokens: int, fill: torch.Tensor) -> torch.Tensor:
    """Put visible tokens back in place and `fill` everywhere else (the inverse of `gather_tokens`).

    x: (B, V, D), index: (B, V), fill: (D,) -> (B, num_tokens, D).
    """
    B, _, D = x.shape
    full = fill.to(x.dtype).expand(B, num_tokens, D)
    return full.scatter(1, index[..., None].expand(-1, -1, D), x)


def visible_to_masked(visible: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """visible: (B, V) indices -> (B, num_tokens) bool, True where the token is masked."""
    masked = torch.ones(visible.shape[0], num_tokens, dtype=torch.bool, device=visible.device)
    return masked.scatter(1, visible, False)

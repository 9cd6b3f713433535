"""Which tokens the encoder sees: random, semantic-guided and instance-guided masking, per sample
(the curriculum that chooses between them is in pretraining/models/curriculum.py).

Tokens of all modalities form one sequence in `MODALITIES` order, each modality a block of
`num_positions` patch positions (14 x 14 = 196 at 224 px, patch 16); token `m * N + p` is
position `p` of modality `m`. Every sample keeps exactly `num_visible` tokens, so batches stack.

Masking runs in two halves. `draw_masking` draws every random number one sample's masking needs
from that sample's own `numpy.random.Generator` (the loader seeds it from (seed, epoch, index)), in
a loader worker: a few microseconds. On the device, `assemble_visible` turns a batch of draws, the
step's curriculum weights and the label maps into each sample's strategy (`requested_strategy`) and
visible tokens (`patch_majority`, then `visible_tokens`), with batched tensor ops and no host sync.
It is the one assembly: the trainer's `Batch.to` and the model's own `MaskedAutoencoder.mask_batch`
(tests, benchmarks) both call it. So the masks are a function of each sample's seed and the step's
weights, wherever it is drawn, and the loader workers do no per-sample mask work.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from pretraining.models.curriculum import STRATEGIES, CurriculumConfig, choose_strategy

MODALITIES = ("semantic", "instance", "rgb")
SEMANTIC, INSTANCE, RANDOM = 0, 1, 2  # ids of `STRATEGIES` in batches and logs
# Patch labels below these values belong to no region: -1 is the semantic ignore value, 0 is "no instance".
_FIRST_REGION_LABEL = {SEMANTIC: 0, INSTANCE: 1}
GUIDED_MODES = ("whole", "within")
ALLOCATIONS = ("largest_remainder", "rounded")


@dataclass(frozen=True)
class MaskingConfig:
    strategy: str = "progressive"  # progressive (the curriculum chooses) | random | semantic | instance
    num_visible: int = 98  # encoder tokens per sample, over all modalities
    guided_mask_ratio: float = 0.75  # share of positions a guided strategy masks in every modality
    guided_mode: str = "whole"  # whole: hide whole regions in random order | within: hide that share of each region (SemMAE's easy stage)
    dirichlet_alpha: float = 1.0  # concentration of the per-sample split of `num_visible` over modalities
    allocation: str = "largest_remainder"  # how the split becomes token counts (see `visible_tokens`); rounded is MultiMAE's
    num_positions: int = 196  # patch positions per modality, (img_size / patch_size) ** 2
    inputs: tuple[int, ...] | None = None  # modalities (indices) the encoder may see; None: all of them
    # Controls of the RGB exposure (pretraining/study/ablations.py); RGB is the last modality:
    rgb_share: float | None = None  # every sample's RGB share of the budget, fixed (None: the Dirichlet draw's)
    label_dropout: float = 0.0  # chance that a sample's encoder sees no label tokens (its budget all RGB)
    curriculum: CurriculumConfig = field(default_factory=CurriculumConfig)

    def __post_init__(self):
        if self.strategy not in ("progressive", *STRATEGIES):
            raise ValueError(f"Unknown masking strategy {self.strategy!r}; use progressive, random, semantic or instance.")
        if not 0.0 <= self.guided_mask_ratio < 1.0:
            raise ValueError(f"guided_mask_ratio must be in [0, 1), got {self.guided_mask_ratio}.")
        if self.guided_mode not in GUIDED_MODES:
            raise ValueError(f"Unknown guided_mode {self.guided_mode!r}; use whole or within.")
        if self.allocation not in ALLOCATIONS:
            raise ValueError(f"Unknown allocation {self.allocation!r}; use largest_remainder or rounded.")
        if self.rgb_share is not None and not 0.0 < self.rgb_share <= 1.0:
            raise ValueError(f"rgb_share must be in (0, 1], got {self.rgb_share}.")
        if not 0.0 <= self.label_dropout <= 1.0:
            raise ValueError(f"label_dropout must be in [0, 1], got {self.label_dropout}.")
        if self.inputs is not None:
            object.__setattr__(self, "inputs", tuple(self.inputs))  # JSON gives lists
            if self.num_visible > len(self.inputs) * self.num_positions:
                raise ValueError(f"Cannot keep {self.num_visible} visible tokens in {len(self.inputs)} input modalities "
                                 f"of {self.num_positions} positions.")

    @property
    def guided(self) -> bool:
        """Whether a guided strategy can be drawn (then patch labels are needed)."""
        return self.strategy != "random"


def patch_majority(label_map: torch.Tensor, patch_size: int, bounds: tuple[int, int] | None = None) -> torch.Tensor:
    """Most frequent label of each patch (ties go to the smaller label), with no host sync.

    label_map: (..., H, W) integer labels, H and W multiples of patch_size. bounds: (low, high), the
    inclusive range the labels are known to lie in (from the dataset's metadata: the semantic classes
    and the ignore value -1, or the largest instance id the loader saw); labels outside it are
    undefined behaviour. With a small range the labels are counted in an (R, K) table, else (or
    with None) each patch is sorted and its runs counted: both are fixed-shape, so neither reads
    a value back to the host.
    Returns (..., h * w) int64, patches row-major.
    """
    *lead, H, W = label_map.shape
    if H % patch_size or W % patch_size:
        raise ValueError(f"Label map of size {H}x{W} is not a multiple of the patch size {patch_size}.")
    h, w, P = H // patch_size, W // patch_size, patch_size
    rows = label_map.reshape(-1, h, P, w, P).transpose(2, 3).reshape(-1, P * P).long()  # (R, P*P), R patches
    R = rows.shape[0]
    if bounds is not None and R * (bounds[1] - bounds[0] + 1) <= 1 << 24:  # an (R, K) count table fits
        low, K = bounds[0], bounds[1] - bounds[0] + 1
        offsets = torch.arange(R, device=label_map.device)[:, None] * K
        counts = torch.zeros(R * K, dtype=torch.int32, device=label_map.device)
        counts.index_add_(0, (offsets + rows - low).flatten(), torch.ones_like(rows, dtype=torch.int32).flatten())
        # argmax takes the first maximum: the smallest label
        return (counts.view(R, K).argmax(dim=1) + low).view(*lead, h * w)
    ordered = rows.sort(dim=1).values  # (R, P*P)
    # Each element's run length in its sorted row; the first maximal run is the smallest majority label.
    runs = torch.searchsorted(ordered, ordered, right=True) - torch.searchsorted(ordered, ordered)  # (R, P*P)
    return ordered.gather(1, runs.argmax(dim=1, keepdim=True)).view(*lead, h * w)


def draw_masking(rng: np.random.Generator, cfg: MaskingConfig, num_modalities: int) -> dict[str, np.ndarray]:
    """Every random number one sample's masking uses (the first half of masking; see the module doc).

    Returns
      strategy_key () float64 uniform: chooses the strategy under the step's curriculum weights;
      proportions  (M,) float64, a Dirichlet(alpha) split of the visible budget over modalities; with
                   `rgb_share`, RGB (the last) takes that share and the draw splits the rest; with
                   `label_dropout`, at that rate RGB takes it all (one more uniform, drawn only then);
      keys         (K, N) float32 uniforms: row 0 orders the regions, row 1 the positions inside a
                   region, row 2 + m the positions of modality m; with `allocation="rounded"`, M
                   more rows order the tokens added or dropped to reach the budget (K = 2M + 2,
                   else M + 2).
    """
    rows = num_modalities + 2 + (num_modalities if cfg.allocation == "rounded" else 0)
    strategy_key = np.float64(rng.random())
    proportions = rng.dirichlet([cfg.dirichlet_alpha] * num_modalities)
    if num_modalities > 1 and cfg.rgb_share is not None:
        labels = rng.dirichlet([cfg.dirichlet_alpha] * (num_modalities - 1))
        proportions = np.append((1 - cfg.rgb_share) * labels, cfg.rgb_share)
    if num_modalities > 1 and cfg.label_dropout > 0 and rng.random() < cfg.label_dropout:
        proportions = np.eye(num_modalities)[-1]
    return {
        "strategy_key": strategy_key,
        "proportions": proportions,
        "keys": rng.random((rows, cfg.num_positions), dtype=np.float32),
    }


def requested_strategy(strategy_key: torch.Tensor, weights: torch.Tensor | Sequence[float],
                       cfg: MaskingConfig) -> torch.Tensor:
    """(B,) int64 strategy asked for each sample: chosen by `weights` (w_sem, w_inst, w_rand; host
    floats or a device tensor) under "progressive", else the forced strategy. `visible_tokens` may
    still fall back to random where a sample has too few regions."""
    if cfg.strategy == "progressive":
        return choose_strategy(strategy_key, weights)
    return torch.full(strategy_key.shape, STRATEGIES.index(cfg.strategy), dtype=torch.int64,
                      device=strategy_key.device)


def split_budget(total: int, capacity: torch.Tensor, proportions: torch.Tensor) -> torch.Tensor:
    """Split `total` tokens over modalities near `proportions`, exactly, and at most `capacity` each.

    capacity: (B,) tokens each modality of a sample can give (the same for all its modalities), with
    M * capacity >= total; proportions: (B, M), rows summing to 1. Returns (B, M) int64 rows summing to
    `total`: largest remainders first; what a full modality cannot take goes to the modalities with
    the fewest tokens (ties to the lower modality), filled up level by level.
    """
    B, M = proportions.shape
    arange = torch.arange(M, device=proportions.device).expand(B, M)
    share = proportions.double() * total
    counts = share.floor().long()  # (B, M)
    order = torch.argsort(share - counts, dim=1, descending=True, stable=True)
    rank = torch.empty_like(order).scatter_(1, order, arange)  # rank of each remainder, largest first
    counts = counts + (rank < total - counts.sum(1, keepdim=True)).long()
    cap = capacity.long().view(B, 1)
    counts = torch.minimum(counts, cap)
    # Water-fill what the cap took off: raise the lowest counts to the highest common level that
    # fits (levels never pass `total`), then one token more to each modality at that level, in order.
    levels = torch.arange(total + 1, device=counts.device).view(1, -1, 1)  # (1, L, 1)
    filled = torch.minimum(cap[:, :, None], torch.maximum(counts[:, None, :], levels)).sum(2)  # (B, L)
    level = (filled <= total).sum(1, keepdim=True) - 1  # (B, 1); filled is non-decreasing in the level
    counts = torch.minimum(cap, torch.maximum(counts, level))
    at_level = (counts == level) & (counts < cap)
    counts = counts + (at_level & (at_level.cumsum(1) <= total - counts.sum(1, keepdim=True))).long()
    return counts


def guided_masked(labels: torch.Tensor, first_label: torch.Tensor, region_keys: torch.Tensor,
                  within_keys: torch.Tensor, num_masked: int, mode: str = "whole",
                  ratio: float = 0.75) -> tuple[torch.Tensor, torch.Tensor]:
    """Mask regions (positions sharing a patch label) in every modality, batched.

    labels: (B, N) int64 patch labels; labels below `first_label` (B,) belong to no region (use a
    first label above every label for a sample that is not guided). region_keys / within_keys: (B, N)
    uniforms. At most `num_masked` positions are masked.
    - mode "whole": regions in uniformly random order (a region's key is the key at its first
      position) are masked until `num_masked` positions are, the last one partly (its positions in
      `within_keys` order). The hard task: whole objects are hidden.
    - mode "within" (SemMAE's easy stage): the share `ratio` of every region is masked, at random
      positions inside it (the positions with the smallest `within_keys`), so each region stays
      partly visible.
    Returns (masked (B, N) bool, True = masked in every modality; guided (B,) bool, False where the
    sample has fewer than two regions: then nothing is masked and the caller falls back to random).
    """
    B, N = labels.shape
    positions = torch.arange(N, device=labels.device)
    in_region = labels >= first_label[:, None]  # (B, N)
    same = (labels[:, :, None] == labels[:, None, :]) & in_region[:, None, :]  # (B, N, N)
    first = same.to(torch.uint8).argmax(dim=2)  # (B, N) first position of each position's region
    guided = (in_region & (first == positions)).sum(1) >= 2  # (B,) regions per sample
    if mode == "within":
        # Place of each position inside its region, in key order, as a share of the region: masked below `ratio`.
        place = (same & (within_keys[:, None, :] < within_keys[:, :, None])).sum(2)  # (B, N)
        size = same.sum(2).clamp(min=1)
        key = torch.where(in_region, (place + 0.5) / size, 2.0)  # (B, N); no region sorts last
        chosen = key < ratio
    else:
        key = torch.where(in_region, region_keys.gather(1, first), 2.0)  # (B, N); no region sorts last
        chosen = in_region
    by_within = torch.argsort(within_keys, dim=1, stable=True)
    order = by_within.gather(1, torch.argsort(key.gather(1, by_within), dim=1, stable=True))  # (B, N)
    rank = torch.empty_like(order).scatter_(1, order, positions.expand(B, N))  # position -> place in order
    return (rank < num_masked) & chosen & guided[:, None], guided


def rounded_counts(total: int, proportions: torch.Tensor) -> torch.Tensor:
    """MultiMAE's token counts: round(share * total) per modality, (B, M) int64. They may miss `total`
    by a token or two (and exceed a modality's positions); `visible_tokens` then adds or drops random
    tokens, as MultiMAE's `generate_random_masks` does."""
    return (proportions.double() * total).round().long()


def visible_tokens(strategy: torch.Tensor, proportions: torch.Tensor, keys: torch.Tensor,
                   semantic_patches: torch.Tensor | None, instance_patches: torch.Tensor | None,
                   cfg: MaskingConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """Visible tokens of a batch from its draws (the second half of masking; see the module doc).

    strategy (B,) from `requested_strategy`; proportions (B, M), keys (B, K, N): `draw_masking`'s
    outputs, stacked. semantic_patches / instance_patches: (B, N) patch-majority labels, or None (not
    read). A guided strategy without labels or with fewer than two regions falls back to random.
    Token counts per modality: "largest_remainder" splits the budget exactly, within what each
    modality has free (`split_budget`); "rounded" is MultiMAE's (`rounded_counts`, then the budget
    met by adding or dropping uniformly random tokens).
    Returns ((B, cfg.num_visible) int64 sorted indices into the (M * N,) sequence, strategy (B,) as used).
    """
    B, M = proportions.shape
    N, V = cfg.num_positions, cfg.num_visible
    rows = M + 2 + (M if cfg.allocation == "rounded" else 0)
    if V > M * N or keys.shape[1:] != (rows, N):
        raise ValueError(f"Cannot keep {V} of {M} x {N} tokens with keys of shape {tuple(keys.shape)}.")
    if cfg.inputs is not None:  # the budget goes to the input modalities only
        allowed = torch.zeros(M, dtype=proportions.dtype, device=proportions.device)
        for m in cfg.inputs:  # scalar fills: indexing with a list would copy it from the host and wait
            allowed[m] = 1
        proportions = proportions * allowed
        proportions = proportions / proportions.sum(1, keepdim=True)
    labels = torch.zeros(B, N, dtype=torch.int64, device=keys.device)
    first_label = torch.full((B,), 2**62, dtype=torch.int64, device=keys.device)  # no region: not guided
    for guide, patches in ((SEMANTIC, semantic_patches), (INSTANCE, instance_patches)):
        if patches is not None:
            chosen = strategy == guide
            labels = torch.where(chosen[:, None], patches.long(), labels)
            first_label = torch.where(chosen, _FIRST_REGION_LABEL[guide], first_label)
    inputs = M if cfg.inputs is None else len(cfg.inputs)
    num_masked = min(round(cfg.guided_mask_ratio * N), N - math.ceil(V / inputs))  # leave room for the budget
    masked, guided = guided_masked(labels, first_label, keys[:, 0], keys[:, 1], num_masked, cfg.guided_mode,
                                   cfg.guided_mask_ratio)
    strategy = torch.where(guided, strategy, RANDOM)
    free = N - masked.sum(1)  # (B,) positions each modality can give
    if cfg.allocation == "rounded":
        counts = rounded_counts(V, proportions)
    else:
        counts = split_budget(V, free, proportions)  # (B, M), each within the free positions
    position_keys = keys[:, 2:M + 2].masked_fill(masked[:, None], 2.0)  # (B, M, N); masked positions last
    order = torch.argsort(position_keys, dim=2)
    rank = torch.empty_like(order).scatter_(2, order, torch.arange(N, device=keys.device).expand(B, M, N))
    chosen = (rank < torch.minimum(counts, free[:, None])[:, :, None]).view(B, M * N)
    if cfg.allocation == "rounded":
        # Chosen tokens first, then the rest, each in random order; the first V are kept (MultiMAE's
        # argsort of mask + noise). Guided-masked positions are never added.
        extra = keys[:, M + 2:].masked_fill(masked[:, None], 3.0).reshape(B, M * N)
        chosen = torch.zeros_like(chosen).scatter_(1, torch.argsort(extra + (~chosen).float(), dim=1)[:, :V], True)
    # The chosen indices in increasing order, without a host sync (nonzero would need one): exactly V per sample.
    visible = torch.argsort((~chosen).to(torch.uint8), dim=1, stable=True)[:, :V]
    return visible, strategy


def assemble_visible(strategy_key: torch.Tensor, proportions: torch.Tensor, keys: torch.Tensor,
                     weights: Sequence[float] | torch.Tensor, semantic: torch.Tensor | None,
                     instance_ids: torch.Tensor | None, cfg: MaskingConfig, patch_size: int,
                     semantic_range: tuple[int, int] | None = None,
                     instance_range: tuple[int, int] | None = None
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A batch's strategies and visible tokens from its draws: the one masking assembly, which the
    trainer (`Batch.to`) and the model's own path (`MaskedAutoencoder.mask_batch`) both call.

    strategy_key (B,) float64, proportions (B, M) float64, keys (B, K, N) float32: `draw_masking`'s
    outputs, stacked, on the device. weights: the step's curriculum weights (w_sem, w_inst, w_rand),
    host floats or a (3,) device tensor. semantic (B, H, W) int64 class ids (ignore -1) and
    instance_ids (B, H, W) ids (0 = none), or None (no labels): their patch-majority labels are
    computed only for the guided strategies the weights can draw, with `semantic_range` /
    `instance_range` as `patch_majority`'s bounds (None: unknown). Host weights go to the device
    without waiting, so nothing here syncs.
    Returns (visible (B, V) int64 sorted token indices, strategy (B,) as used, strategy requested (B,)).
    """
    semantic_used, instance_used = _guided_in_use(cfg, weights)
    semantic_patches = (patch_majority(semantic, patch_size, semantic_range)
                        if semantic_used and semantic is not None else None)  # (B, N)
    instance_patches = (patch_majority(instance_ids, patch_size, instance_range)
                        if instance_used and instance_ids is not None else None)  # (B, N)
    requested = requested_strategy(strategy_key, _weights_on(weights, keys.device), cfg)
    visible, strategy = visible_tokens(requested, proportions, keys, semantic_patches, instance_patches, cfg)
    return visible, strategy, requested


def _guided_in_use(cfg: MaskingConfig, weights: Sequence[float] | torch.Tensor) -> tuple[bool, bool]:
    """Whether semantic- / instance-guided masking can be chosen (forced, or a non-zero curriculum weight;
    weights on the device are not read, so both may be)."""
    if cfg.strategy == "progressive":
        if isinstance(weights, torch.Tensor):
            return True, True
        return weights[SEMANTIC] > 0, weights[INSTANCE] > 0
    return cfg.strategy == "semantic", cfg.strategy == "instance"


def _weights_on(weights: Sequence[float] | torch.Tensor, device: torch.device) -> torch.Tensor:
    """Curriculum weights as a float64 device tensor, copied without waiting (a few bytes, staged by
    the driver)."""
    if isinstance(weights, torch.Tensor):
        return weights.to(device, torch.float64, non_blocking=True)
    return torch.tensor(weights, dtype=torch.float64).to(device, non_blocking=True)


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

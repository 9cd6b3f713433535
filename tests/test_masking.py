import numpy as np
import pytest
import torch

from pretraining.models.masking import (
    INSTANCE,
    RANDOM,
    SEMANTIC,
    MaskingConfig,
    draw_masking,
    gather_tokens,
    patch_majority,
    requested_strategy,
    rounded_counts,
    scatter_tokens,
    split_budget,
    visible_to_masked,
    visible_tokens,
)

N = 196


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _regions(num_regions: int, seed: int = 0) -> torch.Tensor:
    """(N,) patch labels: `num_regions` horizontal bands of a 14x14 grid, shuffled label values."""
    bands = torch.arange(14).repeat_interleave(14) * num_regions // 14  # (N,) in 0..num_regions-1
    return torch.randperm(100, generator=_gen(seed))[:num_regions][bands] + 1


def _draws(weights, cfg, batch, seed=0, num_modalities=3):
    """`draw_masking` for `batch` samples, stacked, with the strategy each requests under `weights`:
    (strategy (B,), proportions (B, M), keys (B, K, N))."""
    rng = np.random.default_rng(seed)
    draws = [draw_masking(rng, cfg, num_modalities) for _ in range(batch)]
    key, proportions, keys = (torch.from_numpy(np.stack([d[k] for d in draws]))
                              for k in ("strategy_key", "proportions", "keys"))
    return requested_strategy(key, weights, cfg), proportions, keys


def _visible(weights, semantic, instance, cfg, batch=1, seed=0, num_modalities=3):
    """Visible tokens of `batch` samples that share the (N,) patch labels given."""
    labels = [None if x is None else x.expand(batch, -1) for x in (semantic, instance)]
    return visible_tokens(*_draws(weights, cfg, batch, seed, num_modalities), *labels, cfg)


def test_patch_majority():
    labels = torch.zeros(32, 48, dtype=torch.long)
    labels[:16, :16] = 5
    labels[:16, 16:20] = 9  # a minority in patch 1 (4 of 16 columns)
    labels[16:, 16:32] = -1
    labels[16:, 32:] = 3
    labels[16:24, 32:] = 2  # a tie between 2 and 3 goes to the smaller label
    assert patch_majority(labels, 16).tolist() == [5, 0, 0, 0, -1, 2]
    with pytest.raises(ValueError, match="multiple of the patch size"):
        patch_majority(labels[:30], 16)


def test_patch_majority_wide_label_range_matches_narrow():
    labels = torch.randint(0, 4, (32, 48), generator=_gen(2))
    # Ids up to 60000 are renumbered before counting; the majority is the same label, scaled.
    assert torch.equal(patch_majority(labels * 20000, 16), patch_majority(labels, 16) * 20000)


def _greedy_split(total, capacity, proportions):
    """The reference: largest remainders, then one token at a time to the modality with most room."""
    share = proportions.double() * total
    counts = share.floor().long()
    counts[torch.argsort(share - counts, descending=True, stable=True)[: total - int(counts.sum())]] += 1
    counts = torch.minimum(counts, torch.tensor(capacity))
    while int(counts.sum()) < total:
        counts[int(torch.argmax(capacity - counts))] += 1
    return counts


def test_split_budget_is_exact_respects_capacity_and_equals_the_greedy_reference():
    g = _gen(0)
    proportions = torch.distributions.Dirichlet(torch.full((3,), 0.3)).sample((200,))
    proportions[0] = torch.tensor([1.0, 0.0, 0.0])
    capacity = torch.randint(33, 197, (200,), generator=g)  # 3 x capacity >= 98
    counts = split_budget(98, capacity, proportions)
    assert counts.sum(1).eq(98).all() and (counts <= capacity[:, None]).all() and (counts >= 0).all()
    for b in range(200):
        assert counts[b].tolist() == _greedy_split(98, int(capacity[b]), proportions[b]).tolist()


@pytest.mark.parametrize("num_modalities,num_visible", [(3, 98), (1, 49)])
def test_random_exact_counts_sorted_unique(num_modalities, num_visible):
    cfg = MaskingConfig(strategy="random", num_visible=num_visible)
    visible, used = _visible((0, 0, 1), None, None, cfg, batch=50, num_modalities=num_modalities)
    assert visible.shape == (50, num_visible) and used.eq(RANDOM).all()
    assert torch.all(visible[:, 1:] > visible[:, :-1])  # sorted, no repeats
    assert 0 <= visible.min() and visible.max() < num_modalities * N
    per_modality = {tuple(torch.bincount(v // N, minlength=num_modalities).tolist()) for v in visible}
    assert num_modalities == 1 or len(per_modality) > 10  # the Dirichlet split varies per sample


def test_same_draws_same_mask_and_a_sample_ignores_its_batch():
    cfg = MaskingConfig()
    sem, inst = _regions(5).expand(8, -1), _regions(7, seed=1).expand(8, -1)
    strategy, proportions, keys = _draws((0.3, 0.3, 0.4), cfg, batch=8, seed=3)
    visible, used = visible_tokens(strategy, proportions, keys, sem, inst, cfg)
    again = visible_tokens(strategy, proportions, keys, sem, inst, cfg)
    assert torch.equal(visible, again[0]) and torch.equal(used, again[1])
    for b in range(8):  # each sample alone gives the same tokens as in the batch
        one = visible_tokens(strategy[b:b + 1], proportions[b:b + 1], keys[b:b + 1], sem[:1], inst[:1], cfg)
        assert torch.equal(one[0][0], visible[b]) and int(one[1]) == int(used[b])


def test_restore_round_trip():
    gen = _gen()
    B, D = 4, 8
    visible, _ = _visible((0, 0, 1), None, None, MaskingConfig(strategy="random"), batch=B)  # (B, V)
    x = torch.randn(B, 3 * N, D, generator=gen)
    fill = torch.full((D,), -7.0)
    x_vis = gather_tokens(x, visible)  # (B, V, D)
    full = scatter_tokens(x_vis, visible, 3 * N, fill)  # (B, 3N, D)
    assert torch.equal(gather_tokens(full, visible), x_vis)
    masked = visible_to_masked(visible, 3 * N)
    assert masked.sum(1).eq(3 * N - 98).all()
    assert torch.equal(full[~masked], x[~masked]) and (full[masked] == -7.0).all()


@pytest.mark.parametrize("strategy", ["semantic", "instance"])
def test_guided_masks_whole_regions_in_every_modality(strategy):
    cfg = MaskingConfig(strategy=strategy)
    for seed in range(10):
        labels = _regions(7, seed)  # bands of 28 positions: 5 whole + a part of one reach 147 (75%)
        sem, inst = (labels, None) if strategy == "semantic" else (None, labels)
        visible, used = _visible((1, 0, 0), sem, inst, cfg, seed=seed)
        assert int(used) == (SEMANTIC if strategy == "semantic" else INSTANCE)
        assert visible.shape == (1, 98)
        seen = torch.zeros(N, dtype=torch.bool)
        seen[visible[0] % N] = True  # positions visible in at least one modality
        assert (~seen).sum() >= 147  # the guided share is masked in every modality
        fully_masked = [int(r) for r in labels.unique() if not seen[labels == r].any()]
        assert len(fully_masked) >= 5  # whole regions when the target allows


def test_guided_last_region_partial_ignored_labels_are_no_region_and_the_order_is_uniform():
    labels = _regions(2)  # two regions of 98: the target 147 takes one whole, half the other
    labels[:14] = -1  # semantic ignore: never a region
    cfg = MaskingConfig(strategy="semantic", num_visible=30)
    visible, used = _visible((1, 0, 0), labels, None, cfg, batch=400)
    assert used.eq(SEMANTIC).all()
    seen = torch.zeros(400, N, dtype=torch.bool).scatter_(1, visible % N, True)
    regions = [r for r in labels.unique().tolist() if r >= 0]
    hidden = torch.stack([~seen[:, labels == r].any(1) for r in regions], 1)  # (400, 2) region fully masked
    assert hidden.sum(1).eq(1).all()  # one of the two regions is completely hidden, the other partly
    assert 150 < int(hidden[:, 0].sum()) < 250  # and which one is a fair coin


@pytest.mark.parametrize("labels", [None, torch.full((N,), 4), torch.zeros(N, dtype=torch.long)])
def test_guided_falls_back_to_random(labels):
    cfg = MaskingConfig(strategy="instance")
    visible, used = _visible((0, 1, 0), labels, labels, cfg)
    assert int(used) == RANDOM and visible.shape == (1, 98)


def test_progressive_draws_by_weight():
    cfg = MaskingConfig()
    sem, inst = _regions(5), _regions(7, seed=1)
    _, used = _visible((0.5, 0.5, 0.0), sem, inst, cfg, batch=200)
    assert not used.eq(RANDOM).any() and 70 < int(used.eq(SEMANTIC).sum()) < 130
    assert _visible((0, 0, 1), sem, inst, cfg, batch=10)[1].eq(RANDOM).all()


@pytest.mark.parametrize("strategy", ["semantic", "instance"])
def test_within_region_mode_masks_the_share_of_every_region_and_keeps_each_partly_visible(strategy):
    cfg = MaskingConfig(strategy=strategy, guided_mode="within", num_visible=30)
    labels = _regions(7)  # 7 bands of 28 positions
    sem, inst = (labels, None) if strategy == "semantic" else (None, labels)
    visible, used = _visible((1, 1, 0), sem, inst, cfg, batch=20)
    assert used.ne(RANDOM).all() and visible.shape == (20, 30)
    for b in range(20):
        seen = torch.zeros(N, dtype=torch.bool)
        seen[visible[b] % N] = True
        for r in labels.unique():
            region = labels == r
            hidden = int((~seen[region]).sum())
            assert hidden >= 21  # round(0.75 * 28) = 21 positions of each region masked in every modality
            assert hidden < int(region.sum())  # ...and never the whole region here (7 left)
    assert visible[0].tolist() != visible[1].tolist()  # at random positions inside each region


def test_rounded_allocation_is_multimaes_and_meets_the_budget_exactly():
    proportions = torch.tensor([[0.5, 0.25, 0.25], [1 / 3, 1 / 3, 1 / 3], [0.994, 0.003, 0.003]])
    assert rounded_counts(98, proportions).tolist() == [[49, 24, 24], [33, 33, 33], [97, 0, 0]]  # 97, 99, 97: off budget
    cfg = MaskingConfig(strategy="random", allocation="rounded")
    rng = np.random.default_rng(0)
    draws = [draw_masking(rng, cfg, 3) for _ in range(3)]
    keys = torch.from_numpy(np.stack([d["keys"] for d in draws]))
    assert keys.shape == (3, 8, N)  # M more rows order the tokens added or dropped
    visible, used = visible_tokens(torch.full((3,), RANDOM), proportions, keys, None, None, cfg)
    assert visible.shape == (3, 98) and torch.all(visible[:, 1:] > visible[:, :-1]) and used.eq(RANDOM).all()
    counts = torch.stack([torch.bincount(v // N, minlength=3) for v in visible])
    assert (counts - rounded_counts(98, proportions)).abs().sum(1).le(1).all()  # one token added or dropped
    assert counts[0].tolist() in ([49, 24, 25], [49, 25, 24], [50, 24, 24])


def test_patch_majority_count_table_and_sort_paths_agree():
    # Known bounds count in a table; no bounds (or a range too wide for one) sort each patch. Same labels.
    g = _gen(3)
    labels = torch.randint(-1, 6, (4, 32, 48), generator=g)
    labels[0, :16, :16] = 4  # a uniform patch
    by_sort = patch_majority(labels, 16)
    assert torch.equal(patch_majority(labels, 16, bounds=(-1, 5)), by_sort)
    assert torch.equal(patch_majority(labels, 16, bounds=(-1, 2**30)), by_sort)  # too wide: the sort path
    assert by_sort[0, 0] == 4

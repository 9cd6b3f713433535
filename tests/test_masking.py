import pytest
import torch

from pretraining.masking import (
    INSTANCE,
    RANDOM,
    SEMANTIC,
    CurriculumConfig,
    MaskingConfig,
    curriculum_weights,
    gather_tokens,
    patch_majority,
    random_visible,
    sample_visible,
    scatter_tokens,
    split_budget,
    visible_to_masked,
)

N = 196


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _regions(num_regions: int, seed: int = 0) -> torch.Tensor:
    """(N,) patch labels: `num_regions` horizontal bands of a 14x14 grid, shuffled label values."""
    bands = torch.arange(14).repeat_interleave(14) * num_regions // 14  # (N,) in 0..num_regions-1
    return torch.randperm(100, generator=_gen(seed))[:num_regions][bands] + 1


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


def test_split_budget_is_exact_and_respects_capacity():
    for seed in range(20):
        p = torch.distributions.Dirichlet(torch.ones(3)).sample() if seed else torch.tensor([1.0, 0, 0])
        counts = split_budget(98, [49, 49, 49], p)
        assert counts.sum() == 98 and (counts <= 49).all() and (counts >= 0).all()


@pytest.mark.parametrize("num_modalities,num_visible", [(3, 98), (1, 49)])
def test_random_exact_counts_sorted_unique(num_modalities, num_visible):
    gen = _gen()
    per_modality = []
    for _ in range(50):
        vis = random_visible(num_visible, num_modalities, N, 1.0, gen)
        assert vis.shape == (num_visible,)
        assert torch.equal(vis, vis.unique())  # sorted, no repeats
        assert 0 <= vis.min() and vis.max() < num_modalities * N
        per_modality.append(torch.bincount(vis // N, minlength=num_modalities))
    # The Dirichlet split varies per sample.
    assert num_modalities == 1 or len({tuple(c.tolist()) for c in per_modality}) > 10


def test_same_generator_seed_same_mask():
    cfg = MaskingConfig()
    sem, inst = _regions(5), _regions(7, seed=1)
    a = sample_visible((0.3, 0.3, 0.4), sem, inst, cfg, 3, _gen(3))
    b = sample_visible((0.3, 0.3, 0.4), sem, inst, cfg, 3, _gen(3))
    assert torch.equal(a[0], b[0]) and a[1] == b[1]


def test_restore_round_trip():
    gen = _gen()
    B, D = 4, 8
    visible = torch.stack([random_visible(98, 3, N, 1.0, gen) for _ in range(B)])  # (B, V)
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
        visible, used = sample_visible((1, 0, 0), sem, inst, cfg, 3, _gen(seed))
        assert used == (SEMANTIC if strategy == "semantic" else INSTANCE)
        assert visible.shape == (98,)
        seen = torch.zeros(N, dtype=torch.bool)
        seen[visible % N] = True  # positions visible in at least one modality
        assert (~seen).sum() >= 147  # the guided share is masked in every modality
        fully_masked = [int(r) for r in labels.unique() if not seen[labels == r].any()]
        assert len(fully_masked) >= 5  # whole regions when the target allows


def test_guided_last_region_partial_and_ignored_labels_are_no_region():
    labels = _regions(2)  # two regions of 98: the target 147 takes one whole, half the other
    labels[:14] = -1  # semantic ignore: never a region
    cfg = MaskingConfig(strategy="semantic", num_visible=30)
    for seed in range(5):
        visible, used = sample_visible((1, 0, 0), labels, None, cfg, 3, _gen(seed))
        assert used == SEMANTIC
        seen = torch.zeros(N, dtype=torch.bool)
        seen[visible % N] = True
        # One of the two regions is completely hidden.
        assert any(not seen[labels == r].any() for r in labels.unique() if r >= 0)


@pytest.mark.parametrize("labels", [None, torch.full((N,), 4), torch.zeros(N, dtype=torch.long)])
def test_guided_falls_back_to_random(labels):
    cfg = MaskingConfig(strategy="instance")
    visible, used = sample_visible((0, 1, 0), labels, labels, cfg, 3, _gen())
    assert used == RANDOM and visible.shape == (98,)


def test_progressive_draws_by_weight():
    cfg = MaskingConfig()
    sem, inst = _regions(5), _regions(7, seed=1)
    gen = _gen()
    used = [sample_visible((0.5, 0.5, 0.0), sem, inst, cfg, 3, gen)[1] for _ in range(200)]
    assert RANDOM not in used and 70 < used.count(SEMANTIC) < 130
    assert {sample_visible((0, 0, 1), sem, inst, cfg, 3, gen)[1] for _ in range(10)} == {RANDOM}


def test_curriculum_endpoints_and_monotone():
    for cfg in [CurriculumConfig(), CurriculumConfig(0.5, 0.8, 0.0), CurriculumConfig(0.25, 0.75, 0.5)]:
        assert curriculum_weights(0.0, cfg) == (1.0, 0.0, 0.0)
        assert curriculum_weights(1.0, cfg) == (0.0, 0.0, 1.0)
        weights = [curriculum_weights(i / 100, cfg) for i in range(101)]
        for w in weights:
            assert all(v >= 0 for v in w) and sum(w) == pytest.approx(1.0)
        assert all(a[0] >= b[0] and a[2] <= b[2] for a, b in zip(weights, weights[1:]))
        assert max(w[1] for w in weights) == 1.0  # a pure instance-guided phase between the two
    with pytest.raises(ValueError, match="CurriculumConfig"):
        CurriculumConfig(0.6, 0.5)

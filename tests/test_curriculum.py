"""The masking curriculum: scheduled ramps in any phase order, the strategy draw, the adaptive rule."""

import pytest
import torch

from pretraining.models.curriculum import (
    STRATEGIES,
    AdaptiveCurriculum,
    Curriculum,
    CurriculumConfig,
    choose_strategy,
    curriculum_weights,
)


def test_scheduled_endpoints_and_monotone():
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
    with pytest.raises(ValueError, match="phases"):
        CurriculumConfig(phases=("semantic", "semantic", "random"))


def test_reversed_phases_run_random_first_and_semantic_last():
    cfg = CurriculumConfig(phases=["random", "instance", "semantic"])  # a list, as JSON gives it
    assert cfg.phases == ("random", "instance", "semantic")
    assert curriculum_weights(0.0, cfg) == (0.0, 0.0, 1.0)
    assert curriculum_weights(0.45, cfg) == (0.0, 1.0, 0.0)
    assert curriculum_weights(1.0, cfg) == (1.0, 0.0, 0.0)


def test_choose_strategy_follows_the_weights_and_never_picks_a_zero_weight():
    key = torch.rand(20000, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    chosen = choose_strategy(key, (0.2, 0.0, 0.6))  # unnormalised on purpose
    share = torch.bincount(chosen, minlength=3).double() / len(key)
    assert share[1] == 0 and abs(share[0] - 0.25) < 0.01 and abs(share[2] - 0.75) < 0.01
    assert torch.equal(choose_strategy(key, torch.tensor([0.2, 0.0, 0.6])), chosen)  # a device tensor too
    assert choose_strategy(key, (0.0, 0.0, 1.0)).eq(2).all()


def _feed(curriculum, losses_by_strategy, steps):
    """Feed `steps` optimizer steps in which strategy s has 8 samples of mean loss losses_by_strategy[s](t)."""
    for t in range(steps):
        means = torch.tensor([f(t) for f in losses_by_strategy], dtype=torch.float64)
        curriculum.update(means * 8, torch.full((3,), 8.0))


def test_adaptive_rule_moves_weight_to_the_strategy_still_learning_and_keeps_the_floor():
    cfg = CurriculumConfig(mode="adaptive", adaptive_floor=0.15, adaptive_warmup=5)
    adaptive = AdaptiveCurriculum(cfg, torch.device("cpu"))
    # Before warm-up: the schedule, with the floor (so every strategy is drawn and measured).
    assert adaptive.weights(0.0).tolist() == pytest.approx([0.9, 0.05, 0.05])
    # Semantic-guided loss still falls; the others are flat.
    _feed(adaptive, [lambda t: 3.0 * 0.98**t, lambda t: 1.0, lambda t: 2.0], 60)
    w = adaptive.weights(0.0)
    assert w.sum().item() == pytest.approx(1.0)
    assert w[0] > 0.8 and w.min() >= 0.05 - 1e-12  # the floor: 0.15 / 3 for each strategy
    # Then semantic plateaus and instance starts falling: the weight follows.
    _feed(adaptive, [lambda t: 3.0 * 0.98**60, lambda t: 0.97**t, lambda t: 2.0], 150)
    w = adaptive.weights(0.0)
    assert w[1] > w[0] and w[1] > w[2]
    # A strategy never drawn in a step keeps its averages.
    before = adaptive.state_dict()
    adaptive.update(torch.tensor([0.0, 5.0, 0.0], dtype=torch.float64), torch.tensor([0.0, 1.0, 0.0]))
    after = adaptive.state_dict()
    assert after["fast"][0] == before["fast"][0] and after["seen"][0] == before["seen"][0]
    assert after["seen"][1] == before["seen"][1] + 1


def test_adaptive_state_round_trips_and_scheduled_has_none():
    cfg = CurriculumConfig(mode="adaptive", adaptive_warmup=1)
    a = Curriculum(cfg, torch.device("cpu"))
    _feed(a.adaptive, [lambda t: 1.0 / (t + 1), lambda t: 1.0, lambda t: 2.0 - 0.01 * t], 20)
    b = Curriculum(cfg, torch.device("cpu"))
    b.load_state_dict(a.state_dict())
    assert torch.equal(a.weights(0.5), b.weights(0.5))
    scheduled = Curriculum(CurriculumConfig(), torch.device("cpu"))
    assert scheduled.state_dict() == {} and scheduled.weights(1.0) == (0.0, 0.0, 1.0)
    assert len(STRATEGIES) == 3

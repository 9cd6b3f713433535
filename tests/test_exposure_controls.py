"""The study's RGB-exposure switches of masking: a fixed RGB share of the budget and per-sample label dropout."""

import numpy as np
import pytest
import torch

from pretraining.models.factory import model_config
from pretraining.models.masking import MaskingConfig, draw_masking, requested_strategy, visible_tokens

N = 36


def _rgb_counts(cfg: MaskingConfig, batch: int = 200, seed: int = 0) -> torch.Tensor:
    """(B,) visible RGB tokens per sample under random masking with 3 modalities (RGB last)."""
    rng = np.random.default_rng(seed)
    draws = [draw_masking(rng, cfg, 3) for _ in range(batch)]
    key, proportions, keys = (torch.from_numpy(np.stack([d[k] for d in draws]))
                              for k in ("strategy_key", "proportions", "keys"))
    visible, _ = visible_tokens(requested_strategy(key, (0, 0, 1), cfg), proportions, keys, None, None, cfg)
    return (visible // N == 2).sum(1)


def test_rgb_share_fixes_every_samples_rgb_tokens_at_maes_exposure():
    free = _rgb_counts(MaskingConfig(strategy="random", num_visible=18, num_positions=N))
    assert free.float().mean() < 8 and free.min() < 3 and free.max() > 12  # the Dirichlet draw: 6 of 18 on average
    matched = _rgb_counts(MaskingConfig(strategy="random", num_visible=18, num_positions=N, rgb_share=0.5))
    assert matched.eq(9).all()  # MAE's 9 of 36 RGB positions, in every sample, beside 9 label tokens


def test_label_dropout_gives_that_share_of_samples_an_rgb_only_budget():
    counts = _rgb_counts(MaskingConfig(strategy="random", num_visible=18, num_positions=N, label_dropout=0.3), 600)
    dropped = counts.eq(18).float().mean().item()
    assert 0.22 < dropped < 0.38  # 30% of samples, up to the Dirichlet draws that give RGB everything anyway
    assert _rgb_counts(MaskingConfig(strategy="random", num_visible=18, num_positions=N), 600).eq(18).float().mean() < 0.05


def test_switches_leave_default_draws_unchanged_and_reach_the_model_config():
    draws = draw_masking(np.random.default_rng(4), MaskingConfig(num_positions=N), 3)
    rng = np.random.default_rng(4)  # the draws every other run (and resumed run) has made: in this order
    assert draws["strategy_key"] == rng.random() and np.array_equal(draws["proportions"], rng.dirichlet([1.0] * 3))
    assert np.array_equal(draws["keys"], rng.random((5, N), dtype=np.float32))
    one = draw_masking(np.random.default_rng(4), MaskingConfig(num_positions=N, rgb_share=0.5, label_dropout=0.5), 1)
    assert one["proportions"].tolist() == pytest.approx([1.0])  # RGB-only models are untouched
    model = model_config("c2fmae_vit_tiny_patch16", img_size=48, patch_size=8, rgb_share=0.5, label_dropout=0.5)
    assert model.masking.rgb_share == 0.5 and model.masking.label_dropout == 0.5
    with pytest.raises(ValueError, match="rgb_share"):
        MaskingConfig(rgb_share=0.0)
    with pytest.raises(ValueError, match="label_dropout"):
        MaskingConfig(label_dropout=1.5)

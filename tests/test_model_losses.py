import pytest
import torch

from pretraining.models.instances import instance_representation
from pretraining.models.losses import (
    best_constant_instance_prediction,
    constant_instance_loss,
    instance_loss,
    patchify,
    rgb_loss,
    semantic_loss,
    unpatchify,
)

pytestmark = pytest.mark.usefixtures("one_thread")  # small ops: one thread beats two here


def _gen() -> torch.Generator:
    return torch.Generator().manual_seed(0)


def test_patchify_round_trip_and_layout():
    images = torch.randn(2, 3, 32, 32, generator=_gen())
    patches = patchify(images, 8)  # (2, 16, 192)
    assert patches.shape == (2, 16, 8 * 8 * 3)
    assert torch.equal(unpatchify(patches, 8, 3), images)
    # Patch 1 is the second patch of the first row; channels last within a patch.
    assert torch.equal(patches[0, 1].view(8, 8, 3), images[0, :, :8, 8:16].permute(1, 2, 0))


def test_losses_count_masked_patches_only():
    g = _gen()
    images = torch.randn(2, 3, 32, 32, generator=g)
    labels = torch.randint(0, 5, (2, 8, 8), generator=g)  # label resolution: patch 2
    rep = torch.stack([instance_representation(torch.randint(0, 4, (32, 32), generator=g)) for _ in range(2)])
    masked = torch.rand(2, 16, generator=g) > 0.5
    preds = {"rgb": torch.randn(2, 16, 192, generator=g), "semantic": torch.randn(2, 16, 4 * 5, generator=g),
             "instance": torch.randn(2, 16, 192, generator=g)}
    before = (rgb_loss(preds["rgb"], images, masked, 8), semantic_loss(preds["semantic"], labels, masked, 2, 5),
              instance_loss(preds["instance"], rep, masked, 8))
    changed = {k: torch.where(masked[..., None], v, v + 100) for k, v in preds.items()}  # only visible patches
    after = (rgb_loss(changed["rgb"], images, masked, 8), semantic_loss(changed["semantic"], labels, masked, 2, 5),
             instance_loss(changed["instance"], rep, masked, 8))
    for a, b in zip(before, after):
        torch.testing.assert_close(a, b)


def test_perfect_predictions_and_ignore_pixels():
    g = _gen()
    images = torch.randn(1, 3, 16, 16, generator=g)
    masked = torch.ones(1, 4, dtype=torch.bool)
    target = patchify(images, 8)
    mean, std = target.mean(-1, keepdim=True), (target.var(-1, keepdim=True) + 1e-6).sqrt()
    assert rgb_loss((target - mean) / std, images, masked, 8) < 1e-8
    assert rgb_loss(target, images, masked, 8, norm_pix=False) == 0
    labels = torch.full((1, 4, 4), -1)
    logits = torch.randn(1, 4, 4 * 3, generator=g)
    assert semantic_loss(logits, labels, masked, 2, 3) == 0  # all ignored: zero, not NaN
    labels[0, 0, 0] = 2
    one_hot = torch.full((1, 4, 4, 3), -30.0)
    one_hot[0, 0, 0, 2] = 30.0  # (B, N, p*p, C): right class for the one labelled pixel
    assert semantic_loss(one_hot.flatten(2), labels, masked, 2, 3) < 1e-6
    rep = instance_representation(torch.tensor([[0, 0, 1, 1]] * 4).repeat_interleave(4, 0).repeat_interleave(4, 1))
    pred = patchify(rep[None], 8).reshape(1, 4, 64, 3).clone()
    pred[..., 0] = (pred[..., 0] * 2 - 1) * 30  # boundary as confident logits
    assert instance_loss(pred.flatten(2), rep[None], masked, 8) < 1e-6


def test_sample_reduction_makes_the_mean_of_halves_the_mean_of_the_whole():
    """What DDP and gradient accumulation rely on: with per-sample means, two equal halves of a batch
    average to the whole batch's loss even when the halves mask different numbers of patches."""
    g = _gen()
    images = torch.randn(4, 3, 32, 32, generator=g)
    labels = torch.randint(-1, 5, (4, 8, 8), generator=g)  # ignore pixels too
    rep = instance_representation(torch.randint(0, 4, (4, 32, 32), generator=g))
    masked = torch.zeros(4, 16, dtype=torch.bool)
    masked[0, :2], masked[1, :3], masked[2, :12], masked[3, :15] = True, True, True, True  # 5 vs 27 masked
    preds = {"rgb": torch.randn(4, 16, 192, generator=g), "semantic": torch.randn(4, 16, 4 * 5, generator=g),
             "instance": torch.randn(4, 16, 192, generator=g)}

    def terms(rows, reduction):
        return torch.stack([rgb_loss(preds["rgb"][rows], images[rows], masked[rows], 8, reduction=reduction),
                            semantic_loss(preds["semantic"][rows], labels[rows], masked[rows], 2, 5, reduction),
                            instance_loss(preds["instance"][rows], rep[rows], masked[rows], 8, reduction)])

    halves, whole = (terms(slice(0, 2), "sample") + terms(slice(2, 4), "sample")) / 2, terms(slice(0, 4), "sample")
    assert torch.allclose(halves, whole, rtol=1e-6)
    token_halves = (terms(slice(0, 2), "token") + terms(slice(2, 4), "token")) / 2
    assert not torch.allclose(token_halves, terms(slice(0, 4), "token"), rtol=1e-3)  # the mean of means drifts
    with pytest.raises(ValueError, match="loss reduction"):
        terms(slice(0, 4), "pixel")


def _object_maps(batch: int, size: int, g: torch.Generator) -> torch.Tensor:
    """(B, size, size) id maps of 1-4 overlapping rectangles each (later ones on top)."""
    maps = torch.zeros(batch, size, size, dtype=torch.long)
    for b in range(batch):
        for k in range(1, int(torch.randint(2, 6, (1,), generator=g)) + 1):
            y, x = torch.randint(0, size - 6, (2,), generator=g).tolist()
            h, w = torch.randint(4, size // 2, (2,), generator=g).tolist()
            maps[b, y:y + h, x:x + w] = k
    return maps


@pytest.mark.parametrize("offset_loss", ["l1", "mse"])
@pytest.mark.parametrize("reduction", ["sample", "token"])
def test_the_best_constant_instance_prediction_is_the_floor_no_constant_beats(reduction, offset_loss):
    """The closed form (boundary rate's logit, weighted median offsets) is the best input-independent
    prediction (median offsets under L1, mean offsets under squared error): no perturbed constant, nor
    zeros, nor mean offsets score lower; a head that reads its
    input (here: the target itself) scores far below it."""
    g, P = _gen(), 4
    target = instance_representation(_object_maps(6, 32, g), offset_unit=P)  # (6, 3, 32, 32)
    masked = torch.rand(6, 64, generator=g) < torch.linspace(0.2, 0.9, 6)[:, None]  # uneven counts per sample
    constant = best_constant_instance_prediction(target, masked, P, reduction, offset_loss=offset_loss)
    floor = constant_instance_loss(target, masked, P, reduction, offset_loss)
    assert constant.shape == (P * P * 3,)
    assert torch.equal(floor, instance_loss(constant.expand(6, 64, -1), target, masked, P, reduction, offset_loss))

    def loss_of(c: torch.Tensor) -> float:
        return float(instance_loss(c.expand(6, 64, -1), target, masked, P, reduction, offset_loss))

    for _ in range(40):
        nudged = constant + 0.05 * torch.randn(constant.shape, generator=g)
        assert loss_of(nudged) >= float(floor) - 1e-6
    for i in range(0, P * P * 3, 7):  # one coordinate at a time, both ways
        for step in (-0.02, 0.02):
            nudged = constant.clone()
            nudged[i] += step
            assert loss_of(nudged) >= float(floor) - 1e-6
    patches = patchify(target, P).reshape(6, 64, -1, 3)[masked]  # (M, P*P, 3)
    mean_offsets = constant.view(-1, 3).clone()
    mean_offsets[:, 1:] = patches[..., 1:].mean(0)
    assert loss_of(torch.zeros_like(constant)) > float(floor) and loss_of(mean_offsets.flatten()) >= float(floor) - 1e-6
    reads_input = patchify(target, P).reshape(6, 64, -1, 3).clone()
    reads_input[..., 0] = reads_input[..., 0] * 16 - 8  # confident boundary logits
    assert float(instance_loss(reads_input.flatten(2), target, masked, P, reduction, offset_loss)) < 0.1 * float(floor)

import types

import pytest
import torch

from pretraining.models.factory import create_model
from pretraining.models.instances import instance_representation
from pretraining.models.losses import (
    best_constant_instance_prediction,
    constant_instance_loss,
    instance_loss,
    patchify,
)
from pretraining.study.instance_head import measure_instance_head, scene_batch

pytestmark = pytest.mark.usefixtures("one_thread")

P, GRID = 4, 4  # 16 px images, 4 x 4 patches


def _scenes(n: int, g: torch.Generator) -> dict[str, torch.Tensor]:
    """Id maps of one or two boxes at random places, their representation, and a masking."""
    ids = torch.zeros(n, P * GRID, P * GRID, dtype=torch.long)
    for b in range(n):
        for i in range(int(torch.randint(1, 3, (1,), generator=g))):
            y, x = torch.randint(0, 10, (2,), generator=g).tolist()
            ids[b, y:y + 6, x:x + 5] = i + 1
    masked = torch.rand(n, GRID * GRID, generator=g) < 0.7
    return {"instance_ids": ids, "instance": instance_representation(ids, offset_unit=P), "masked": masked}


class StandIn(torch.nn.Module):
    """The slice of MaskedAutoencoder's API the measurement reads, with a prediction we choose."""

    def __init__(self, predict):
        super().__init__()
        self.cfg = types.SimpleNamespace(modalities=("semantic", "instance", "rgb"), patch_size=P,
                                         loss_reduction="sample", arch="stand-in")
        self.predict = predict

    def forward(self, batch):
        return types.SimpleNamespace(predictions={"instance": self.predict(batch)}, visible=batch["masked"])

    def visible_mask(self, out):
        return {"instance": ~out.visible}

    def term_gradient_norms(self, batch):
        return torch.tensor([3.0, 1.0, 1.0])


def test_the_reading_is_constant_minus_head_positive_when_the_head_beats_the_constant():
    g = torch.Generator().manual_seed(0)
    batches = [{**_scenes(4, g), "visible": torch.zeros(1)} for _ in range(2)]  # "visible": already masked
    target = torch.cat([b["instance"] for b in batches])
    masked = torch.cat([b["masked"] for b in batches])
    floor = float(constant_instance_loss(target, masked, P))
    constant = best_constant_instance_prediction(target, masked, P)

    def knows(batch):  # reads its input: the target itself, boundary as confident logits
        patches = patchify(batch["instance"], P).reshape(len(batch["instance"]), GRID * GRID, -1, 3).clone()
        patches[..., 0] = patches[..., 0] * 20 - 10
        return patches.flatten(2)

    good = measure_instance_head(StandIn(knows), batches)
    assert good.constant == pytest.approx(floor) and good.head < 1e-3 * floor
    assert good.instance_minus_constant == pytest.approx(floor - good.head) and good.instance_minus_constant > 0
    assert good.relative == pytest.approx(good.instance_minus_constant / floor)
    assert good.grad_shares == pytest.approx({"semantic": 0.6, "instance": 0.2, "rgb": 0.2})
    assert good.samples == 8

    best_constant = measure_instance_head(StandIn(lambda b: constant.expand(len(b["instance"]), GRID * GRID, -1)),
                                          batches)
    assert best_constant.instance_minus_constant == pytest.approx(0.0, abs=1e-6)

    zeros = measure_instance_head(StandIn(lambda b: torch.zeros(len(b["instance"]), GRID * GRID, P * P * 3)), batches)
    expected = float(instance_loss(torch.zeros(8, GRID * GRID, P * P * 3), target, masked, P))
    assert zeros.head == pytest.approx(expected) and zeros.instance_minus_constant < 0  # worse than the constant


def test_a_real_model_is_measured_on_batches_it_masks_itself_and_left_as_it_was():
    g = torch.Generator().manual_seed(0)
    scenes = _scenes(3, g)
    batch = {"rgb": torch.randn(3, 3, 16, 16, generator=g), "semantic": (scenes["instance_ids"] > 0).long(),
             "instance_ids": scenes["instance_ids"], "instance": scenes["instance"]}
    torch.manual_seed(0)
    model = create_model("c2fmae_vit_tiny_patch16", num_semantic_classes=2, img_size=16, patch_size=P, embed_dim=32,
                         depth=1, num_heads=2, decoder_dim=32, decoder_heads=2, decoder_depth=1)
    reading = measure_instance_head(model, [batch], torch.Generator().manual_seed(1))
    assert model.training and all(p.grad is None for p in model.parameters())
    assert reading.samples == 3 and reading.head > 0 and reading.constant > 0
    assert reading.instance_minus_constant == pytest.approx(reading.constant - reading.head)
    assert set(reading.grad_shares) == {"semantic", "instance", "rgb"}
    assert sum(reading.grad_shares.values()) == pytest.approx(1.0) and min(reading.grad_shares.values()) > 0
    with pytest.raises(ValueError, match="Generator"):
        measure_instance_head(model, [batch])
    mae = create_model("mae_vit_tiny_patch16_dec512d8b", img_size=16, patch_size=P, embed_dim=32, depth=1, num_heads=2)
    with pytest.raises(ValueError, match="no instance modality"):
        measure_instance_head(mae, [batch], g)


MARGIN = 0.02  # the head must beat the best constant by 2% of the constant's loss (docs/model.md, Losses)


@pytest.mark.slow
@pytest.mark.parametrize("arm", ["c2fmae", "targets_only"])
def test_a_short_tiny_training_beats_the_constant_instance_predictor(arm):
    """The fix of issue 31: with squared-error offsets (the factories' default) the instance head learns
    something input-dependent; held-out scenes, the constant fitted on them."""
    size, patch, steps = 32, 8, 150
    torch.manual_seed(0)
    extra = {"input_modalities": ("rgb",)} if arm == "targets_only" else {}
    model = create_model("c2fmae_vit_tiny_patch16", num_semantic_classes=9, img_size=size, patch_size=patch,
                         embed_dim=32, depth=1, num_heads=2, decoder_dim=32, decoder_heads=2, decoder_depth=1, **extra)
    assert model.cfg.instance_offset_loss == "mse"
    train, g = scene_batch(256, size, 1, patch), torch.Generator().manual_seed(0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3, betas=(0.9, 0.95), weight_decay=0.05)
    for step in range(steps):
        index = torch.randint(0, 256, (32,), generator=g)
        out = model(model.mask_batch({k: v[index] for k, v in train.items()}, g, step / steps))
        optimizer.zero_grad()
        out.loss.backward()
        optimizer.step()
    reading = measure_instance_head(model, [scene_batch(128, size, 2, patch)], torch.Generator().manual_seed(1))
    assert reading.instance_minus_constant > MARGIN * reading.constant, reading
    assert reading.grad_shares["instance"] > 0

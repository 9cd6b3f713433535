"""The per-patch linear segmentation probe and the class-token attention measures."""

import pytest
import torch
from timm.models.vision_transformer import Block

from pretraining.study.attention import attention_mass, cls_attention, patch_fraction
from pretraining.study.patch_probe import PatchProbeConfig, patch_probe_miou

pytestmark = pytest.mark.usefixtures("one_thread")


def _patch_task(n: int, seed: int, informative: bool):
    """Labels constant on 2x2-patch blocks of a 4x4 grid of 4-pixel patches; features one-hot of the patch's
    label plus noise (or noise only). Bilinear upsampling of patch logits blurs only the block edges."""
    g = torch.Generator().manual_seed(seed)
    patch_labels = torch.randint(0, 3, (n, 2, 2), generator=g).repeat_interleave(2, 1).repeat_interleave(2, 2)
    labels = patch_labels.repeat_interleave(4, 1).repeat_interleave(4, 2)  # (n, 16, 16)
    labels[:, :2, :2] = -1  # some ignore pixels
    feats = torch.randn(n, 4, 4, 8, generator=g)
    if informative:
        feats[..., :3] += 3 * torch.nn.functional.one_hot(patch_labels, 3)
    return feats, labels


def test_patch_probe_reads_linear_patch_semantics_and_not_noise():
    cfg = PatchProbeConfig(epochs=20, batch_size=16)
    good = patch_probe_miou(*_patch_task(64, 0, True), *_patch_task(32, 1, True), 3, cfg)
    noise = patch_probe_miou(*_patch_task(64, 0, False), *_patch_task(32, 1, False), 3, cfg)
    assert good > 80 and noise < 45


def test_cls_attention_matches_explicit_attention_and_mass_is_the_area_share_when_uniform():
    torch.manual_seed(0)
    blocks = torch.nn.Sequential(*[Block(16, 2, qkv_bias=True) for _ in range(2)]).eval()
    tokens = torch.randn(3, 1 + 16, 16)
    attn = cls_attention(tokens, blocks)
    # The reference: timm's own attention with the probabilities materialised.
    last = blocks[-1].attn
    last.fused_attn = False
    seen = {}
    hook = last.attn_drop.register_forward_hook(lambda m, a, out: seen.update(p=out))
    with torch.no_grad():
        blocks(tokens)
    hook.remove()
    expected = seen["p"][:, :, 0, 1:].mean(1)
    torch.testing.assert_close(attn, expected / expected.sum(1, keepdim=True))
    assert torch.allclose(attn.sum(1), torch.ones(3))
    objects = torch.zeros(3, 16, 16, dtype=torch.bool)
    objects[:, :8, :4] = True  # 2 of 16 patches full, at 4 px patches
    fraction = patch_fraction(objects, 4)
    assert fraction.shape == (3, 16) and fraction.sum(1).eq(2).all()
    uniform = torch.full((3, 16), 1 / 16)
    assert torch.allclose(attention_mass(uniform, fraction), torch.full((3,), 2 / 16))

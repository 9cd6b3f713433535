"""`compile=true`: the compiled model computes the eager model's loss and gradients (inductor, on CPU)."""

from __future__ import annotations

import pytest
import torch

from pretraining.models.factory import create_model
from pretraining.models.instances import instance_representation


def _batch(batch_size: int = 2, size: int = 64) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    blocks = torch.randint(0, 5, (batch_size, size // 16, size // 16), generator=g)
    ids = blocks.repeat_interleave(16, 1).repeat_interleave(16, 2)  # (B, H, W) regions of whole patches
    return {"rgb": torch.randn(batch_size, 3, size, size, generator=g), "semantic": ids * 3 % 6 - (ids == 0).long(),
            "instance_ids": ids, "instance": instance_representation(ids, 16)}


@pytest.mark.slow  # inductor compiles forward and backward: 81 s cold on 2 cores (load ~3), 16 s with a warm cache
def test_compiled_model_gives_the_eager_loss_and_gradients():
    torch.manual_seed(0)
    model = create_model("c2fmae_vit_tiny_patch16", num_semantic_classes=6, img_size=64, depth=2, decoder_depth=1)
    batch = _batch()
    batch = model.mask_batch(batch, torch.Generator().manual_seed(1), progress=0.5)

    def loss_and_grads(module):
        model.zero_grad(set_to_none=True)
        out = module(batch)
        out.loss.backward()
        return out, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    eager, eager_grads = loss_and_grads(model)
    compiled, compiled_grads = loss_and_grads(torch.compile(model))
    torch.testing.assert_close(compiled.loss, eager.loss, rtol=1e-4, atol=1e-5)
    for term in eager.terms:
        torch.testing.assert_close(compiled.terms[term], eager.terms[term], rtol=1e-4, atol=1e-5)
    assert compiled_grads.keys() == eager_grads.keys() and len(eager_grads) > 10
    for n, g in eager_grads.items():
        torch.testing.assert_close(compiled_grads[n], g, rtol=1e-3, atol=1e-5, msg=f"gradient of {n}")


def test_ddp_wraps_the_model_before_compile_and_the_loop_can_still_skip_a_sync(tmp_path, monkeypatch):
    """PyTorch's documented order (DDP, then torch.compile) so gradient all-reduce overlaps the backward; the
    compiled module still offers DDP's no_sync for accumulation. A one-process gloo group, dynamo's eager
    backend (no inductor compile: seconds)."""
    import functools

    import torch.distributed as dist
    from torch._dynamo.eval_frame import OptimizedModule
    from torch.nn.parallel import DistributedDataParallel

    from pretraining.training.distributed import Distributed, parallelize

    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="eager"))
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1)
    try:
        torch.manual_seed(0)
        model = create_model("c2fmae_vit_tiny_patch16", num_semantic_classes=6, img_size=64, depth=1, decoder_depth=1)
        wrapped = parallelize(model, Distributed(0, 2, torch.device("cpu")), compile=True)
        assert isinstance(wrapped, OptimizedModule) and isinstance(wrapped._orig_mod, DistributedDataParallel)
        assert wrapped._orig_mod.module is model
        batch = model.mask_batch(_batch(), torch.Generator().manual_seed(1), progress=0.5)
        with wrapped.no_sync():
            wrapped(batch).loss.backward()
        assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
        assert parallelize(model, Distributed(0, 1, torch.device("cpu")), compile=False) is model
    finally:
        dist.destroy_process_group()

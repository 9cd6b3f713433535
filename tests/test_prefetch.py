"""The device side of the loader: the side-stream prefetcher and a batch finished without host syncs."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from dataset_card.synthetic.shapes import write_synthetic_dataset
from pretraining.data.augment import AugmentConfig
from pretraining.data.loader import HOST_KEYS, DataConfig, PretrainingLoader, SampleSpec, open_labeled_dataset
from pretraining.data.prefetch import DevicePrefetcher
from pretraining.models.masking import MaskingConfig

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def loader(tmp_path_factory):
    root = tmp_path_factory.mktemp("labeled")
    write_synthetic_dataset(str(root), num_images=24, num_shards=3, size=(40, 48), seed=2)
    spec = SampleSpec(img_size=32, patch_size=8, modalities=("semantic", "instance", "rgb"),
                      masking=MaskingConfig(num_visible=12, num_positions=16), augment=AugmentConfig(),
                      ignore_value=255, seed=5, epochs=1)
    return PretrainingLoader(open_labeled_dataset(str(root)), spec, DataConfig(batch_size=4, num_workers=0,
                                                                                shuffle_buffer=8))


def _finished(batches, device, weights=(0.4, 0.4, 0.2)):
    return [{k: v.cpu() for k, v in b.to(device, weights).items()} for b in batches]


def _assert_same(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


def test_cpu_batches_pass_through_in_order(loader):
    plain = _finished(loader, torch.device("cpu"))
    _assert_same(_finished(DevicePrefetcher(loader, torch.device("cpu")), torch.device("cpu")), plain)


def test_the_loaders_max_id_changes_nothing_but_the_cost(loader):
    # The batch knows its largest instance id from the workers (no device read); without it, the sort paths.
    batches = list(loader)
    assert all(b.instance_max == max(int(c["instance_ids"].max()) for c in b.chunks) for b in batches)
    _assert_same(_finished(batches, torch.device("cpu")),
                 _finished([dataclasses.replace(b, instance_max=None) for b in batches], torch.device("cpu")))


@pytest.mark.gpu
def test_prefetched_batches_equal_plain_copies_and_finish_without_a_host_sync(loader):
    device = torch.device("cuda")
    plain = _finished(loader, device)
    batches = list(DevicePrefetcher(loader, device))
    assert all(v.device.type == "cuda" for b in batches for c in b.chunks for k, v in c.items() if k not in HOST_KEYS)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")  # any host-device sync in Batch.to raises
    try:
        outs = [b.to(device, (0.4, 0.4, 0.2)) for b in batches]
    finally:
        torch.cuda.set_sync_debug_mode("default")
    _assert_same([{k: v.cpu() for k, v in o.items()} for o in outs], plain)


"""The pretraining loader: contract checks, sharding over ranks x workers, resumable order, joint augmentation."""

from __future__ import annotations

import dataclasses
import io

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image
from torchvision import tv_tensors
from torchvision.transforms import v2

from dataset_card.contract import codecs, layout
from dataset_card.synthetic.shapes import write_synthetic_dataset
from pretraining.data.augment import AugmentConfig, augment, joint_transform, nearest_exact_index
from pretraining.data.loader import (
    Batch,
    DataConfig,
    DataError,
    PretrainingLoader,
    SampleSpec,
    Unit,
    chunk_sizes,
    collate,
    deal_units,
    make_sample,
    open_labeled_dataset,
    shuffle_buffer_order,
    split_rows,
)
from pretraining.models.instances import instance_representation
from pretraining.models.masking import INSTANCE, SEMANTIC, MaskingConfig

pytestmark = pytest.mark.usefixtures("one_thread")  # small ops: one thread beats two here


@pytest.fixture(scope="module")
def dataset_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("labeled")
    write_synthetic_dataset(str(root), num_images=64, num_shards=8, size=(40, 48), seed=1)  # 8 units of 8 rows
    return str(root)


def _spec(ignore_value=255, **kw) -> SampleSpec:
    base = dict(img_size=32, patch_size=8, modalities=("semantic", "instance", "rgb"),
                masking=MaskingConfig(num_visible=12, num_positions=16), augment=AugmentConfig(),
                ignore_value=ignore_value, seed=3, epochs=3)
    return SampleSpec(**{**base, **kw})


def _epochs(dataset_dir, rank=0, world_size=1, batch_size=4, num_workers=0, start=(0, 0), buffer=16):
    """{(epoch, step): {index: sample}} for one rank."""
    ds = open_labeled_dataset(dataset_dir)
    cfg = DataConfig(batch_size=batch_size, num_workers=num_workers, shuffle_buffer=buffer)
    out = {}
    for batch in PretrainingLoader(ds, _spec(), cfg, rank, world_size, start):
        tensors = batch.to(torch.device("cpu"))
        out[batch.epoch, batch.step] = {int(i): {k: v[j] for k, v in tensors.items()}
                                        for j, i in enumerate(tensors["index"])}
    return out


def test_open_reports_missing_folder_metadata_and_schema(tmp_path, dataset_dir):
    with pytest.raises(DataError, match="not a folder"):
        open_labeled_dataset(str(tmp_path / "nowhere"))
    with pytest.raises(DataError, match="metadata.json"):
        open_labeled_dataset(str(tmp_path))
    # A shard without the instance_mask column: the error names the column and the file.
    bad = tmp_path / "bad"
    (bad / "data").mkdir(parents=True)
    (bad / layout.METADATA_FILE).write_text(open(f"{dataset_dir}/{layout.METADATA_FILE}").read())
    table = pq.read_table(f"{dataset_dir}/{layout.data_path(0, 8)}").drop_columns(["instance_mask"])
    pq.write_table(table, bad / "data" / "train-00000-of-00001.parquet")
    with pytest.raises(DataError, match="instance_mask.*missing.*train-00000-of-00001"):
        open_labeled_dataset(str(bad))


def test_dataset_lists_row_groups_with_global_indices(dataset_dir):
    ds = open_labeled_dataset(dataset_dir)
    assert ds.num_rows == 64 and len(ds.units) == 8
    assert [u.first_index for u in ds.units] == list(range(0, 64, 8))
    assert ds.metadata.num_semantic_classes == 4


def test_shuffle_buffer_order_is_a_seeded_permutation():
    a = shuffle_buffer_order(100, 16, np.random.default_rng(0))
    assert sorted(a.tolist()) == list(range(100))
    assert np.array_equal(a, shuffle_buffer_order(100, 16, np.random.default_rng(0)))
    assert not np.array_equal(a, np.arange(100))
    assert np.array_equal(shuffle_buffer_order(10, 1, np.random.default_rng(0)), np.arange(10))


def test_deal_balances_rows_and_splits_units_when_streams_outnumber_them():
    units = [Unit(0, g, 0, n, 64 * g) for g, n in enumerate([64, 64, 64, 64, 64, 1, 64, 30])]
    streams = deal_units(units, 3, seed=0, epoch=0)
    rows = [sum(u.num_rows for u in s) for s in streams]
    assert sum(rows) == sum(u.num_rows for u in units) and max(rows) - min(rows) < 64
    few = deal_units(units[:2], 5, seed=0, epoch=0)  # 2 row groups, 5 streams: split into row ranges
    assert all(len(s) >= 1 for s in few)
    indices = sorted(i for s in few for u in s for i in range(u.first_index, u.first_index + u.num_rows))
    assert indices == list(range(128))
    assert split_rows([Unit(0, 0, 0, 3, 0)], 5) == [Unit(0, 0, a, a + 1, a) for a in range(3)]
    assert chunk_sizes(10, 4) == [3, 3, 2, 2]


def test_ranks_see_disjoint_samples_covering_the_data_each_epoch(dataset_dir):
    ranks = [_epochs(dataset_dir, rank=r, world_size=2) for r in range(2)]
    assert ranks[0].keys() == ranks[1].keys()  # the same steps on both ranks: DDP never waits
    for epoch in range(3):
        seen = [{i for (e, _), batch in r.items() if e == epoch for i in batch} for r in ranks]
        assert not seen[0] & seen[1]
        assert seen[0] | seen[1] == set(range(64))
    order = [[i for (e, _), b in sorted(ranks[0].items()) if e == epoch for i in b] for epoch in range(2)]
    assert order[0] != order[1]  # a new order each epoch


def test_global_batches_do_not_depend_on_how_streams_are_spread(dataset_dir):
    """2 ranks x 0 workers x batch 4 == 1 rank x 2 DataLoader workers x batch 8, sample for sample."""
    two_ranks = [_epochs(dataset_dir, rank=r, world_size=2, batch_size=4) for r in range(2)]
    one_rank = _epochs(dataset_dir, batch_size=8, num_workers=2)
    assert one_rank.keys() == two_ranks[0].keys()
    for key, batch in one_rank.items():
        assert batch.keys() == two_ranks[0][key].keys() | two_ranks[1][key].keys()
        for index, sample in batch.items():
            other = two_ranks[0][key].get(index) or two_ranks[1][key][index]
            assert all(torch.equal(sample[k], other[k]) for k in sample)


def test_resuming_mid_epoch_gives_exactly_the_remaining_batches(dataset_dir):
    full = _epochs(dataset_dir, batch_size=4)
    resumed = _epochs(dataset_dir, batch_size=4, start=(1, 5))
    assert sorted(resumed) == [k for k in sorted(full) if k >= (1, 5)]
    for key, batch in resumed.items():
        assert batch.keys() == full[key].keys()
        assert all(torch.equal(s[k], full[key][i][k]) for i, s in batch.items() for k in s)


def test_batch_format_and_instance_representation_after_crop(dataset_dir):
    batches = _epochs(dataset_dir, batch_size=4)
    sample = next(iter(batches[0, 0].values()))
    assert sample["rgb"].shape == (3, 32, 32) and sample["rgb"].dtype == torch.float32
    assert sample["semantic"].shape == (32, 32) and sample["semantic"].dtype == torch.int64
    assert sample["visible"].shape == (12,) and torch.all(sample["visible"][1:] > sample["visible"][:-1])
    assert 0 <= int(sample["strategy"]) <= 2
    for batch in batches.values():
        for s in batch.values():
            assert torch.equal(s["instance"], instance_representation(s["instance_ids"]))
            assert int(s["semantic"].min()) >= -1 and int(s["semantic"].max()) < 4


def test_ignore_value_becomes_minus_one():
    rgb = np.zeros((16, 16, 3), np.uint8)
    semantic = np.full((16, 16), 255, np.int64)
    semantic[:, :8] = 2
    instance = np.zeros((16, 16), np.int64)
    row = {"image": _png(rgb), "semantic_mask": _png(semantic.astype(np.uint8)),
           "instance_mask": _png(instance.astype(np.uint16)), "label": 1}
    spec = _spec(img_size=16, masking=MaskingConfig(num_visible=3, num_positions=4),
                 augment=AugmentConfig(scale=(1.0, 1.0), ratio=(1.0, 1.0), hflip=0.0))
    sample = make_sample(row, 7, 0, spec, joint_transform(16, spec.augment))
    assert sample["semantic"].dtype == torch.uint8  # compact between processes, as stored
    batch = Batch(0, 0, [collate([sample])], spec).to(torch.device("cpu"), (0.0, 0.0, 1.0))
    assert set(batch["semantic"].unique().tolist()) == {-1, 2}
    assert int(batch["index"]) == 7 and int(batch["label"]) == 1
    assert batch["visible"].shape == (1, 3) and int(batch["strategy"]) == 2  # random: (0, 0, 1) weights


def test_the_trainers_weights_choose_the_strategy_and_guided_mae_reads_the_masks(dataset_dir):
    ds = open_labeled_dataset(dataset_dir)
    cfg = DataConfig(batch_size=8, num_workers=0, shuffle_buffer=16)
    batch = next(iter(PretrainingLoader(ds, _spec(), cfg)))
    sem = batch.to(torch.device("cpu"), (1.0, 0.0, 0.0))  # weights for this step, not the epoch's
    inst = batch.to(torch.device("cpu"), torch.tensor([0.0, 1.0, 0.0]))  # a device tensor (adaptive)
    assert sem["strategy_requested"].eq(SEMANTIC).all() and inst["strategy_requested"].eq(INSTANCE).all()
    assert sem["strategy"].eq(SEMANTIC).sum() >= 6  # shapes scenes have >= 2 regions nearly always
    # An RGB-only model masked by semantic regions (MAE + semantic-guided) still reads the label maps.
    mae = _spec(modalities=("rgb",), masking=MaskingConfig(strategy="semantic", num_visible=4, num_positions=16))
    assert mae.reads_masks and not _spec(modalities=("rgb",), masking=MaskingConfig(
        strategy="random", num_visible=4, num_positions=16)).reads_masks
    guided = next(iter(PretrainingLoader(ds, mae, cfg))).to(torch.device("cpu"))
    assert guided["visible"].shape == (8, 4) and guided["strategy"].eq(SEMANTIC).sum() >= 6


def _encode_file(img: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


def _png(array: np.ndarray) -> bytes:
    return _encode_file(Image.fromarray(array), "PNG")


def test_joint_augmentation_keeps_maps_aligned():
    """Brightness encodes the class: after crop and flip, the image and both masks still agree pixel by pixel."""
    rng = np.random.default_rng(0)
    semantic = np.repeat(np.repeat(rng.integers(0, 2, size=(6, 8)), 10, 0), 10, 1)  # (60, 80) blocks of 2 classes
    rgb = torch.from_numpy(np.repeat((semantic * 250).astype(np.uint8)[..., None], 3, axis=2)).permute(2, 0, 1)
    instance = semantic * 7 + 1
    cfg = AugmentConfig()
    transform = joint_transform(32, cfg)
    flipped = 0
    for seed in range(20):
        image, sem, inst = (torch.as_tensor(x) for x in augment(rgb, semantic, instance, transform, seed))
        assert set(sem.unique().tolist()) <= {0, 1}  # nearest: no blended ids
        assert torch.equal(inst, sem * 7 + 1)  # both masks took the same crop and flip
        # Pixel-centre aligned: only pixels straddling an edge may differ (legacy NEAREST: ~6%).
        assert ((image[0] > 125).long() != sem).float().mean() < 0.01
        again = [torch.as_tensor(x) for x in augment(rgb, semantic, instance, transform, seed)]
        assert torch.equal(image, again[0]) and torch.equal(sem, again[1])
        no_flip = [torch.as_tensor(x) for x in
                   augment(rgb, semantic, instance, joint_transform(32, dataclasses.replace(cfg, hflip=0.0)), seed)]
        always = [torch.as_tensor(x) for x in
                  augment(rgb, semantic, instance, joint_transform(32, dataclasses.replace(cfg, hflip=1.0)), seed)]
        assert torch.equal(always[1], no_flip[1].flip(-1)) and torch.equal(always[0], no_flip[0].flip(-1))
        flipped += torch.equal(sem, always[1]) and not torch.equal(sem, no_flip[1])
    assert 3 < flipped < 17


@pytest.mark.parametrize("interpolation", ["bicubic", "bilinear"])
def test_the_image_crops_from_pils_buffer_as_from_the_contracts_pixels(interpolation):
    """image_tensor reads PIL's 4-byte pixels without a copy; the crop of its first three channels is
    the crop of decode_image's array, bit for bit, for any box, flip and size (and for files PIL does
    not hold as RGB: grey, palette, 16-bit)."""
    from pretraining.data.samples import image_tensor

    rng = np.random.default_rng(4)
    photo = rng.integers(0, 256, (61, 83, 3)).astype(np.uint8)
    grey16 = Image.fromarray(rng.integers(0, 65535, (61, 83)).astype(np.uint16))
    files = [_png(photo), _png(photo[:, :, 0]), _encode_file(Image.fromarray(photo).convert("P"), "PNG"),
             _encode_file(grey16, "PNG"), _encode_file(Image.fromarray(photo), "JPEG")]
    transform = joint_transform(32, AugmentConfig(interpolation=interpolation))
    for data in files:
        fast = image_tensor(data)
        assert fast.shape[0] in (3, 4) and fast.dtype == torch.uint8
        reference = torch.from_numpy(codecs.decode_image(data).copy()).permute(2, 0, 1)
        assert torch.equal(fast[:3], reference)
        for seed in range(8):
            with torch.random.fork_rng(devices=[]):
                torch.default_generator.manual_seed(seed)
                box = transform.draw(61, 83)
            assert torch.equal(transform.crop_image(fast, box), transform.crop_image(reference, box))


def test_an_image_over_pils_memory_block_is_copied_instead():
    """PIL splits an image above ~16 MB decoded over several blocks; its Arrow export refuses that,
    and image_tensor falls back to decode_image's pixels (3 channels)."""
    from pretraining.data.samples import image_tensor

    big = np.zeros((2100, 2100, 3), np.uint8)
    big[::7] = 200
    data = _encode_file(Image.fromarray(big), "JPEG")
    pixels = image_tensor(data)
    assert pixels.shape == (3, 2100, 2100)
    assert torch.equal(pixels, torch.from_numpy(codecs.decode_image(data).copy()).permute(2, 0, 1))


def test_nearest_exact_index_equals_torch_for_every_length():
    """The mask gather uses exactly the source pixels torch's nearest-exact resize picks."""
    for size in (16, 32, 224, 384):
        for length in range(1, 700):
            coords = torch.arange(length, dtype=torch.float32).view(1, length, 1)  # (1, length, 1): row numbers
            ref = v2.functional.resize(tv_tensors.Mask(coords), [size, 1],
                                       interpolation=v2.InterpolationMode.NEAREST_EXACT)
            assert np.array_equal(nearest_exact_index(5, length, size), ref.flatten().long().numpy() + 5), (size, length)


def test_masks_crop_as_torchvision_resizes_each_mask_alone():
    """The stacked, crop-first mask path gives exactly what v2 gives each int64 Mask on its own."""
    rng = np.random.default_rng(1)
    semantic = rng.integers(0, 150, (45, 70)).astype(np.uint8)
    instance = rng.integers(0, 3000, (45, 70)).astype(np.uint16)
    rgb = torch.from_numpy(rng.integers(0, 256, (3, 45, 70)).astype(np.uint8))
    transform = joint_transform(24, AugmentConfig())
    for seed in range(10):
        _, sem, inst = augment(rgb, semantic, instance, transform, seed)
        assert sem.dtype == semantic.dtype and inst.dtype == instance.dtype  # as stored: the caller widens
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(seed)
            params = transform.crop.make_params([torch.zeros(3, 45, 70)])
            flip = bool(torch.rand(1) < transform.hflip)
        for mine, source in ((torch.from_numpy(sem), semantic), (torch.from_numpy(inst), instance)):
            mask = tv_tensors.Mask(torch.from_numpy(source.astype(np.int64)))
            ref = v2.functional.resize(v2.functional.crop(mask, params["top"], params["left"], params["height"],
                                                          params["width"]),
                                       [24, 24], interpolation=v2.InterpolationMode.NEAREST_EXACT)
            assert torch.equal(mine.long(), ref.flip(-1) if flip else ref)


def test_samples_depend_on_seed_epoch_and_index_only(dataset_dir):
    def by_index(run, epoch):
        return {i: s for (e, _), batch in run.items() if e == epoch for i, s in batch.items()}

    a = _epochs(dataset_dir, batch_size=4)
    b = _epochs(dataset_dir, batch_size=2, buffer=4)  # other batches, another order
    a0, b0, a1 = by_index(a, 0), by_index(b, 0), by_index(a, 1)
    assert a0.keys() == b0.keys() == set(range(64))
    assert all(torch.equal(a0[i][k], b0[i][k]) for i in a0 for k in a0[i])
    changed = sum(not torch.equal(a0[i]["rgb"], a1[i]["rgb"]) for i in a0)
    assert changed > 48  # a new crop next epoch


def test_too_small_for_one_step_is_a_clear_error(dataset_dir):
    ds = open_labeled_dataset(dataset_dir)
    with pytest.raises(DataError, match="cannot fill one step"):
        PretrainingLoader(ds, _spec(), DataConfig(batch_size=64, num_workers=0), 0, 2)


# The GPU decode path (data.decode=device) is gone: the workers decode every image ---------------------------


@pytest.mark.parametrize("flag", ["--set", "--amend"])
def test_the_removed_decode_key_is_refused_in_one_sentence_naming_what_to_use(flag):
    from pretraining.training.config import ConfigError, amend, apply_overrides
    from pretraining.training.recipes import get_recipe

    give = apply_overrides if flag == "--set" else lambda cfg, items: amend(cfg, items)[0]
    with pytest.raises(ConfigError) as err:
        give(get_recipe("tiny"), ["data.decode=device"])
    assert str(err.value) == (f"{flag} data.decode=device: data.decode was removed: images are always decoded in the "
                              "loader workers (set data.num_workers for more of them); docs/training.md says why.")


@pytest.mark.parametrize("decode", ["worker", "device"])
def test_a_stored_config_with_data_decode_resumes_on_the_workers(decode):
    from pretraining.training.config import TrainConfig, from_dict, to_dict
    from pretraining.training.recipes import get_recipe
    from pretraining.training.run_folder import upgrade

    cfg = get_recipe("tiny")
    stored = to_dict(cfg)
    stored["data"]["decode"] = decode  # as a run written before the removal stored it
    assert from_dict(TrainConfig, upgrade(stored, {"world_size": 1})) == cfg
    assert "decode" in stored["data"]  # the caller's dict is left as it was

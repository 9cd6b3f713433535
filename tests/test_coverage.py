"""Coverage (dataset_card.contract.coverage) counts the instance regions the trainer's masking forms:
the same resize, the same patch majority and the same ">= 2 regions" rule as pretraining's code,
which dataset_card does not import (this test ties them)."""

import numpy as np
import pytest
import torch

from dataset_card.contract import coverage, layout
from pretraining.data.augment import nearest_exact_index
from pretraining.models.masking import guided_masked, patch_majority


def _maps(seed: int):
    rng = np.random.default_rng(seed)
    for h, w in ((224, 224), (375, 500), (37, 53), (5, 7), (1000, 333)):
        blocks = rng.integers(0, 6, size=(rng.integers(1, 9), rng.integers(1, 9)))  # a few large regions
        big = blocks[np.minimum(np.arange(h) * blocks.shape[0] // h, blocks.shape[0] - 1)][
            :, np.minimum(np.arange(w) * blocks.shape[1] // w, blocks.shape[1] - 1)]
        noisy = np.where(rng.random((h, w)) < 0.3, rng.integers(0, 6, size=(h, w)), big)  # ties and speckle
        yield noisy.astype(np.uint8)
    yield np.zeros((64, 64), np.uint8)  # no instance at all
    yield np.full((50, 80), 3, np.uint16)  # one region


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_regions_are_the_trainers_patch_majorities_and_its_guided_rule(seed):
    for instance_map in _maps(seed):
        h, w = instance_map.shape
        assert np.array_equal(coverage.nearest_exact_index(h, 224), nearest_exact_index(0, h, 224))
        resized = instance_map[nearest_exact_index(0, h, 224)][:, nearest_exact_index(0, w, 224)]
        trainer = patch_majority(torch.from_numpy(resized.astype(np.int64))[None], 16)[0]  # (196,)
        assert np.array_equal(coverage.patch_ids(instance_map), trainer.numpy())
        keys = torch.rand(2, 1, 196, generator=torch.Generator().manual_seed(seed))
        _, guided = guided_masked(trainer[None], torch.ones(1, dtype=torch.int64), keys[0], keys[1], 147)
        assert bool(guided[0]) == (coverage.regions(instance_map) >= coverage.MIN_REGIONS)
        assert coverage.regions(instance_map) == len(set(trainer.tolist()) - {0})


def test_measure_counts_painted_ids_and_names_the_largest_masks_level():
    instance_map = np.zeros((300, 200), np.uint8)
    instance_map[:150] = 2
    instance_map[150:, :100] = 5
    instance_map[299, 199] = 7  # painted, too small to own a patch
    instances = [{"id": 1, "level": "stuff"}, {"id": 2, "level": "object"}]
    measured = coverage.measure(instances, instance_map)
    assert measured == coverage.RowCoverage(painted=3, regions=2, largest="stuff")
    assert coverage.measure([], np.zeros((10, 10), np.uint8)) == coverage.RowCoverage(0, 0, "none")


def test_shard_statistics_sum_the_coverage_histograms():
    a, b = layout.ShardStats(shard=0), layout.ShardStats(shard=1)
    a.add_row(3, 0.5, [1.0], {0: 10}, measured=coverage.RowCoverage(1, 1, "object"))
    a.add_row(0, 0.0, [], {0: 10}, measured=coverage.RowCoverage(0, 0, "none"))
    b.add_row(9, 0.9, [1.0], {0: 10}, measured=coverage.RowCoverage(12, 7, "stuff"))
    b.add_row(2, 0.1, [1.0], {0: 10})  # measured by no one (an older folder's row)
    total = layout.ShardStats.from_json(a.merge(b).to_json())
    assert total.coverage_measured == 3 and total.rows == 4
    assert total.painted_per_image == coverage.histogram([1, 0, 12])
    assert total.regions_per_image == [1, 1, 0, 0, 0, 1, 0, 0, 0]  # 0, 1 and 7 (the 5-9 bin)
    assert total.largest_mask == {"object": 1, "none": 1, "stuff": 1}


def test_stats_json_coverage_its_summary_line_and_the_few_regions_warning():
    from labeling.pipeline import finish

    total = layout.ShardStats()
    for painted, regions, largest in ((0, 0, "stuff"), (1, 1, "object"), (3, 2, "object"), (9, 6, "dropped")):
        total.add_row(painted, 0.5, [], {0: 1}, measured=coverage.RowCoverage(painted, regions, largest))
    cov = finish.coverage_stats(total)
    assert cov["images"] == 4 and cov["share_under_min_regions"] == 0.5
    assert cov["instance_regions_per_image"]["0"] == 1 and cov["instance_regions_per_image"]["5-9"] == 1
    assert sum(cov["painted_objects_per_image"].values()) == 4
    assert cov["largest_mask_level"] == {"object": 2, "stuff": 1, "dropped": 1}
    line = finish.coverage_line(cov)
    assert "50.0% have under 2 instance regions" in line and "stuff in 25.0%" in line and "dropped in 25.0%" in line
    assert finish.few_regions_warning(cov) is None  # half is not more than half
    total.add_row(0, 0.0, [], {0: 1}, measured=coverage.RowCoverage(0, 0, "none"))
    warning = finish.few_regions_warning(finish.coverage_stats(total))
    assert warning.startswith("warning: 60% of the images have fewer than 2 instance regions")
    assert finish.coverage_line(finish.coverage_stats(layout.ShardStats())) == "coverage: no image measured"

"""`--sample N`: a class-stratified, deterministic, nested sample, in shards planned for every input,
so a trial folder grows into a larger sample and then the full run, relabeling nothing it did."""

import io
import json
import random
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from labeling.inputs.folder import list_image_folder
from labeling.inputs.input_list import InputError, inputs_table
from labeling.inputs.sample import draw_sample, stratified_order
from labeling.pipeline import manifest


def write_tree(root: Path, sizes: dict[str, int], image: bytes = b"") -> None:
    for name, count in sizes.items():
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(count):
            (root / name / f"{name}_{i:03d}.jpg").write_bytes(image)


SIZES = {"n01": 10, "n02": 3, "n03": 7, "n04": 20}


def classes_of(listed, sample) -> Counter:
    return Counter(listed.class_names[label] for label in sample.table.column("label").to_pylist())


def test_a_sample_takes_every_class_in_turn_until_one_runs_out(tmp_path):
    write_tree(tmp_path, SIZES)
    listed = list_image_folder(str(tmp_path), progress=False)
    assert dict(classes_of(listed, draw_sample(listed, 12))) == {"n01": 3, "n02": 3, "n03": 3, "n04": 3}
    counts = classes_of(listed, draw_sample(listed, 25))  # n02 runs out at 3: the others share the rest
    assert counts["n02"] == 3 and counts["n03"] == 7 and sorted((counts["n01"], counts["n04"])) == [7, 8]
    assert classes_of(listed, draw_sample(listed, 100)) == Counter(SIZES)  # more than there are: all of them


def test_a_sample_is_deterministic_nested_kept_in_input_order_and_planned_for_every_input(tmp_path):
    write_tree(tmp_path, SIZES)
    listed = list_image_folder(str(tmp_path), progress=False)
    ids = [draw_sample(listed, n).table.column("image_id").to_pylist() for n in (5, 11, 23, 40)]
    assert ids[1] == draw_sample(listed, 11).table.column("image_id").to_pylist()  # the same twice
    for small, large in zip(ids, ids[1:]):
        assert set(small) < set(large)  # a bigger sample holds the smaller one: growing relabels nothing
    assert all(i == sorted(i) for i in ids)  # input (sorted) order
    sample = draw_sample(listed, 11)
    assert len(sample) == 11 and sample.planned == len(listed) == 40 and listed.planned == 40
    assert draw_sample(listed, 11, seed=1).table.column("image_id").to_pylist() != ids[1]
    with pytest.raises(InputError, match="--sample 0"):
        draw_sample(listed, 0)


def test_the_order_depends_on_ids_and_seed_only_not_on_listing_order():
    rng = random.Random(0)
    ids = [f"c{c}/img_{i}" for c in range(5) for i in range(rng.randint(1, 9))]
    classes = [i.split("/")[0] for i in ids]
    names = sorted(set(classes))
    order = [ids[i] for i in stratified_order(ids, [names.index(c) for c in classes], names, seed=3)]
    shuffled = list(zip(ids, classes))
    rng.shuffle(shuffled)
    renamed = names[::-1]  # the same classes under other indices: the order follows names, not indices
    again = [shuffled[i][0] for i in stratified_order([s[0] for s in shuffled],
                                                      [renamed.index(s[1]) for s in shuffled], renamed, seed=3)]
    assert order == again and sorted(order) == sorted(ids)
    # Round-robin: each prefix's class counts are within one of each other while every class has images.
    smallest = min(Counter(classes).values())
    for n in range(1, 5 * smallest + 1):
        counts = Counter(i.split("/")[0] for i in order[:n])
        assert max(counts.values()) - min(counts.get(f"c{c}", 0) for c in range(5)) <= 1


def test_inputs_the_listing_failed_are_never_drawn(tmp_path):
    from labeling.inputs.input_list import Inputs

    entries = [("a/x.jpg", "a/x", 0, "a/x.jpg"), ("a/x.png", "a/x", 0, "a/x.png"), ("b/y.jpg", "b/y", 1, "b/y.jpg")]
    listed = Inputs(None, ("a", "b"), inputs_table(entries))
    assert draw_sample(listed, 3).table.column("path").to_pylist() == ["a/x.jpg", "b/y.jpg"]


def _manifest(num_inputs: int, planned: int) -> dict:
    return manifest.build(num_inputs, f"hash-{num_inputs}", 4, {"models": "tiny-random"}, {}, {}, ("a", "b"),
                          planned_inputs=planned)


def test_a_trial_folder_is_planned_for_the_full_run_and_resumes_into_it(tmp_path):
    from dataset_card.contract.output_folder import OutputFolder

    folder = OutputFolder.open(str(tmp_path / "out"))
    trial = _manifest(6, 40)
    assert trial["num_shards"] == 10 and trial["planned_inputs"] == 40
    manifest.prepare(folder, trial, overwrite=False, log=lambda m: None)
    for num_inputs in (15, 40):  # a bigger sample, then the full run: the same shards
        resumed, used = manifest.prepare(folder, _manifest(num_inputs, 40), overwrite=False, log=lambda m: None)
        assert resumed and used["num_shards"] == 10
    # --limit sizes the folder for what it keeps: growing it past four times --shard-size is refused.
    limited = OutputFolder.open(str(tmp_path / "limited"))
    manifest.prepare(limited, _manifest(6, 6), overwrite=False, log=lambda m: None)
    with pytest.raises(manifest.ResumeRefused, match="shards hold about 20 images"):
        manifest.prepare(limited, _manifest(40, 40), overwrite=False, log=lambda m: None)


def _jpeg(seed: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(buf, "JPEG")
    return buf.getvalue()


def _rows(output: Path) -> dict[str, tuple]:
    """image_id -> (its instance map, semantic map and instances) over every data file."""
    out = {}
    for path in sorted((output / "data").glob("train-*.parquet")):
        for row in pq.read_table(path, columns=["image_id", "instance_mask", "semantic_mask", "instances"]).to_pylist():
            out[row["image_id"]] = (row["instance_mask"]["bytes"], row["semantic_mask"]["bytes"], str(row["instances"]))
    return out


@pytest.mark.ray
@pytest.mark.slow
def test_a_trial_grows_into_a_larger_sample_then_the_full_run_relabeling_nothing(tmp_path, ray_session):
    from dataset_card.validate import validate
    from labeling.pipeline.config import LabelingConfig
    from labeling.pipeline.driver import run_labeling

    images, output = tmp_path / "train", tmp_path / "out"
    for c, count in enumerate((6, 3, 5)):
        (images / f"n0{c}").mkdir(parents=True)
        for i in range(count):
            (images / f"n0{c}" / f"n0{c}_{i}.jpg").write_bytes(_jpeg(10 * c + i))
    small = {"models": "tiny-random", "model_actors": 1, "actor_cpus": 0.5, "task_cpus": 0.5, "model_batch_size": 4,
             "read_batch_size": 4, "postprocess_batch_size": 4, "progress": False, "shard_size": 4}
    log: list[str] = []
    done: dict[str, tuple] = {}
    for sample, expected in ((4, 4), (None, 14)):  # a trial, then the full run (a larger sample resumes alike)
        stats = run_labeling(LabelingConfig(input=str(images), output=str(output), sample=sample, **small),
                             log=log.append)
        rows = _rows(output)
        assert len(rows) == stats["written"] == expected
        assert stats["processed"] == expected - len(done)  # only what is new went through the models
        assert {k: rows[k] for k in done} == done  # and what the trial labeled is kept byte for byte
        assert len(list((output / "data").glob("train-*.parquet"))) == 4  # shards planned for all 14
        assert validate(str(output)).ok
        # Coverage is measured while labeling, summed over the folder's rows (kept ones too), and on the card.
        saved = json.loads((output / "stats.json").read_text())["coverage"]
        assert saved["images"] == expected == sum(saved["instance_regions_per_image"].values())
        assert sum(saved["largest_mask_level"].values()) == expected
        assert any(line.startswith(f"coverage of {expected} images: ") for line in log)
        card = (output / "README.md").read_text()
        assert "### Regions for instance-guided masking" in card and "assets/masking_coverage.png" in card
        assert (output / "assets" / "masking_coverage.png").stat().st_size > 10_000
        assert ("class-stratified, 4 of 14 inputs (`--sample 4`, seed 0)" in card) == (sample is not None)
        done = rows
    assert any("4 inputs (a sample of 14, seed 0)" in line for line in log)

"""`python -m dataset_card validate`: passes on good output and names the file and row of each
corruption, planted in a shard other than the first."""

import json
import shutil

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from dataset_card.__main__ import main
from dataset_card.contract import codecs, layout
from dataset_card.contract.schema import SCHEMA_METADATA_KEY, SCHEMA_VERSION
from dataset_card.synthetic.shapes import (
    CLASS_NAMES,
    SEMANTIC_CLASSES,
    shapes_image,
    synthetic_row,
    write_synthetic_dataset,
)
from dataset_card.validate import row_problems, sample_plan, validate

NUM_SHARDS = 3
SHARD1 = layout.data_path(1, NUM_SHARDS)
SHARD2 = layout.data_path(2, NUM_SHARDS)


def add_failed_input(root, shard: int, num_shards: int, image_id: str) -> None:
    """Record one failed input in `shard` the way the labeler does: errors table, stats, manifest."""
    errors = pa.Table.from_pylist([{"image_id": image_id, "path": f"{image_id}.JPEG", "label": 0, "stage": "decode",
                                    "error_type": "decode", "message": "cannot decode image"}],
                                  schema=layout.ERRORS_SCHEMA)
    pq.write_table(errors, root / layout.errors_path(shard, num_shards))
    stats_file = root / layout.stats_path(shard, num_shards)
    stats = layout.ShardStats.from_json(stats_file.read_text())
    stats.add_error("decode")
    stats_file.write_text(stats.to_json())
    manifest = json.loads((root / layout.MANIFEST_FILE).read_text())
    manifest["num_inputs"] += 1
    (root / layout.MANIFEST_FILE).write_text(json.dumps(manifest))


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    root = tmp_path_factory.mktemp("good")
    write_synthetic_dataset(str(root), num_images=15, num_shards=NUM_SHARDS, size=(40, 48), seed=3)
    add_failed_input(root, 2, NUM_SHARDS, "few_shapes/broken")
    return root


@pytest.fixture
def folder(good, tmp_path):
    """A private copy of the good output to corrupt."""
    return shutil.copytree(good, tmp_path / "output")


def rewrite(path, edit_rows=None, schema_version=None) -> None:
    """Rewrite a data file in place with `edit_rows(rows)` applied and/or another schema version."""
    table = pq.read_table(path)
    schema = table.schema
    if schema_version is not None:
        meta = dict(schema.metadata)
        meta[SCHEMA_METADATA_KEY] = json.dumps({"schema_version": schema_version}).encode()
        schema = schema.with_metadata(meta)
    rows = table.to_pylist()
    if edit_rows:
        edit_rows(rows)
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), path, row_group_size=2)


def messages(report, file):
    return [(v.row, v.message) for v in report.violations if v.file == file]


def test_good_output_passes_with_every_row_decoded(good):
    report = validate(str(good), full=True)
    assert report.ok, report.format()
    assert (report.rows, report.errors, report.shards, report.checked_rows) == (15, 1, NUM_SHARDS, 15)
    assert validate(str(good), sample=6).checked_rows == 6  # in proportion to the shards' sizes
    assert validate(str(good), sample=1).checked_rows == NUM_SHARDS  # but at least one row from each


def test_sample_plan_is_seeded_and_reaches_every_non_empty_shard():
    sizes = {"a": 1000, "b": 3, "c": 0, "d": 50}
    plan = sample_plan(sizes, sample=10, seed=0)
    assert set(plan) == {"a", "b", "d"}
    assert all(len(rows) >= 1 and rows == sorted(set(rows)) and max(rows) < sizes[f] for f, rows in plan.items())
    assert plan == sample_plan(sizes, sample=10, seed=0)
    assert plan != sample_plan(sizes, sample=10, seed=1)
    assert sum(map(len, sample_plan({"a": 5}, sample=100, seed=0).values())) == 5


def test_missing_shard(folder):
    (folder / SHARD1).unlink()
    report = validate(str(folder))
    assert not report.ok
    assert any("missing" in m for _, m in messages(report, SHARD1))
    assert any("inputs" in m for _, m in messages(report, layout.MANIFEST_FILE))


@pytest.mark.parametrize("copy_name", ["train-00002-of-00003 (1).parquet", "train-00002-of-00004.parquet"])
def test_duplicated_shard_file(folder, copy_name):
    shutil.copy(folder / SHARD2, folder / layout.DATA_DIR / copy_name)
    report = validate(str(folder))
    found = messages(report, f"{layout.DATA_DIR}/{copy_name}")
    assert any(row is None and ("not a file of this run" in m or "run of 4 shards" in m) for row, m in found)
    # Its rows would be loaded too: each repeats an id of shard 2.
    duplicates = [(row, m) for row, m in found if "duplicate image_id" in m]
    assert len(duplicates) == pq.read_metadata(folder / SHARD2).num_rows
    assert all(f"first at {SHARD2} row {row}" in m for row, m in duplicates)


def test_duplicate_id(folder):
    first_id = pq.read_table(folder / layout.data_path(0, NUM_SHARDS), columns=["image_id"])["image_id"][0].as_py()

    def plant(rows):
        rows[1]["image_id"] = first_id

    rewrite(folder / SHARD2, plant)
    report = validate(str(folder))
    assert messages(report, SHARD2) == [
        (1, f"duplicate image_id {first_id!r}, first at {layout.data_path(0, NUM_SHARDS)} row 0")]
    assert len(report.violations) == 1


def test_id_both_labeled_and_failed(folder):
    labeled = pq.read_table(folder / SHARD1, columns=["image_id"])["image_id"][0].as_py()
    errors_file = folder / layout.errors_path(2, NUM_SHARDS)
    table = pq.read_table(errors_file)
    pq.write_table(table.set_column(0, "image_id", pa.array([labeled])), errors_file)
    report = validate(str(folder))
    assert any(row == 0 and "also has a labeled row" in m
               for row, m in messages(report, layout.errors_path(2, NUM_SHARDS)))


def test_corrupt_rle_is_found_by_full_check_even_outside_the_sample(folder):
    rows_in_shard = pq.read_metadata(folder / SHARD1).num_rows
    plan = sample_plan({SHARD1: rows_in_shard}, sample=1, seed=0)
    target = next(r for r in range(rows_in_shard) if r not in plan[SHARD1])

    def plant(rows):
        inst = rows[target]["instances"][0]
        inst["rle"]["counts"] = inst["rle"]["counts"][:-2]  # too short: pycocotools would not complain

    rewrite(folder / SHARD1, plant)
    assert not any(v.file == SHARD1 for v in validate(str(folder), sample=1).violations)
    report = validate(str(folder), full=True)
    assert messages(report, SHARD1) == [(target, "instance 1: RLE does not decode to a 40x48 mask (corrupt counts)")]


def test_wrong_schema_version_in_a_shard(folder):
    rewrite(folder / SHARD2, schema_version=1)
    report = validate(str(folder))
    (violation,) = report.violations  # its rows still count: no spurious count mismatch
    assert violation.file == SHARD2 and violation.row is None
    assert "version 1" in violation.message and f"reads version {SCHEMA_VERSION}" in violation.message
    assert f"python -m dataset_card repaint {folder}" in violation.message


def test_wrong_schema_version_in_metadata(folder):
    meta = json.loads((folder / layout.METADATA_FILE).read_text())
    meta["schema_version"] = 99
    (folder / layout.METADATA_FILE).write_text(json.dumps(meta))
    (violation,) = validate(str(folder)).violations
    assert violation.file == layout.METADATA_FILE and "version 99" in violation.message


def test_stray_and_missing_companion_files(folder):
    (folder / layout.stats_path(1, NUM_SHARDS)).unlink()
    (folder / layout.DATA_DIR / "notes.txt").write_text("hello")
    (folder / layout.DATA_DIR / ".train-00001-of-00003.parquet.tmp").write_text("")
    report = validate(str(folder))
    assert any("missing" in m for _, m in messages(report, layout.stats_path(1, NUM_SHARDS)))
    assert messages(report, f"{layout.DATA_DIR}/notes.txt")
    assert len(report.violations) == 2 and len(report.notes) == 1


def test_row_problems_name_each_broken_invariant():
    rng = np.random.default_rng(0)
    rgb, semantic, shapes = shapes_image(rng, 32, 40, max_shapes=4)
    metadata = layout.DatasetMetadata(CLASS_NAMES, SEMANTIC_CLASSES)
    row, painted = synthetic_row("few_shapes/x", 0, rgb, semantic, [m for _, m in shapes])
    assert row_problems(row, metadata) == []

    shifted = dict(row, instance_mask={"bytes": codecs.encode_mask(np.roll(painted, 3, axis=1)), "path": None})
    assert any("differs from what painting rule 'objects' paints" in p for p in row_problems(shifted, metadata))
    bad_semantic = semantic.copy()
    bad_semantic[0, 0] = 7  # 4 classes, ignore value 255
    assert any("outside the 4 classes" in p for p in row_problems(
        dict(row, semantic_mask={"bytes": codecs.encode_mask(bad_semantic), "path": None}), metadata))
    small = dict(row, height=31)
    assert any("is 40x32 pixels but width x height is 40x31" in p for p in row_problems(small, metadata))
    renumbered = dict(row, instances=[dict(i, id=i["id"] + 1) for i in row["instances"]])
    assert any("not 1.." in p for p in row_problems(renumbered, metadata))


def test_cli_exit_code_and_report(good, folder, capsys):
    assert main(["validate", str(good)]) == 0
    assert "valid" in capsys.readouterr().out
    (folder / SHARD1).unlink()
    assert main(["validate", str(folder)]) == 1
    assert f"{SHARD1}: is missing" in capsys.readouterr().err
    assert main(["validate", str(folder / "nowhere")]) == 2
    assert "does not exist" in capsys.readouterr().err

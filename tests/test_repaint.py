"""`python -m dataset_card repaint`: v1 and v2 folders (written by the v1 and v2 code) come out as
valid current ones; a repaint is resumable shard by shard and reversible; every reader refuses an
old folder with the fix."""

import json
import shutil
from pathlib import Path

import datasets
import numpy as np
import pyarrow.parquet as pq
import pytest

from dataset_card import repaint
from dataset_card.__main__ import main
from dataset_card.card.build import build_card
from dataset_card.contract import codecs, layout, painting
from dataset_card.contract.schema import SCHEMA_VERSION, SchemaError, read_file_metadata
from dataset_card.synthetic.shapes import write_synthetic_dataset
from dataset_card.validate import validate
from pretraining.data.loader import DataError, open_labeled_dataset

V1 = Path(__file__).parent / "data" / "schema_v1"
V2 = Path(__file__).parent / "data" / "schema_v2"


@pytest.fixture
def v1(tmp_path):
    return shutil.copytree(V1, tmp_path / "v1")


@pytest.fixture
def v2(tmp_path):
    return shutil.copytree(V2, tmp_path / "v2")


def maps(row):
    return [codecs.decode_mask(row[c]["bytes"]) for c in ("semantic_mask", "instance_mask")]


def rows(folder):
    return [row for f in sorted((folder / layout.DATA_DIR).glob("train-*.parquet"))
            for row in pq.read_table(f).to_pylist()]


def test_every_reader_refuses_a_v1_folder_with_both_versions_and_the_fix(v1, capsys):
    fix = f"python -m dataset_card repaint {v1}"
    with pytest.raises(DataError) as err:
        open_labeled_dataset(str(v1))
    assert "version 1" in str(err.value) and f"version {SCHEMA_VERSION}" in str(err.value) and fix in str(err.value)
    assert "\n" not in str(err.value)
    with pytest.raises(SchemaError, match=fix):
        build_card(str(v1))
    report = validate(str(v1))
    assert not report.ok and any(fix in v.message for v in report.violations)
    assert main(["build", str(v1)]) == 2 and fix in capsys.readouterr().err


def test_repaint_turns_a_v1_folder_into_a_valid_current_one(v1, capsys):
    before = rows(v1)
    assert main(["repaint", str(v1)]) == 0
    assert "repainted 2 shards (6 rows) under rule 'objects'" in capsys.readouterr().out
    report = validate(str(v1), full=True)
    assert report.ok, report.format()
    assert report.figures.painted > 0 and report.figures.nested == 0
    metadata = json.loads((v1 / layout.METADATA_FILE).read_text())
    manifest = json.loads((v1 / layout.MANIFEST_FILE).read_text())
    assert metadata["schema_version"] == manifest["schema_version"] == SCHEMA_VERSION
    assert metadata["painting"]["name"] == "objects"
    assert manifest["repaints"][0]["from_schema_version"] == 1 and manifest["repaints"][0]["shards"] == 2
    after = rows(v1)
    # Everything but the map and the instances' new fields is as it was, byte for byte; the
    # semantic map's values too (its encoding is v3's now).
    for old, new in zip(before, after):
        for column in ("image_id", "label", "image", "width", "height"):
            assert old[column] == new[column]
        assert np.array_equal(maps(old)[0], maps(new)[0])
        assert new["semantic_mask"]["bytes"][:4] == new["instance_mask"]["bytes"][:4] == codecs.ZSTD_MAGIC
        for a, b in zip(old["instances"], new["instances"]):
            assert {k: v for k, v in b.items() if k not in ("level", "parent", "visible_area")} == \
                   {k: v for k, v in a.items() if k != "visible_area"}
            assert b["level"] in painting.LEVELS
    stats = layout.ShardStats.from_json((v1 / layout.stats_path(0, 2)).read_text())
    assert sum(stats.levels.values()) == stats.instances and stats.painted > 0
    card = (v1 / layout.CARD_FILE).read_text()
    assert "Objects, parts and alignment" in card and f"Schema (version {SCHEMA_VERSION})" in card
    assert open_labeled_dataset(str(v1)).num_rows == 6
    ds = datasets.load_dataset(str(v1), split="train", cache_dir=str(v1.parent / "cache"))
    assert ds[0]["instances"][0]["level"] in painting.LEVELS


def test_the_parts_rule_repaints_v1s_own_map(v1):
    """v1's map was the "parts" rule's: repainting a v1 folder under it changes no map."""
    before = rows(v1)
    result = repaint.repaint(str(v1), "parts")
    assert result.from_version == 1 and result.repainted == (0, 1)
    assert all(np.array_equal(maps(a)[1], maps(b)[1]) for a, b in zip(rows(v1), before))
    assert validate(str(v1), full=True).ok


def test_repaint_upgrades_a_v2_folder_keeping_every_value(v2, capsys, monkeypatch):
    """v2 stored its label maps as PNG: the upgrade re-encodes them (same values, its own rule), and
    the trainer, refusing the folder before with the fix, reads it after."""
    before = rows(v2)
    stats_before = [json.loads((v2 / layout.stats_path(i, 2)).read_text()) for i in range(2)]
    with pytest.raises(DataError, match=f"version 2.*python -m dataset_card repaint {v2}"):
        open_labeled_dataset(str(v2))
    monkeypatch.setattr(repaint, "repaint_row", None)  # under the folder's own rule nothing is repainted
    assert main(["repaint", str(v2)]) == 0
    assert "repainted 2 shards (6 rows) under rule 'objects'" in (out := capsys.readouterr().out)
    assert f"is dataset schema v{SCHEMA_VERSION} and its card is rebuilt" in out
    assert validate(str(v2), full=True).ok
    after = rows(v2)
    for old, new in zip(before, after):
        assert old["semantic_mask"]["bytes"][:4] != codecs.ZSTD_MAGIC
        assert new["semantic_mask"]["bytes"][:4] == new["instance_mask"]["bytes"][:4] == codecs.ZSTD_MAGIC
        assert all(np.array_equal(a, b) for a, b in zip(maps(old), maps(new)))
        assert old["instances"] == new["instances"] and old["image"] == new["image"]
    # Only re-encoded: the statistics are as they were (with the fields this version adds at their
    # defaults: coverage was not measured for these rows).
    stats_after = [json.loads((v2 / layout.stats_path(i, 2)).read_text()) for i in range(2)]
    assert [{k: s[k] for k in b} for s, b in zip(stats_after, stats_before)] == stats_before
    assert all(s["coverage_measured"] == 0 for s in stats_after)
    assert json.loads((v2 / layout.MANIFEST_FILE).read_text())["repaints"][0]["from_schema_version"] == 2
    assert open_labeled_dataset(str(v2)).num_rows == 6
    ds = datasets.load_dataset(str(v2), split="train", cache_dir=str(v2.parent / "cache"))
    assert ds.features["semantic_mask"] == {"bytes": datasets.Value("binary"), "path": datasets.Value("string")}


def test_repaint_resumes_after_a_crash_and_is_reversible(tmp_path, monkeypatch):
    folder = tmp_path / "out"
    write_synthetic_dataset(str(folder), num_images=9, num_shards=3, size=(40, 48), seed=2)
    original = rows(folder)
    real, calls = repaint.repaint_shard, []

    def crash_on_the_second(*args):
        calls.append(args[1])
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args)

    monkeypatch.setattr(repaint, "repaint_shard", crash_on_the_second)
    with pytest.raises(KeyboardInterrupt):
        repaint.repaint(str(folder), "parts")
    # Shard 0 is done, 1 and 2 are as they were (never half), and the folder says it is not finished.
    rules = [read_file_metadata(pq.read_schema(folder / layout.data_path(i, 3)))["painting"]["name"] for i in range(3)]
    assert rules == ["parts", "objects", "objects"]
    report = validate(str(folder))
    assert [v.file for v in report.violations] == [layout.data_path(0, 3)]
    assert "finish the repaint" in report.violations[0].message
    monkeypatch.setattr(repaint, "repaint_shard", real)
    result = repaint.repaint(str(folder), "parts", workers=2)
    assert result.skipped == (0,) and result.repainted == (1, 2)
    assert validate(str(folder), full=True).ok
    assert repaint.repaint(str(folder), "parts").repainted == ()  # nothing left to do
    for row in rows(folder):  # the parts rule: every full mask, later ids on top
        semantic = codecs.decode_mask(row["semantic_mask"]["bytes"])
        expected = np.zeros_like(semantic, dtype=np.uint16)
        for inst in sorted(row["instances"], key=lambda i: i["id"]):
            expected[codecs.decode_rle(inst["rle"])] = inst["id"]
        np.testing.assert_array_equal(codecs.decode_mask(row["instance_mask"]["bytes"]), expected)
    repaint.repaint(str(folder), "objects")
    assert rows(folder) == original  # back to what the labeler wrote, byte for byte


def test_cli_user_errors_are_one_sentence(tmp_path, capsys):
    assert main(["repaint", str(tmp_path / "nowhere")]) == 2
    assert "does not exist" in capsys.readouterr().err
    write_synthetic_dataset(str(tmp_path / "out"), num_images=2, num_shards=1)
    assert main(["repaint", str(tmp_path / "out"), "--min-purity", "2"]) == 2
    err = capsys.readouterr().err
    assert "min_purity must lie in [0, 1]" in err and err.count("\n") == 1

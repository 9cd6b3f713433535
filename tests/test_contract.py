"""The dataset contract: rows written through it load typed, decode back, and the validator
rejects every missing or mistyped column."""

import io
import json

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard

from dataset_card.card.readme import write_minimal_card
from dataset_card.contract import codecs, layout, painting, shards
from dataset_card.contract.output_folder import OutputFolder
from dataset_card.contract.schema import (
    COLUMNS,
    SCHEMA_VERSION,
    SchemaError,
    build_features,
    rows_to_table,
    validate_features,
    validate_schema,
)
from dataset_card.synthetic.shapes import SEMANTIC_CLASSES, synthetic_row, write_synthetic_dataset

CLASS_NAMES = ["n01440764", "n01443537"]


def many_instances_row():
    """A 40x50 image with 300 one-to-four-pixel instances, so instance ids exceed 255."""
    h, w = 40, 50
    rng = np.random.default_rng(0)
    semantic = rng.integers(0, len(SEMANTIC_CLASSES), size=(h, w)).astype(np.uint8)
    masks = []
    for k in range(300):
        m = np.zeros((h, w), bool)
        y, x = divmod(k, 25)
        m[2 * y : 2 * y + 2, 2 * x : 2 * x + 1 + (k % 2)] = True
        masks.append(m)
    big = np.zeros((h, w), bool)
    big[:20, :30] = True  # overlaps many small ones: painted underneath them
    masks.append(big)
    rgb = rng.integers(0, 255, size=(h, w, 3), dtype=np.uint8)
    # The "parts" rule paints every mask, so this map holds all 301 ids.
    return synthetic_row("n01440764/many", 0, rgb, semantic, masks, THINGS, painting.RULES["parts"])


THINGS = {c.id for c in SEMANTIC_CLASSES if c.isthing}


@pytest.fixture
def shard_folder(tmp_path):
    metadata = layout.DatasetMetadata(tuple(CLASS_NAMES), SEMANTIC_CLASSES, painting=painting.RULES["parts"])
    features = build_features(CLASS_NAMES, metadata.semantic_class_names)
    row, painted = many_instances_row()
    rng = np.random.default_rng(1)
    from dataset_card.synthetic.shapes import shapes_image

    rgb, semantic, shapes = shapes_image(rng, 48, 64)
    row2, _ = synthetic_row("n01443537/shapes", 1, rgb, semantic, [m for _, m in shapes], THINGS,
                            painting.RULES["parts"])
    folder = OutputFolder.open(tmp_path)
    empty_errors = pa.Table.from_pylist([], schema=layout.ERRORS_SCHEMA)
    shards.commit_shard(folder, 0, 2, rows_to_table([row, row2], features), empty_errors, layout.ShardStats(0))
    # A shard whose every image failed still commits, with zero rows.
    shards.commit_shard(folder, 1, 2, rows_to_table([], features), empty_errors, layout.ShardStats(1))
    (tmp_path / layout.METADATA_FILE).write_text(metadata.to_json())
    write_minimal_card(folder, metadata)
    return tmp_path, painted


def test_load_dataset_gives_typed_columns_and_masks_round_trip(shard_folder):
    folder, painted = shard_folder
    ds = datasets.load_dataset(str(folder), split="train")
    assert len(ds) == 2
    assert isinstance(ds.features["label"], datasets.ClassLabel)
    assert ds.features["label"].names == CLASS_NAMES
    assert isinstance(ds.features["image"], datasets.Image)
    validate_features(ds.features)

    raw = ds.with_format("arrow")[:1]  # bytes as written, not PIL objects
    row = raw.to_pylist()[0]
    instance_map = codecs.decode_mask(row["instance_mask"]["bytes"])
    assert instance_map.max() > 255, "instance ids above 255 need the 16-bit map"
    np.testing.assert_array_equal(instance_map, painted)
    h, w = row["height"], row["width"]
    for inst in row["instances"]:
        assert codecs.decode_rle(inst["rle"]).shape == (h, w)
    semantic = codecs.decode_mask(row["semantic_mask"]["bytes"])
    again = painting.paint_instances([dict(i) for i in row["instances"]], semantic, THINGS, painting.RULES["parts"])
    np.testing.assert_array_equal(instance_map, again)
    assert codecs.decode_image(row["image"]["bytes"]).shape == (h, w, 3)
    # The big mask is painted first (id 1, largest) and stays in the list even where covered.
    first = min(row["instances"], key=lambda i: i["id"])
    assert first["area"] == 600 and first["visible_area"] < first["area"]
    # The default format hands the maps' bytes over; the card's two lines decode them without this project.
    stored = ds[0]["instance_mask"]
    assert stored["path"] is None
    np.testing.assert_array_equal(np.load(io.BytesIO(zstandard.decompress(stored["bytes"]))), painted)


def test_parquet_metadata_carries_schema_version(shard_folder):
    folder, _ = shard_folder
    schema = pq.read_schema(folder / layout.data_path(0, 2))
    validate_schema(schema)
    assert json.loads(schema.metadata[b"c2fmae"]) == {"schema_version": SCHEMA_VERSION}


def _versioned(schema: pa.Schema) -> pa.Schema:
    """The schema as a shard file carries it: with the schema-version key."""
    return schema.with_metadata({**(schema.metadata or {}), b"c2fmae": json.dumps({"schema_version": SCHEMA_VERSION})})


def _retyped(name: str) -> datasets.Features:
    features = build_features(CLASS_NAMES, ["a"])
    if name == "label":
        features[name] = datasets.Value("int64")  # same Arrow type, but not a ClassLabel
    elif name in ("image", "semantic_mask", "instance_mask"):
        features[name] = datasets.Value("binary")
    elif name == "instances":
        features[name] = [{"id": datasets.Value("int32"), "rle": datasets.Value("string")}]
    elif name in ("width", "height"):
        features[name] = datasets.Value("int64")
    else:
        features[name] = datasets.Value("int32")
    return features


@pytest.mark.parametrize("name", COLUMNS)
def test_validator_rejects_missing_column(name):
    features = build_features(CLASS_NAMES, ["a"])
    del features[name]
    with pytest.raises(SchemaError, match=rf"'{name}'.*v{SCHEMA_VERSION}"):
        validate_schema(_versioned(features.arrow_schema))


@pytest.mark.parametrize("name", COLUMNS)
def test_validator_rejects_retyped_column(name):
    with pytest.raises(SchemaError, match=rf"'{name}'.*v{SCHEMA_VERSION}"):
        validate_schema(_versioned(_retyped(name).arrow_schema))


@pytest.mark.parametrize("name", COLUMNS)
def test_validator_rejects_retyped_column_written_to_parquet(tmp_path, name):
    features = _retyped(name)
    table = pa.Table.from_pylist([], schema=_versioned(features.arrow_schema))
    pq.write_table(table, tmp_path / "shard.parquet")
    with pytest.raises(SchemaError, match=rf"'{name}'.*shard.parquet.*v{SCHEMA_VERSION}"):
        validate_schema(pq.read_schema(tmp_path / "shard.parquet"), source="shard.parquet")


def test_validator_rejects_other_schema_version():
    schema = build_features(CLASS_NAMES, ["a"]).arrow_schema.with_metadata({b"c2fmae": b'{"schema_version": 99}'})
    with pytest.raises(SchemaError, match=f"version 99.*version {SCHEMA_VERSION}.*install"):
        validate_schema(schema)
    for version in (1, 2):
        old = schema.with_metadata({b"c2fmae": json.dumps({"schema_version": version}).encode()})
        with pytest.raises(SchemaError, match=rf"version {version}, but this code reads version 3.*dataset_card repaint OUT`"):
            validate_schema(old, source="OUT/data/train-00000-of-00001.parquet")


def test_validator_names_v2_png_label_maps_of_a_loaded_dataset():
    """A v2 dataset loaded with `datasets` has lost its version key; its Image-typed maps say what it is."""
    features = build_features(CLASS_NAMES, ["a"])
    features["semantic_mask"] = datasets.Image()
    with pytest.raises(SchemaError, match="'semantic_mask'.*Image feature.*v3.*dataset_card repaint"):
        validate_schema(features.arrow_schema, require_version=False)


def test_validator_checks_only_requested_columns():
    features = build_features(CLASS_NAMES, ["a"])
    del features["instances"]
    validate_schema(features.arrow_schema, columns=("image", "semantic_mask", "instance_mask", "label"),
                    require_version=False)


def test_metadata_round_trip_and_version_check():
    metadata = layout.DatasetMetadata(("a",), SEMANTIC_CLASSES, semantic_source="x")
    back = layout.DatasetMetadata.from_json(metadata.to_json())
    assert back == metadata
    assert back.ignore_value == 255 and json.loads(metadata.to_json())["ignore_value"] == 255
    bad = json.loads(metadata.to_json()) | {"schema_version": 4}
    with pytest.raises(SchemaError, match="version 4"):
        layout.DatasetMetadata.from_json(json.dumps(bad))


def test_large_taxonomy_uses_16_bit_ignore_value():
    classes = tuple(layout.SemanticClass(i, f"c{i}", True) for i in range(300))
    assert layout.DatasetMetadata(("a",), classes).ignore_value == 65535


def test_temporary_names_never_match_load_dataset_patterns(tmp_path):
    write_synthetic_dataset(str(tmp_path), num_images=4, num_shards=1)
    # A crash mid-write leaves a dot-prefixed temporary file; loading must ignore it.
    tmp_name = layout.temporary_path(layout.data_path(1, 2))
    assert tmp_name.startswith("data/.")
    (tmp_path / tmp_name).write_bytes(b"partial parquet")
    assert len(datasets.load_dataset(str(tmp_path), split="train")) == 4


def test_committed_shards_and_idempotent_rewrite(tmp_path):
    write_synthetic_dataset(str(tmp_path), num_images=6, num_shards=3)
    assert shards.committed_shards(OutputFolder.open(tmp_path), 3) == {0, 1, 2}
    write_synthetic_dataset(str(tmp_path), num_images=6, num_shards=3)  # same files, same rows
    assert len(datasets.load_dataset(str(tmp_path), split="train")) == 6


def test_shard_stats_merge_adds_up():
    a, b = layout.ShardStats(0), layout.ShardStats(1)
    a.add_row(3, 0.5, [1.0, 0.6, 0.2], {0: 10, 1: 5})
    b.add_row(0, 0.0, [], {0: 15})
    b.add_error("decode")
    total = layout.ShardStats.from_json(a.to_json()).merge(b)
    assert (total.rows, total.errors, total.instances, total.pixels) == (2, 1, 3, 30)
    assert total.semantic_pixels == {"0": 25, "1": 5} and total.semantic_images == {"0": 2, "1": 1}
    assert sum(total.instances_per_image) == 2 and sum(total.purity) == 3
    assert total.errors_by_type == {"decode": 1}


def test_shard_stats_ignores_unknown_keys_and_keeps_exact_means():
    stats = layout.ShardStats(0)
    stats.add_row(2, 0.25, [0.5, 1.0], {0: 4})
    data = json.loads(stats.to_json()) | {"added_by_a_newer_version": 1}
    back = layout.ShardStats.from_json(json.dumps(data))
    assert back.covered_fraction_sum == 0.25 and back.purity_sum == 1.5


def test_validator_requires_the_schema_version_in_shard_files():
    schema = build_features(CLASS_NAMES, ["a"]).arrow_schema  # no c2fmae key
    with pytest.raises(SchemaError, match="no dataset schema version.*x.parquet"):
        validate_schema(schema, source="x.parquet")
    validate_schema(schema, require_version=False)


def test_layout_imports_without_datasets():
    """The labelers import the taxonomy types on GPU boxes that may lack `datasets`."""
    import subprocess
    import sys

    code = ("import sys; sys.modules['datasets'] = None\n"
            "from dataset_card.contract import layout, schema\n"
            "assert schema.semantic_ignore_value(133) == 255 and layout.SemanticClass(0, 'a', True)")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_commit_protocol_works_on_fsspec_only_urls():
    """A URL pyarrow has no filesystem for (here fsspec's memory://) goes through fsspec."""
    fs, base = shards.filesystem("memory://c2fmae-test/out")
    folder = OutputFolder.open("memory://c2fmae-test/out")
    features = build_features(CLASS_NAMES, ["a"])
    empty_errors = pa.Table.from_pylist([], schema=layout.ERRORS_SCHEMA)
    shards.commit_shard(folder, 0, 1, rows_to_table([], features), empty_errors, layout.ShardStats(0))
    assert shards.committed_shards(folder, 1) == {0}
    assert layout.ShardStats.from_json(shards.read_bytes(fs, f"{base}/{layout.stats_path(0, 1)}").decode()).shard == 0

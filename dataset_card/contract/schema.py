"""The dataset contract, version 3: the only thing `labeling/` and `pretraining/` share.

Both stages import the column names, the `datasets` features and the validator from here. A
writer builds rows that match `build_features`; a reader calls `validate_schema` on what it
found before touching a row, and gets one sentence naming the column and the schema version
when the two disagree.
"""

from __future__ import annotations

import json
import posixpath
from collections.abc import Sequence
from typing import TYPE_CHECKING

import pyarrow as pa

if TYPE_CHECKING:
    import datasets

# `datasets` is imported inside the functions that need it, so that the constants here and
# `layout.py` import on a GPU box without it (the labelers run there).

SCHEMA_VERSION = 3
# Older versions that `python -m dataset_card repaint OUTPUT` turns into this one without a model
# (version 2 added the `level` and `parent` instance fields and the aligned, object-level map;
# version 3 stores the label maps as zstd-compressed `.npy` instead of PNG: `codecs.encode_mask`).
UPGRADABLE_VERSIONS = (1, 2)

# Key under which the writer stores {"schema_version": ...} in each Parquet file's metadata,
# beside the "huggingface" key that `datasets` reads its features from.
SCHEMA_METADATA_KEY = b"c2fmae"

# Columns in the order the writer lays them out.
COLUMNS = (
    "image_id",
    "label",
    "image",
    "width",
    "height",
    "semantic_mask",
    "instance_mask",
    "instances",
)

# What pretraining reads (never the `instances` list: it is large and the maps carry it).
TRAINING_COLUMNS = ("image", "semantic_mask", "instance_mask", "label")

# What identifies an image without its bytes: the sha256 of the original file and its length.
# The labeler writes them in every row (readers treat them as optional: earlier v2 files lack
# them). A labels-only release (`image_storage` "reference" in the file metadata) stores no image
# bytes; `image.path` (relative to the labeled input folder) and these two columns let a reader
# join the original files and check that they are the ones that were labeled
# (`dataset_card.contract.images`). Its `image` column keeps the Arrow type of an inline one
# (struct of `bytes` and `path`) but is declared a plain struct, not a `datasets.Image`, so
# `load_dataset(...)[0]` reads the path without opening a file (`build_features(image_bytes=False)`).
REFERENCE_COLUMNS = ("image_sha256", "image_nbytes")


class SchemaError(ValueError):
    """The data on disk does not match the dataset contract."""


def semantic_ignore_value(num_semantic_classes: int) -> int:
    """The pixel value of `semantic_mask` that means "no class" (255 for 8-bit maps, else 65535).

    A map is 8-bit when the taxonomy has fewer than 255 classes, so that 255 is free for it.
    """
    return 255 if num_semantic_classes < 255 else 65535


def semantic_mask_dtype(num_semantic_classes: int) -> str:
    return "uint8" if num_semantic_classes < 255 else "uint16"


def instance_struct() -> dict:
    """One automatic mask: its RLE, box, quality scores, the semantic class it was aligned to, and
    what it is under the painting rule (`level`: object | part | stuff | dropped, or object_agnostic
    under the "salient" rule; `parent`: the id of the object a part belongs to, else 0)."""
    import datasets

    return {
        "id": datasets.Value("int32"),
        "rle": {
            "size": datasets.Sequence(datasets.Value("int32"), length=2),
            "counts": datasets.Value("string"),
        },
        "bbox": datasets.Sequence(datasets.Value("float32"), length=4),
        "area": datasets.Value("int32"),
        "visible_area": datasets.Value("int32"),
        "score": datasets.Value("float32"),
        "stability_score": datasets.Value("float32"),
        "category_id": datasets.Value("int32"),
        "category_purity": datasets.Value("float32"),
        "level": datasets.Value("string"),
        "parent": datasets.Value("int32"),
    }


def label_map() -> dict:
    """The feature of a label map column: its encoded bytes (`codecs.encode_mask`), path unused.
    Also a labels-only release's `image` (bytes null, path relative to the labeled input folder)."""
    import datasets

    return {"bytes": datasets.Value("binary"), "path": datasets.Value("string")}


def build_features(class_names: Sequence[str], semantic_class_names: Sequence[str],
                   image_reference: bool = False, image_bytes: bool = True) -> datasets.Features:
    """The `datasets.Features` of a labeled shard.

    `class_names` are the image-level labels (sorted input folder names, e.g. ImageNet synsets);
    `semantic_class_names` is the semantic taxonomy. It does not change any column type here
    (8- and 16-bit maps are both `codecs.encode_mask` bytes) but is taken so callers state the
    taxonomy they write, and so a future version can type the maps by it. `image_reference` adds
    `REFERENCE_COLUMNS` (what the labeler writes). `image_bytes=False` is a labels-only release:
    `image` is then the plain {"bytes", "path"} struct (same Arrow type), which `datasets` hands
    over as it is instead of opening `path` as a file.

    The label maps are {"bytes", "path"} structs like an image's (path always null): the Arrow
    type of v2's PNG `datasets.Image` columns, so every reader takes a map's bytes from a row of
    either version the same way, but a plain struct, since `datasets` cannot decode them.
    """
    import datasets

    if not class_names:
        raise SchemaError("class_names is empty: a dataset needs at least one image-level class")
    if not semantic_class_names:
        raise SchemaError("semantic_class_names is empty: the semantic taxonomy needs at least one class")
    reference = {"image_sha256": datasets.Value("string"), "image_nbytes": datasets.Value("int64")}
    return datasets.Features(
        {
            "image_id": datasets.Value("string"),
            "label": datasets.ClassLabel(names=list(class_names)),
            "image": datasets.Image() if image_bytes else label_map(),
            "width": datasets.Value("int32"),
            "height": datasets.Value("int32"),
            "semantic_mask": label_map(),
            "instance_mask": label_map(),
            "instances": [instance_struct()],
            **(reference if image_reference else {}),
        }
    )


def file_metadata(painting: dict | None = None) -> bytes:
    """The value of a shard file's SCHEMA_METADATA_KEY: the schema version and the painting rule
    its `instance_mask` follows (a `painting.PaintingRule` as a dict), so each file says what it is."""
    value: dict = {"schema_version": SCHEMA_VERSION}
    if painting is not None:
        value["painting"] = dict(painting)
    return json.dumps(value, sort_keys=True).encode()


def read_file_metadata(schema: pa.Schema) -> dict:
    """A shard schema's SCHEMA_METADATA_KEY value ({} when absent)."""
    raw = (schema.metadata or {}).get(SCHEMA_METADATA_KEY)
    return json.loads(raw) if raw else {}


def arrow_schema(class_names: Sequence[str], semantic_class_names: Sequence[str],
                 painting: dict | None = None, image_reference: bool = False, image_bytes: bool = True) -> pa.Schema:
    """The Arrow schema a shard is written with: the features plus both metadata keys."""
    schema = build_features(class_names, semantic_class_names, image_reference, image_bytes).arrow_schema
    metadata = dict(schema.metadata or {})
    metadata[SCHEMA_METADATA_KEY] = file_metadata(painting)
    return schema.with_metadata(metadata)


def version_problem(found, source: str = "", output: str = "") -> str | None:
    """None when `found` is this code's schema version, else the one sentence that says so: both
    versions and the fix (`python -m dataset_card repaint OUTPUT` for an upgradable version).

    source: the file that said `found`; output: the labeled folder it belongs to (for the fix).
    """
    if found == SCHEMA_VERSION:
        return None
    where = f"{source} has" if source else "found"
    head = f"{where} dataset schema version {found}, but this code reads version {SCHEMA_VERSION}"
    if found in UPGRADABLE_VERSIONS:
        return (f"{head}: upgrade the folder in place, without running a model, with "
                f"`python -m dataset_card repaint {output or 'OUTPUT'}`")
    if isinstance(found, int) and found > SCHEMA_VERSION:
        return f"{head}: install the version of this project that wrote it"
    return f"{head}: relabel the images with labeling/run.py"


def _folder_of(source: str) -> str:
    """The labeled folder of a shard path such as OUT/data/train-00000-of-00001.parquet ("" if unknown)."""
    head, name = posixpath.split(source)
    return posixpath.dirname(head) if name.startswith("train-") and posixpath.basename(head) == "data" else ""


def _expected_types() -> dict[str, pa.DataType]:
    schema = build_features(["_"], ["_"], image_reference=True).arrow_schema
    return {name: schema.field(name).type for name in COLUMNS + REFERENCE_COLUMNS}


def _feature_kinds() -> dict:
    import datasets

    return {
        "label": datasets.ClassLabel,
        "image": (datasets.Image, dict),  # dict: a labels-only release's (`build_features(image_bytes=False)`)
        "semantic_mask": dict,
        "instance_mask": dict,
    }


def _where(source: str) -> str:
    return f" in {source}" if source else ""


def validate_schema(schema: pa.Schema, columns: Sequence[str] = COLUMNS, source: str = "",
                    require_version: bool = True) -> None:
    """Raise `SchemaError` unless `schema` (a shard's Arrow schema) holds `columns` in this version's types.

    `columns` lets a reader check only what it reads (pretraining passes `TRAINING_COLUMNS`).
    `source` (a file name) is put into the message. Every shard file carries its schema version;
    `require_version=False` is for schemas that lost it on the way (a loaded `datasets.Dataset`).
    """
    meta = schema.metadata or {}
    if require_version and SCHEMA_METADATA_KEY not in meta:
        raise SchemaError(
            f"no dataset schema version in the metadata{_where(source)}: this code reads files written "
            f"through dataset schema v{SCHEMA_VERSION} (labeling/run.py writes them)"
        )
    if SCHEMA_METADATA_KEY in meta:
        problem = version_problem(json.loads(meta[SCHEMA_METADATA_KEY]).get("schema_version"), source,
                                  _folder_of(source))
        if problem:
            raise SchemaError(problem)
    import datasets

    expected = _expected_types()
    # Feature kinds matter beyond Arrow types: a ClassLabel and a plain int64 share a type.
    features = datasets.Features.from_arrow_schema(schema)
    kinds = _feature_kinds()
    optional = [n for n in REFERENCE_COLUMNS if n not in columns and schema.get_field_index(n) >= 0]
    for name in [*columns, *optional]:
        if name not in expected:
            raise SchemaError(f"column {name!r} is not part of dataset schema v{SCHEMA_VERSION}")
        if schema.get_field_index(name) < 0:
            raise SchemaError(
                f"column {name!r} is missing{_where(source)}; dataset schema v{SCHEMA_VERSION} requires it"
            )
        found_type = schema.field(name).type
        if not found_type.equals(expected[name]):
            raise SchemaError(
                f"column {name!r}{_where(source)} has type {found_type}, but dataset schema "
                f"v{SCHEMA_VERSION} expects {expected[name]}"
            )
        kind = kinds.get(name)
        if kind is dict and isinstance(features[name], datasets.Image):
            raise SchemaError(
                f"column {name!r}{_where(source)} is an Image feature (schema v2's PNG label maps), but dataset "
                f"schema v{SCHEMA_VERSION} stores label maps as zstd-compressed .npy bytes: upgrade the labeled "
                "folder with `python -m dataset_card repaint OUTPUT`"
            )
        if kind is not None and not isinstance(features[name], kind):
            expected_kind = " or ".join(k.__name__ for k in kind) if isinstance(kind, tuple) else kind.__name__
            raise SchemaError(
                f"column {name!r}{_where(source)} is a {type(features[name]).__name__} feature, but dataset "
                f"schema v{SCHEMA_VERSION} expects {expected_kind}"
            )


def validate_features(features: datasets.Features, columns: Sequence[str] = COLUMNS, source: str = "") -> None:
    """Like `validate_schema`, for the `datasets.Features` of a loaded dataset."""
    validate_schema(features.arrow_schema, columns, source, require_version=False)


def rows_to_table(rows: Sequence[dict], features: datasets.Features, painting: dict | None = None) -> pa.Table:
    """Python rows (images and masks as {"bytes", "path"} dicts) -> an Arrow table in the contract schema."""
    schema = features.arrow_schema
    metadata = dict(schema.metadata or {})
    metadata[SCHEMA_METADATA_KEY] = file_metadata(painting)
    schema = schema.with_metadata(metadata)
    return pa.Table.from_pylist([features.encode_example(row) for row in rows], schema=schema)

"""The card's facts about a labeled folder (`RunSummary`), read back from its small files (no mask is decoded).

Counts come from the Parquet footers (exact and cheap), distributions from the per-shard
statistics the labeler wrote (`stats/*.json`), provenance from `manifest.json` and `stats.json`,
and the environments that made the labels from the data files' footers.
Every reader here tolerates missing keys: older runs and the synthetic dataset write less.
"""

from __future__ import annotations

import json
import posixpath
from dataclasses import dataclass, field

import pyarrow.parquet as pq

from dataset_card.contract import layout, shards
from dataset_card.contract.output_folder import OutputError, OutputFolder
from dataset_card.contract.schema import REFERENCE_COLUMNS, SCHEMA_METADATA_KEY

QUALITY_FILE = "quality.json"


@dataclass(frozen=True)
class RunSummary:
    metadata: layout.DatasetMetadata
    manifest: dict
    run_stats: dict  # stats.json
    stats: layout.ShardStats  # the sum of stats/*.json
    num_stats_files: int
    data_files: tuple[str, ...]  # relative to the output root, sorted
    rows_per_file: tuple[int, ...]
    error_rows: int
    quality: dict | None = None  # quality.json, when an evaluation has been run
    # Failed inputs by reason, counted in the errors tables themselves (the statistics files hold
    # the same counts; `validate` checks that they agree).
    errors_by_type: dict = field(default_factory=dict)
    image_storage: str = "inline"  # "reference": a labels-only release (`dataset_card.contract.images`)
    reference_columns: bool = False  # the data files carry schema.REFERENCE_COLUMNS
    # Each distinct environment the labels were made in (the footers' "environments") and how many
    # data files name it; empty for folders written before footers recorded them.
    environments: tuple[tuple[dict, int], ...] = ()

    @property
    def rows(self) -> int:
        return sum(self.rows_per_file)


def parquet_rows(folder: OutputFolder, name: str) -> int:
    with folder.fs.open_input_file(folder.path(name)) as f:
        return pq.read_metadata(f).num_rows


def data_footers(folder: OutputFolder, names: list[str]) -> list[tuple[int, dict]]:
    """(rows, the contract key's footer value) of each data file, from its Parquet metadata alone."""
    return [shards.read_footer(folder.fs, folder.path(name)) for name in names]


def environments(footers: list[dict]) -> tuple[tuple[dict, int], ...]:
    """The distinct environments the footers name, each with the number of files naming it, most first."""
    counts: dict[str, int] = {}
    for footer in footers:
        for env in footer.get("environments") or []:
            key = json.dumps(env, sort_keys=True)
            counts[key] = counts.get(key, 0) + 1
    return tuple((json.loads(k), n) for k, n in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))


def errors_by_type(folder: OutputFolder, names: list[str]) -> dict[str, int]:
    """Failed inputs per reason, read from the errors tables' `error_type` column."""
    counts: dict[str, int] = {}
    for name in names:
        with folder.fs.open_input_file(folder.path(name)) as f:
            for kind in pq.read_table(f, columns=["error_type"]).column(0).to_pylist():
                counts[kind] = counts.get(kind, 0) + 1
    return dict(sorted(counts.items()))


def image_storage(folder: OutputFolder, names: list[str]) -> tuple[str, bool]:
    """How the data files hold their images, and whether they carry REFERENCE_COLUMNS (the first
    file speaks for the folder)."""
    if not names:
        return "inline", False
    with folder.fs.open_input_file(folder.path(names[0])) as f:
        schema = pq.read_schema(f)
    storage = json.loads((schema.metadata or {}).get(SCHEMA_METADATA_KEY, b"{}")).get("image_storage", "inline")
    return storage, all(schema.get_field_index(c) >= 0 for c in REFERENCE_COLUMNS)


def read_summary(output: str | OutputFolder) -> RunSummary:
    """Everything the card says, from the files around the rows of `output` (a path, URL or folder)."""
    folder = OutputFolder.open(output)
    if not folder.is_folder():
        raise OutputError(f"{folder} is not a folder (or does not exist): pass the output folder of a labeling run")
    metadata = folder.read_metadata()
    data_files = tuple(posixpath.join(layout.DATA_DIR, n) for n in folder.list_files(layout.DATA_DIR)
                       if n.startswith("train-") and n.endswith(".parquet"))
    error_files = [posixpath.join(layout.ERRORS_DIR, n) for n in folder.list_files(layout.ERRORS_DIR)
                   if n.startswith("errors-") and n.endswith(".parquet")]
    stats_files = [posixpath.join(layout.STATS_DIR, n) for n in folder.list_files(layout.STATS_DIR)
                   if n.endswith(".json")]
    storage, reference = image_storage(folder, list(data_files))
    footers = data_footers(folder, list(data_files))
    stats = layout.ShardStats()
    for name in stats_files:
        stats = stats.merge(layout.ShardStats.from_json(folder.read_bytes(name).decode()))
    return RunSummary(
        metadata=metadata,
        manifest=folder.read_json(layout.MANIFEST_FILE) or {},
        run_stats=folder.read_json(layout.RUN_STATS_FILE) or {},
        stats=stats,
        num_stats_files=len(stats_files),
        data_files=data_files,
        rows_per_file=tuple(rows for rows, _ in footers),
        error_rows=sum(parquet_rows(folder, f) for f in error_files),
        quality=folder.read_json(QUALITY_FILE),
        errors_by_type=errors_by_type(folder, error_files),
        image_storage=storage,
        reference_columns=reference,
        environments=environments([footer for _, footer in footers]),
    )


def bin_labels(edges: tuple[float, ...], percent: bool = False) -> list[str]:
    """Readable names of the fixed `layout` histogram bins: "2-4", "≥200"; "10-20%" for fractions.

    A bin holds edges[i] <= v < edges[i+1]; the last one also holds everything above.
    """
    if percent:
        return [f"{round(100 * a)}-{round(100 * b)}%" for a, b in zip(edges[:-1], edges[1:])]
    labels = []
    for i, (a, b) in enumerate(zip(edges[:-1], edges[1:])):
        if i == len(edges) - 2:
            labels.append(f"≥{a}")
        else:
            labels.append(str(a) if b - a == 1 else f"{a}-{b - 1}")
    return labels


@dataclass(frozen=True)
class ClassShare:
    id: int
    name: str
    isthing: bool | None  # None for the ignore value or an id outside the taxonomy
    pixel_share: float  # of all labeled pixels
    image_share: float  # of all labeled images that contain it


def class_shares(stats: layout.ShardStats, metadata: layout.DatasetMetadata) -> list[ClassShare]:
    """Every semantic class seen (the ignore value as "(no class)"), most pixels first."""
    by_id = {c.id: c for c in metadata.semantic_classes}
    shares = []
    for key, pixels in stats.semantic_pixels.items():
        cls = by_id.get(int(key))
        name = cls.name if cls else "(no class)" if int(key) == metadata.ignore_value else f"(unknown id {key})"
        shares.append(ClassShare(int(key), name, cls.isthing if cls else None,
                                 pixels / max(stats.pixels, 1),
                                 stats.semantic_images.get(key, 0) / max(stats.rows, 1)))
    return sorted(shares, key=lambda s: (-s.pixel_share, s.id))

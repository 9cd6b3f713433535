"""The files around the rows: where shards, errors, statistics, manifest and metadata live.

OUTPUT/
  data/train-SSSSS-of-NNNNN.parquet    rows (the commit point of a shard)
  errors/errors-SSSSS-of-NNNNN.parquet failed inputs of that shard (written before its data file)
  stats/stats-SSSSS-of-NNNNN.json      per-shard statistics (written before its data file)
  metadata.json                        schema version, class names, semantic taxonomy, ignore value, painting rule
  manifest.json                        inputs and their hash, arguments, models, code version
  stats.json                           run summary (counts, failures by reason, wall time, images/s)
  README.md                            the dataset card
  card.json                            what the user told the card (name, licence, source dataset)
  .lease.json                          who is writing the folder now (`dataset_card.contract.lease`)
  .parts/SSSSS/*.parquet               rows of a shard being labeled, before its commit
Temporary files start with a dot, so no `load_dataset` pattern (`data/train-*`) can match them.
"""

from __future__ import annotations

import hashlib
import json
import posixpath
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields

import pyarrow as pa

from dataset_card.contract import coverage
from dataset_card.contract.painting import DEFAULT_RULE, RULES, PaintingRule
from dataset_card.contract.schema import SCHEMA_VERSION, SchemaError, semantic_ignore_value, version_problem

DATA_DIR = "data"
ERRORS_DIR = "errors"
STATS_DIR = "stats"
METADATA_FILE = "metadata.json"
MANIFEST_FILE = "manifest.json"
RUN_STATS_FILE = "stats.json"
CARD_FILE = "README.md"
CARD_OPTIONS_FILE = "card.json"
LEASE_FILE = ".lease.json"
PARTS_DIR = ".parts"
# How a row holds its image: "inline" (the original bytes) or "reference" (a labels-only release:
# no bytes; the relative path, sha256 and length, see `dataset_card.contract.images`). Each data file
# names its storage in its Parquet metadata.
IMAGE_STORAGES = ("inline", "reference")
DATA_GLOB = f"{DATA_DIR}/train-*.parquet"
ERRORS_GLOB = f"{ERRORS_DIR}/errors-*.parquet"

ERROR_COLUMNS = ("image_id", "path", "label", "stage", "error_type", "message")
ERRORS_SCHEMA = pa.schema(
    [
        ("image_id", pa.string()),
        ("path", pa.string()),
        ("label", pa.int64()),
        ("stage", pa.string()),  # list, read, decode, model, postprocess, write, worker
        ("error_type", pa.string()),  # short machine-readable reason, e.g. "too_large", "decode"
        ("message", pa.string()),  # the human sentence
    ]
)


def shard_of(image_ids: Sequence[str], num_shards: int) -> list[int]:
    """The shard of each image_id: its sha256's first 8 bytes modulo `num_shards` (the writer files rows
    so; a reader looking for one image opens that shard first)."""
    return [int.from_bytes(hashlib.sha256(i.encode()).digest()[:8], "big") % num_shards for i in image_ids]


def _suffix(index: int, num_shards: int) -> str:
    return f"{index:05d}-of-{num_shards:05d}"


def data_path(index: int, num_shards: int) -> str:
    return posixpath.join(DATA_DIR, f"train-{_suffix(index, num_shards)}.parquet")


def errors_path(index: int, num_shards: int) -> str:
    return posixpath.join(ERRORS_DIR, f"errors-{_suffix(index, num_shards)}.parquet")


def stats_path(index: int, num_shards: int) -> str:
    return posixpath.join(STATS_DIR, f"stats-{_suffix(index, num_shards)}.json")


def temporary_path(path: str, attempt: str | None = None) -> str:
    """A dot-prefixed sibling of `path` to write to before the atomic rename, unique to one write
    attempt (`attempt`, default a random tag): two writers of the same file (a retried task and
    the one it replaced) never share a temporary file."""
    head, tail = posixpath.split(path)
    return posixpath.join(head, f".{tail}.{attempt or uuid.uuid4().hex[:12]}.tmp")


def parts_dir(index: int) -> str:
    """Where workers leave shard `index`'s labeled rows until its commit merges them."""
    return posixpath.join(PARTS_DIR, f"{index:05d}")


@dataclass(frozen=True)
class SemanticClass:
    id: int
    name: str
    isthing: bool


@dataclass(frozen=True)
class DatasetMetadata:
    """`metadata.json`: what a reader needs to interpret the maps (the trainer sizes its heads by it)."""

    class_names: tuple[str, ...]
    semantic_classes: tuple[SemanticClass, ...]
    semantic_source: str = ""  # the semantic model's name or path
    schema_version: int = SCHEMA_VERSION
    painting: PaintingRule = RULES[DEFAULT_RULE]  # how `instance_mask` follows from `instances`

    @property
    def semantic_class_names(self) -> list[str]:
        return [c.name for c in self.semantic_classes]

    @property
    def num_semantic_classes(self) -> int:
        return len(self.semantic_classes)

    @property
    def ignore_value(self) -> int:
        return semantic_ignore_value(self.num_semantic_classes)

    @property
    def thing_ids(self) -> frozenset[int]:
        return frozenset(c.id for c in self.semantic_classes if c.isthing)

    def to_json(self) -> str:
        data = asdict(self)
        data["ignore_value"] = self.ignore_value
        return json.dumps(data, indent=2)

    @classmethod
    def from_json(cls, text: str, source: str = METADATA_FILE, output: str | None = None,
                  accept: tuple[int, ...] = (SCHEMA_VERSION,)) -> DatasetMetadata:
        """Parse metadata.json; a version outside `accept` raises one sentence naming both versions
        and the fix. `output` is the labeled folder the fix names (default: the folder of `source`).
        `accept` is for the upgrade (`python -m dataset_card repaint`), which also reads version 1,
        whose file has no painting rule (its map was the "parts" rule's)."""
        data = json.loads(text)
        version = data.get("schema_version")
        if version not in accept:
            folder = output if output is not None else posixpath.dirname(source)
            raise SchemaError(version_problem(version, source, folder) or f"{source}: version {version} not accepted")
        try:
            classes = tuple(SemanticClass(int(c["id"]), str(c["name"]), bool(c["isthing"]))
                            for c in data["semantic_classes"])
            painting = (PaintingRule.from_dict(data["painting"]) if "painting" in data
                        else RULES["parts"] if version == 1 else None)
            if painting is None:
                raise KeyError("painting")
            return cls(
                class_names=tuple(data["class_names"]),
                semantic_classes=classes,
                semantic_source=data.get("semantic_source", ""),
                schema_version=int(version),
                painting=painting,
            )
        except (KeyError, TypeError, ValueError) as err:
            raise SchemaError(f"{source} lacks or mistypes {err} required by dataset schema v{version}") from err


def _histogram(values: Sequence[float], edges: Sequence[float]) -> list[int]:
    counts = [0] * (len(edges) - 1)
    for v in values:
        for i in range(len(counts)):
            if v < edges[i + 1] or i == len(counts) - 1:
                counts[i] += 1
                break
    return counts


# Fixed bins so shard statistics add up without seeing any row again.
INSTANCE_COUNT_EDGES = (0, 1, 2, 5, 10, 20, 50, 100, 200, 10**9)
FRACTION_EDGES = tuple(i / 10 for i in range(11))


@dataclass
class ShardStats:
    """Per-shard statistics, written by the labeler and summed by the card (no mask is decoded again).

    `add_row` takes what the labeler already has in hand for each image.
    """

    shard: int = -1
    rows: int = 0
    errors: int = 0
    errors_by_type: dict[str, int] = field(default_factory=dict)
    instances: int = 0
    instances_per_image: list[int] = field(default_factory=lambda: [0] * (len(INSTANCE_COUNT_EDGES) - 1))
    coverage: list[int] = field(default_factory=lambda: [0] * (len(FRACTION_EDGES) - 1))
    purity: list[int] = field(default_factory=lambda: [0] * (len(FRACTION_EDGES) - 1))
    semantic_pixels: dict[str, int] = field(default_factory=dict)  # class id (str for JSON) -> pixels
    semantic_images: dict[str, int] = field(default_factory=dict)  # class id -> images containing it
    pixels: int = 0
    covered_fraction_sum: float = 0.0  # exact means beside the histograms
    purity_sum: float = 0.0
    # Schema v2: what the instances are, and the alignment invariants' figures (dataset_card.contract.invariants).
    levels: dict[str, int] = field(default_factory=dict)  # level -> instances
    painted: int = 0  # instances with pixels in `instance_mask`
    painted_not_thing: int = 0  # ... that are no thing-class instance (invariant 1)
    painted_disagreeing: int = 0  # ... under MIN_AGREEMENT of whose pixels are of their class (invariant 2)
    agreement_sum: float = 0.0  # the sum of those shares, for their mean
    painted_nested: int = 0  # ... lying >= 90% inside a same-class painted instance (invariant 3)
    painted_nested_any: int = 0  # ... inside a painted instance of any class
    painted_agnostic: int = 0  # ... that are class-agnostic objects (rule "salient"; not in agreement_sum)
    # Coverage: what instance-guided masking will see (`dataset_card.contract.coverage`).
    coverage_measured: int = 0  # images measured (0 in folders labeled before it was)
    painted_per_image: list[int] = field(default_factory=lambda: [0] * (len(coverage.COUNT_EDGES) - 1))
    regions_per_image: list[int] = field(default_factory=lambda: [0] * (len(coverage.COUNT_EDGES) - 1))
    largest_mask: dict[str, int] = field(default_factory=dict)  # level of each image's largest mask -> images

    def add_row(self, num_instances: int, covered_fraction: float, purities: Sequence[float],
                semantic_counts: dict[int, int], levels: Mapping[str, int] | None = None, figures=None,
                measured: coverage.RowCoverage | None = None) -> None:
        """One labeled image: its instance count, share of pixels under any instance, instance
        purities, and pixel count per semantic class (ignore value included under its own id);
        `levels` counts its instances by level, `figures` is its `invariants.MapFigures`, `measured`
        its `coverage.measure`."""
        if measured is not None:
            self.coverage_measured += 1
            _add(self.painted_per_image, coverage.histogram([measured.painted]))
            _add(self.regions_per_image, coverage.histogram([measured.regions]))
            self.largest_mask[measured.largest] = self.largest_mask.get(measured.largest, 0) + 1
        for level, n in (levels or {}).items():
            self.levels[level] = self.levels.get(level, 0) + int(n)
        if figures is not None:
            self.painted += figures.painted
            self.painted_not_thing += len(figures.not_thing)
            self.painted_disagreeing += len(figures.disagreeing)
            self.agreement_sum += float(sum(figures.agreement.values()))
            self.painted_nested += len(figures.nested)
            self.painted_nested_any += len(figures.nested_any)
            self.painted_agnostic += len(figures.agnostic)
        self.rows += 1
        self.instances += num_instances
        _add(self.instances_per_image, _histogram([num_instances], INSTANCE_COUNT_EDGES))
        _add(self.coverage, _histogram([covered_fraction], FRACTION_EDGES))
        _add(self.purity, _histogram(purities, FRACTION_EDGES))
        self.covered_fraction_sum += float(covered_fraction)
        self.purity_sum += float(sum(purities))
        for cls, n in semantic_counts.items():
            key = str(int(cls))
            self.semantic_pixels[key] = self.semantic_pixels.get(key, 0) + int(n)
            self.semantic_images[key] = self.semantic_images.get(key, 0) + 1
            self.pixels += int(n)

    def add_error(self, error_type: str) -> None:
        self.errors += 1
        self.errors_by_type[error_type] = self.errors_by_type.get(error_type, 0) + 1

    def merge(self, other: ShardStats) -> ShardStats:
        out = ShardStats(shard=-1)
        for name in ("rows", "errors", "instances", "pixels", "covered_fraction_sum", "purity_sum", "painted",
                     "painted_not_thing", "painted_disagreeing", "agreement_sum", "painted_nested",
                     "painted_nested_any", "painted_agnostic", "coverage_measured"):
            setattr(out, name, getattr(self, name) + getattr(other, name))
        for name in ("instances_per_image", "coverage", "purity", "painted_per_image", "regions_per_image"):
            setattr(out, name, [a + b for a, b in zip(getattr(self, name), getattr(other, name))])
        for name in ("errors_by_type", "semantic_pixels", "semantic_images", "levels", "largest_mask"):
            merged = dict(getattr(self, name))
            for k, v in getattr(other, name).items():
                merged[k] = merged.get(k, 0) + v
            setattr(out, name, merged)
        return out

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> ShardStats:
        """Keys this version does not know (written by a newer one) are ignored."""
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in json.loads(text).items() if k in known})


def _add(into: list[int], counts: list[int]) -> None:
    for i, c in enumerate(counts):
        into[i] += c

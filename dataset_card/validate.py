"""Check a labeled output against the dataset contract and report every violation by file and row.

What is checked (all streamed per shard and row group; only `image_id` strings are kept in memory):
- `metadata.json` and `manifest.json` exist and carry this schema version;
- `data/`, `errors/`, `stats/` hold exactly the files `train-SSSSS-of-NNNNN.parquet` (and their
  errors and stats siblings) for the manifest's NNNNN shards: none missing, none stray, no second total;
- every data file that `load_dataset` would read is readable Parquet in the contract schema,
  with the class names of `metadata.json`, and its row count matches its statistics;
- labeled rows + failed inputs = the manifest's input count, and no `image_id` repeats;
- each data file's painting rule (in its Parquet metadata) is the one `metadata.json` names;
- on a seeded sample of rows from every shard (every row with `full=True`): the image, both maps
  and every RLE decode to the image size, ids are 1..K, `instance_mask` is what the painting rule
  paints from `instances` and `semantic_mask` (`dataset_card.contract.painting`), and each instance's
  `level`, `parent` and `visible_area` are what the rule says (and each level one of `painting.LEVELS`);
- for a rule that paints objects, the alignment invariants of `dataset_card.contract.invariants`: every
  painted id a thing-class instance or a class-agnostic object (level "object_agnostic", rule
  "salient"), each painted class instance >= 95% of its class (98% on average over the rows
  checked), at most 5% of painted instances nested in a same-class painted instance.
"""

from __future__ import annotations

import fnmatch
import posixpath
import re
from collections.abc import Iterable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
from tqdm.auto import tqdm

from dataset_card.contract import codecs, invariants, layout, painting, shards
from dataset_card.contract.output_folder import OutputError, OutputFolder
from dataset_card.contract.schema import (
    SCHEMA_METADATA_KEY,
    SCHEMA_VERSION,
    SchemaError,
    read_file_metadata,
    validate_schema,
    version_problem,
)

# The errors table's reason for an input whose image_id an earlier input already has (that one is
# labeled under the id; `labeling.pipeline.failures.DUPLICATE_ID`).
DUPLICATE_ID = "duplicate_id"


@dataclass(frozen=True)
class Violation:
    file: str  # relative to the output folder
    message: str
    row: int | None = None  # row index inside `file`

    def __str__(self) -> str:
        return f"{self.file} row {self.row}: {self.message}" if self.row is not None else f"{self.file}: {self.message}"


@dataclass
class Report:
    output: str
    violations: list[Violation] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # harmless findings, e.g. leftover temporary files
    shards: int = 0
    rows: int = 0
    errors: int = 0
    checked_rows: int = 0
    figures: invariants.Figures = field(default_factory=invariants.Figures)
    rule: str = ""

    @property
    def ok(self) -> bool:
        return not self.violations

    def format(self, limit: int = 100) -> str:
        lines = [str(v) for v in self.violations[:limit]]
        if len(self.violations) > limit:
            lines.append(f"... and {len(self.violations) - limit} more")
        lines += [f"note: {n}" for n in self.notes]
        head = (f"{self.output}: valid" if self.ok else f"{self.output}: {len(self.violations)} problem(s)")
        head += (f" ({self.rows:,} rows in {self.shards} shards, {self.errors:,} failed inputs; "
                 f"decoded and checked {self.checked_rows:,} rows)")
        if self.rule:
            head += f"\npainting rule {self.rule!r}: {self.figures}"
        return "\n".join([head, *lines])


def shard_files(folder: OutputFolder, subfolder: str, prefix: str, suffix: str,
                num_shards: int, report: Report) -> dict[int, str]:
    """Shard index -> relative path of the files in `subfolder` named like `prefix-SSSSS-of-NNNNN.suffix`;
    every other name there becomes a violation (or a note for dot-prefixed temporary files)."""
    pattern = re.compile(rf"{prefix}-(\d{{5}})-of-(\d{{5}}){re.escape(suffix)}")
    found: dict[int, str] = {}
    selector = pafs.FileSelector(folder.path(subfolder), allow_not_found=True)
    for info in sorted(folder.fs.get_file_info(selector), key=lambda i: i.path):
        name = posixpath.basename(info.path)
        path = f"{subfolder}/{name}"
        match = pattern.fullmatch(name)
        if name.startswith("."):
            report.notes.append(f"{path} is a temporary file left by an interrupted write; it is never read")
        elif info.type != pafs.FileType.File or not match:
            report.violations.append(Violation(path, f"is not a file of this run (expected {prefix}-SSSSS-of-"
                                                     f"{num_shards:05d}{suffix}): remove it"))
        elif int(match[2]) != num_shards:
            report.violations.append(Violation(path, f"belongs to a run of {int(match[2])} shards, but manifest.json "
                                                     f"says {num_shards}: a stray file from another run, remove it"))
        elif int(match[1]) >= num_shards:
            report.violations.append(Violation(path, f"shard index {int(match[1])} is out of range for "
                                                     f"{num_shards} shards: remove it"))
        else:
            found[int(match[1])] = path
    return found


def missing(found: dict[int, str], indices: Iterable[int], path_of, what: str, report: Report) -> None:
    for i in indices:
        if i not in found:
            report.violations.append(Violation(path_of(i), f"is missing: {what}"))


def row_problems(row: dict, metadata: layout.DatasetMetadata) -> list[str]:
    """Every way one decoded row breaks the contract (an empty list when it is valid)."""
    return row_check(row, metadata)[0]


def row_check(row: dict, metadata: layout.DatasetMetadata) -> tuple[list[str], invariants.MapFigures | None]:
    """(problems, invariant figures) of one decoded row; figures are None when its maps or RLEs
    are too broken to compute them."""
    h, w = row["height"], row["width"]
    out = []
    if not 0 <= row["label"] < len(metadata.class_names):
        out.append(f"label {row['label']} is outside the {len(metadata.class_names)} classes")
    maps = {}
    for column in ("image", "semantic_mask", "instance_mask"):
        if column == "image" and row["image"]["bytes"] is None:  # a labels-only release: a reference
            if not row["image"]["path"]:
                out.append("image holds neither bytes nor a path")
            continue
        try:
            data = row[column]["bytes"]
            maps[column] = codecs.decode_mask(data) if column != "image" else None
            size = codecs.image_size(data) if column == "image" else maps[column].shape[::-1]
        except codecs.DecodeError as err:
            out.append(f"{column} does not decode: {err}")
            maps.pop(column, None)
            continue
        if tuple(size) != (w, h):
            out.append(f"{column} is {size[0]}x{size[1]} pixels but width x height is {w}x{h}")
            maps.pop(column, None)
    semantic = maps.get("semantic_mask")
    if semantic is not None:
        bad = np.unique(semantic[(semantic >= metadata.num_semantic_classes) & (semantic != metadata.ignore_value)])
        if bad.size:
            out.append(f"semantic_mask holds ids {bad[:5].tolist()} outside the {metadata.num_semantic_classes} "
                       f"classes and ignore value {metadata.ignore_value}")
    instances = row["instances"] or []
    unknown = sorted({str(inst["level"]) for inst in instances} - set(painting.LEVELS))
    if unknown:
        out.append(f"instance levels {unknown} are not levels of dataset schema v{SCHEMA_VERSION} "
                   f"({', '.join(painting.LEVELS)})")
    ids = sorted(int(inst["id"]) for inst in instances)
    if ids != list(range(1, len(ids) + 1)):
        out.append(f"instance ids are {ids[:10]}{'...' if len(ids) > 10 else ''}, not 1..{len(ids)}")
    rles_ok = True
    for inst in instances:
        rle = inst["rle"]
        if [int(s) for s in rle["size"]] != [h, w]:
            out.append(f"instance {inst['id']}: RLE size {list(rle['size'])} is not the image size [{h}, {w}]")
            rles_ok = False
            continue
        try:
            mask = codecs.decode_rle(rle)  # raises DecodeError (a ValueError) on corrupt counts
            valid = True
        except (ValueError, UnicodeEncodeError):
            valid = False
        if not valid:
            out.append(f"instance {inst['id']}: RLE does not decode to a {h}x{w} mask (corrupt counts)")
            rles_ok = False
        elif int(mask.sum()) != inst["area"]:
            out.append(f"instance {inst['id']}: area is {inst['area']} but its RLE covers {int(mask.sum())} pixels")
    instance_map = maps.get("instance_mask")
    if not (rles_ok and instance_map is not None and semantic is not None and ids == list(range(1, len(ids) + 1))):
        return out, None
    rule = metadata.painting
    fresh = [dict(inst) for inst in instances]
    painted = painting.paint_instances(fresh, semantic, metadata.thing_ids, rule, metadata.num_semantic_classes)
    if not np.array_equal(painted, instance_map):
        out.append(f"instance_mask differs from what painting rule {rule.name!r} paints from instances and "
                   f"semantic_mask at {int((painted != instance_map).sum())} pixels")
    for name in ("level", "parent", "visible_area"):
        wrong = [inst["id"] for inst, again in zip(instances, fresh) if inst[name] != again[name]]
        if wrong:
            out.append(f"{name} of instances {wrong[:10]} differs from what painting rule {rule.name!r} gives")
    figures = invariants.map_figures(instances, semantic, instance_map, metadata.thing_ids)
    if rule.paint == "objects":
        if figures.not_thing:
            out.append(f"painted ids {figures.not_thing[:10]} are not instances of a thing class")
        if figures.disagreeing:
            shares = ", ".join(f"{k}: {figures.agreement[k]:.1%}" for k in figures.disagreeing[:10])
            out.append(f"painted instances lie under {invariants.MIN_AGREEMENT:.0%} on their class ({shares})")
    return out, figures


def check_rows(folder: OutputFolder, path: str, rows: Sequence[int] | None,
               metadata: layout.DatasetMetadata) -> tuple[list[Violation], invariants.Figures]:
    """Decode and check `rows` of one data file (all rows when None), one row group at a time."""
    out, figures = [], invariants.Figures()
    with folder.fs.open_input_file(folder.path(path)) as f:
        parquet = pq.ParquetFile(f)
        start = 0
        for g in range(parquet.num_row_groups):
            n = parquet.metadata.row_group(g).num_rows
            wanted = list(range(n)) if rows is None else [r - start for r in rows if start <= r < start + n]
            if wanted:
                table = parquet.read_row_group(g).take(wanted)
                for local, row in zip(wanted, table.to_pylist()):
                    problems, found = row_check(row, metadata)
                    out += [Violation(path, msg, start + local) for msg in problems]
                    if found is not None:
                        figures.add(found)
            start += n
    return out, figures


def sample_plan(rows_per_file: dict[str, int], sample: int, seed: int) -> dict[str, list[int]]:
    """Rows to check per file: about `sample` in all, in proportion to each file's size, but at
    least one from every non-empty file, drawn with a generator seeded by `seed`."""
    total = sum(rows_per_file.values())
    rng = np.random.default_rng(seed)
    plan = {}
    for path, n in rows_per_file.items():
        k = min(n, max(1, round(sample * n / max(total, 1))))
        if n:
            plan[path] = sorted(rng.choice(n, size=k, replace=False).tolist())
    return plan


def scan_ids(folder: OutputFolder, paths: Sequence[str], progress: bool):
    """Yield (path, row, image_id) of every row, reading only the `image_id` column."""
    for path in tqdm(paths, desc="image ids", disable=not progress):
        with folder.fs.open_input_file(folder.path(path)) as f:
            parquet = pq.ParquetFile(f)
            start = 0
            for g in range(parquet.num_row_groups):
                ids = parquet.read_row_group(g, columns=["image_id"]).column(0).to_pylist()
                for i, image_id in enumerate(ids):
                    yield path, start + i, image_id
                start += len(ids)


def validate(output: str | OutputFolder, full: bool = False, sample: int = 256, seed: int = 0, workers: int = 1,
             progress: bool = False) -> Report:
    """Check `output` (a path, URL or folder); see the module docstring. Raises `OutputError` only
    when `output` is not a folder; everything else wrong inside it is a `Violation` in the report."""
    folder = OutputFolder.open(output)
    output = folder.uri
    if not folder.is_folder():
        raise OutputError(f"{output} is not a folder (or does not exist): pass the output folder of a labeling run")
    report = Report(output)
    try:
        metadata = folder.read_metadata()
    except (OutputError, SchemaError) as err:
        message = str(err).replace(folder.path(""), "").removeprefix(f"{layout.METADATA_FILE} ")
        report.violations.append(Violation(layout.METADATA_FILE, message))
        return report
    manifest = folder.read_json(layout.MANIFEST_FILE) or {}
    if not manifest:
        report.violations.append(Violation(layout.MANIFEST_FILE, "is missing: the counts cannot be checked"))
    elif version_problem(manifest.get("schema_version"), layout.MANIFEST_FILE, output):
        report.violations.append(Violation(layout.MANIFEST_FILE, version_problem(
            manifest.get("schema_version"), "it", output)))
    data_names = folder.list_files(layout.DATA_DIR)
    num_shards = manifest.get("num_shards")
    if num_shards is None:  # infer the run's total from the names, so the other checks still run
        totals = [m[1] for n in data_names if (m := re.search(r"-of-(\d{5})\.", n))]
        num_shards = int(max(set(totals), key=totals.count)) if totals else 0
    report.shards = num_shards

    data = shard_files(folder, layout.DATA_DIR, "train", ".parquet", num_shards, report)
    errors = shard_files(folder, layout.ERRORS_DIR, "errors", ".parquet", num_shards, report)
    stats = shard_files(folder, layout.STATS_DIR, "stats", ".json", num_shards, report)
    orphaned = set(errors) | set(stats)  # a shard's other files outlive a data file deleted by hand
    for i in range(num_shards):
        if i not in data:
            report.violations.append(Violation(layout.data_path(i, num_shards), (
                "is missing, though its errors table or statistics are there: the data file was deleted (or its "
                "commit interrupted); rerun the labeling command to relabel this shard" if i in orphaned else
                "is missing: this shard was never committed; rerun the labeling command to finish it")))
    missing(errors, data, lambda i: layout.errors_path(i, num_shards),
            "its data file exists, so the commit protocol wrote this first", report)
    missing(stats, data, lambda i: layout.stats_path(i, num_shards),
            "its data file exists, so the commit protocol wrote this first; the card needs it", report)

    # Every file `load_dataset` reads, strays included: their rows would end up in the dataset.
    # The run's shards come first, so a duplicate id is blamed on the stray copy, not the original.
    glob = posixpath.basename(layout.DATA_GLOB)
    strays = [f"{layout.DATA_DIR}/{n}" for n in data_names if fnmatch.fnmatch(n, glob)]
    loaded = [data[i] for i in sorted(data)] + [p for p in strays if p not in data.values()]
    rows_in, readable = row_counts(folder, loaded, metadata, report, progress)
    report.rows = sum(rows_in.values())
    error_ids = read_errors(folder, errors, report)
    check_stats(folder, data, errors, stats, rows_in, report)
    if manifest.get("num_inputs") is not None and report.rows + report.errors != manifest["num_inputs"]:
        report.violations.append(Violation(layout.MANIFEST_FILE, (
            f"lists {manifest['num_inputs']:,} inputs, but the data files hold {report.rows:,} rows and the errors "
            f"tables {report.errors:,} failed inputs ({report.rows + report.errors - manifest['num_inputs']:+,})")))
    check_ids(folder, list(readable), error_ids, report, progress)

    plan = ({path: None for path, n in readable.items() if n} if full
            else sample_plan(readable, sample, seed))
    report.checked_rows = sum(readable[p] if rows is None else len(rows) for p, rows in plan.items())
    args = (list(plan), list(plan.values()))
    if workers > 1:
        with ProcessPoolExecutor(workers) as pool:
            results = pool.map(check_rows, [folder] * len(plan), *args, [metadata] * len(plan))
            results = list(tqdm(results, total=len(plan), desc="rows", disable=not progress))
    else:
        results = (check_rows(folder, p, r, metadata) for p, r in zip(*args))
        results = list(tqdm(results, total=len(plan), desc="rows", disable=not progress))
    for found, figures in results:
        report.violations += found
        report.figures.merge(figures)
    report.rule = metadata.painting.name
    report.violations += [Violation(layout.DATA_DIR, message)
                          for message in report.figures.problems(metadata.painting.paint == "objects")]
    return report


def row_counts(folder: OutputFolder, paths: Sequence[str], metadata: layout.DatasetMetadata,
               report: Report, progress: bool) -> tuple[dict[str, int], dict[str, int]]:
    """Path -> row count of the files in `paths` that open as Parquet, and of those among them in
    the contract schema (only those are read further); a violation for each other file."""
    counts, valid = {}, {}
    for path in tqdm(paths, desc="shards", disable=not progress):
        try:
            with folder.fs.open_input_file(folder.path(path)) as f:
                parquet = pq.ParquetFile(f)
                schema, num_rows = parquet.schema_arrow, parquet.metadata.num_rows
        except (OSError, pa.ArrowException) as err:
            report.violations.append(Violation(path, f"cannot be read as Parquet: {err}"))
            continue
        counts[path] = num_rows
        problem = schema_problem(schema, metadata, folder.uri)
        if problem:
            report.violations.append(Violation(path, problem))
        else:
            valid[path] = num_rows
    return counts, valid


def read_errors(folder: OutputFolder, errors: dict[int, str], report: Report) -> list[tuple[str, int, str]]:
    """(path, row, image_id) of every failed input but the duplicate ids (whose id another input's row
    rightly holds); counts all of them into `report.errors`."""
    out = []
    for path in errors.values():
        try:
            with folder.fs.open_input_file(folder.path(path)) as f:
                table = pq.read_table(f, columns=["image_id", "error_type"])
        except (OSError, KeyError, pa.ArrowException) as err:
            report.violations.append(Violation(path, f"cannot be read as an errors table: {err}"))
            continue
        report.errors += table.num_rows
        out += [(path, i, image_id) for i, (image_id, kind) in enumerate(zip(*table.to_pydict().values()))
                if kind != DUPLICATE_ID]
    return out


def check_stats(folder: OutputFolder, data: dict[int, str], errors: dict[int, str], stats: dict[int, str],
                rows_in: dict[str, int], report: Report) -> None:
    """Each shard's statistics and the data file's footer count the rows and failures its data and
    errors files hold."""
    failed_in: dict[str, int] = {}
    for path in errors.values():
        try:
            failed_in[path] = shards.read_footer(folder.fs, folder.path(path))[0]
        except (OSError, pa.ArrowException):
            pass  # read_errors reported it
    for i, path in data.items():  # the shard's footer says what it holds (written by the labeler)
        if path not in rows_in:
            continue
        footer = shards.read_footer(folder.fs, folder.path(path))[1]
        if "rows" in footer and footer["rows"] != rows_in[path]:
            report.violations.append(Violation(path, f"its footer says {footer['rows']} rows but it holds "
                                                     f"{rows_in[path]}: rerun the labeling command to relabel it"))
        if "errors" in footer and i in errors and footer["errors"] != failed_in.get(errors[i]):
            report.violations.append(Violation(errors[i], f"holds {failed_in.get(errors[i])} failed inputs but "
                                                          f"{path}'s footer says {footer['errors']}"))
    for i, path in stats.items():
        try:
            counted = layout.ShardStats.from_json(folder.read_bytes(path).decode())
        except (ValueError, TypeError) as err:
            report.violations.append(Violation(path, f"is not valid shard statistics: {err}"))
            continue
        if data.get(i) in rows_in and counted.rows != rows_in[data[i]]:
            report.violations.append(Violation(path, f"counts {counted.rows} rows but {data[i]} holds "
                                                     f"{rows_in[data[i]]}"))
        if i in errors and counted.errors != failed_in.get(errors[i], 0):
            report.violations.append(Violation(path, f"counts {counted.errors} failed inputs but {errors[i]} "
                                                     f"holds {failed_in.get(errors[i], 0)}"))


def schema_problem(schema: pa.Schema, metadata: layout.DatasetMetadata, output: str = "") -> str | None:
    """Why a data file's schema is not the contract's (None when it is)."""
    if SCHEMA_METADATA_KEY not in (schema.metadata or {}):
        return f"carries no dataset schema version in its Parquet metadata (key {SCHEMA_METADATA_KEY.decode()!r})"
    found = read_file_metadata(schema)
    problem = version_problem(found.get("schema_version"), "it", output)
    if problem:
        return problem
    try:
        validate_schema(schema)
    except SchemaError as err:
        return str(err)
    rule = found.get("painting")
    if rule is not None and rule.get("name") != metadata.painting.name:
        return (f"was painted under rule {rule.get('name')!r} but metadata.json names {metadata.painting.name!r}: "
                f"finish the repaint (`python -m dataset_card repaint {output or 'OUTPUT'} --rule "
                f"{metadata.painting.name}`)")
    if rule is not None and painting.PaintingRule.from_dict(rule) != metadata.painting:
        return f"was painted with other thresholds than metadata.json's rule {metadata.painting.name!r}: repaint it"
    names = datasets.Features.from_arrow_schema(schema)["label"].names
    if tuple(names) != metadata.class_names:
        return f"its label names ({len(names)}) differ from the {len(metadata.class_names)} class names of metadata.json"
    return None


def check_ids(folder: OutputFolder, paths: Sequence[str], error_ids: Sequence[tuple[str, int, str]],
              report: Report, progress: bool) -> None:
    """No `image_id` twice among the rows, nor both labeled and failed. Keeps only a set of ids; a
    second pass, run only when there are duplicates, finds where each one first appeared."""
    seen: set[str] = set()
    repeats = []
    for path, row, image_id in scan_ids(folder, paths, progress):
        if image_id in seen:
            repeats.append((path, row, image_id))
        seen.add(image_id)
    first: dict[str, tuple[str, int]] = {}
    if repeats:
        wanted = {image_id for _, _, image_id in repeats}
        for path, row, image_id in scan_ids(folder, paths, False):
            if image_id in wanted and image_id not in first:
                first[image_id] = (path, row)
    for path, row, image_id in repeats:
        where = first.get(image_id, ("?", "?"))
        report.violations.append(Violation(path, f"duplicate image_id {image_id!r}, first at {where[0]} row "
                                                 f"{where[1]}", row))
    for path, row, image_id in error_ids:
        if image_id in seen:
            report.violations.append(Violation(path, f"image_id {image_id!r} is listed as failed but also has a "
                                                     "labeled row", row))

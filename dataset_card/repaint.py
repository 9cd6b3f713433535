"""`python -m dataset_card repaint OUTPUT [--rule NAME]`: repaint a labeled folder without its models.

`instances` (every mask with its class and purity) and `semantic_mask` hold everything a painting
rule needs, so `instance_mask` and the instances' `level`, `parent` and `visible_area` are
recomputed from them, shard by shard, on CPUs: trying another rule on ImageNet costs CPU-hours,
not a relabeling's GPU-days. A folder of an older schema comes out in the current one: v1's map was
the "parts" rule's; v2's label maps were PNGs, and are re-encoded (`codecs.encode_mask`): under
the folder's own rule a v2 shard is not repainted, only re-encoded, its statistics kept.

Each shard is rewritten through the commit protocol (`shards.commit_shard`: its errors table as it
was, its recomputed statistics, then its data file, each renamed into place), and each data file
records the rule it was painted under, so a rerun skips the shards already done: the command is
resumable, and a killed run leaves every shard either old or new, never half. `metadata.json`
names the rule (and the version) once every shard is done; then the manifest records the repaint
and the card is rebuilt.
"""

from __future__ import annotations

import datetime
import json
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from tqdm.auto import tqdm

from dataset_card.contract import codecs, coverage, images, invariants, layout, painting, shards
from dataset_card.contract.output_folder import OutputError, OutputFolder
from dataset_card.contract.schema import (
    REFERENCE_COLUMNS,
    SCHEMA_VERSION,
    UPGRADABLE_VERSIONS,
    arrow_schema,
    read_file_metadata,
    semantic_mask_dtype,
)


@dataclass(frozen=True)
class RepaintResult:
    rule: painting.PaintingRule
    from_version: int
    repainted: tuple[int, ...]  # shard indices rewritten by this run
    skipped: tuple[int, ...]  # already painted under the rule (an earlier, interrupted run)
    rows: int  # rows rewritten by this run


def repaint_row(row: dict, metadata: layout.DatasetMetadata, rule: painting.PaintingRule,
                stats: layout.ShardStats) -> tuple[bytes, bytes, list[dict]]:
    """One stored row -> (its `semantic_mask` and new `instance_mask` bytes in the current encoding,
    its `instances` with the current fields); adds the row to `stats`."""
    stored = row["semantic_mask"]["bytes"]
    semantic = codecs.decode_mask(stored)
    instances = [dict(inst, level=inst.get("level") or "", parent=inst.get("parent") or 0)
                 for inst in row["instances"] or []]
    things = metadata.thing_ids
    instance_map = painting.paint_instances(instances, semantic, things, rule, metadata.num_semantic_classes)
    classes, counts = np.unique(semantic, return_counts=True)
    stats.add_row(len(instances), float(np.count_nonzero(instance_map)) / max(1, instance_map.size),
                  [inst["category_purity"] for inst in instances], dict(zip(classes.tolist(), counts.tolist())),
                  painting.level_counts(instances), invariants.map_figures(instances, semantic, instance_map, things),
                  coverage.measure(instances, instance_map))
    if not stored.startswith(codecs.ZSTD_MAGIC):  # a v2 PNG
        stored = codecs.encode_mask(semantic.astype(semantic_mask_dtype(metadata.num_semantic_classes)))
    return stored, codecs.encode_instance_mask(instance_map), instances


def _recoded(table: pa.Table, metadata: layout.DatasetMetadata) -> tuple[list[dict], list[dict], list]:
    """A shard's label maps in the current encoding, values unchanged (semantic, instance), and its
    `instances` as they are."""
    semantic_dtype = semantic_mask_dtype(metadata.num_semantic_classes)
    semantics, maps = [], []
    for row in table.select(["semantic_mask", "instance_mask"]).to_pylist():
        semantic = codecs.decode_mask(row["semantic_mask"]["bytes"])
        semantics.append({"bytes": codecs.encode_mask(semantic.astype(semantic_dtype)), "path": None})
        maps.append({"bytes": codecs.encode_instance_mask(codecs.decode_mask(row["instance_mask"]["bytes"])),
                     "path": None})
    return semantics, maps, table.column("instances").to_pylist()


def is_current(schema: pa.Schema, rule: painting.PaintingRule) -> bool:
    """Whether a data file's schema says it is this version, painted under `rule`."""
    found = read_file_metadata(schema)
    return found.get("schema_version") == SCHEMA_VERSION and found.get("painting") == rule.to_dict()


def repaint_shard(folder: OutputFolder, index: int, num_shards: int, metadata: layout.DatasetMetadata,
                  rule: painting.PaintingRule) -> int:
    """Rewrite shard `index` under `rule` (see the module doc); returns its row count."""
    with folder.fs.open_input_file(folder.path(layout.data_path(index, num_shards))) as f:
        table = pq.read_table(f)
    stats = layout.ShardStats(shard=index)
    errors = folder.read_errors(index, num_shards)
    for error_type in errors.column("error_type").to_pylist():
        stats.add_error(error_type)
    stats_file = layout.stats_path(index, num_shards)
    if read_file_metadata(table.schema).get("painting") == rule.to_dict() and folder.exists(stats_file):
        # Painted under this rule already (a v2 shard): the maps only change encoding, and the
        # statistics stay what they were; a tenth of a repaint's time.
        stats = layout.ShardStats.from_json(folder.read_bytes(stats_file).decode())
        semantics, maps, instances = _recoded(table, metadata)
    else:
        semantics, maps, instances = [], [], []
        for row in table.select(["semantic_mask", "instances"]).to_pylist():
            semantic, instance_map, insts = repaint_row(row, metadata, rule, stats)
            semantics.append({"bytes": semantic, "path": None})
            maps.append({"bytes": instance_map, "path": None})
            instances.append(insts)
    schema = arrow_schema(metadata.class_names, metadata.semantic_class_names, rule.to_dict(),
                          image_reference=REFERENCE_COLUMNS[0] in table.column_names,
                          image_bytes=images.storage_of(table.schema) == images.INLINE)
    columns = {name: table.column(name) for name in table.column_names}
    columns["semantic_mask"] = pa.array(semantics, schema.field("semantic_mask").type)
    columns["instance_mask"] = pa.array(maps, schema.field("instance_mask").type)
    columns["instances"] = pa.array(instances, schema.field("instances").type)
    new = pa.table([columns[f.name].cast(f.type) for f in schema], schema=schema)
    # The labeler's footer (run, manifest, counts, image storage) still describes the shard.
    footer = {k: v for k, v in read_file_metadata(table.schema).items() if k not in ("schema_version", "painting")}
    shards.commit_shard(folder, index, num_shards, new, errors, stats, footer=footer)
    return new.num_rows


def _num_shards(folder: OutputFolder, manifest: dict) -> int:
    if manifest.get("num_shards") is not None:
        return int(manifest["num_shards"])
    totals = {int(n.split("-of-")[1].split(".")[0]) for n in folder.list_files(layout.DATA_DIR)
              if n.startswith("train-") and "-of-" in n}
    if len(totals) != 1:
        raise OutputError(f"{folder.root} has no manifest.json and its data files do not agree on a shard count: "
                          "validate it first (python -m dataset_card validate)")
    return totals.pop()


def repaint(output: str | OutputFolder, rule: str | None = None, min_purity: float | None = None, workers: int = 1,
            progress: bool = False, log: Callable[[str], None] = lambda message: None) -> RepaintResult:
    """Repaint every committed shard of `output` under the rule named `rule` (default: the folder's
    own, the default rule for a v1 one), its `min_purity` replaced if given; then
    write metadata.json, the manifest and the card. Raises ValueError for an unknown rule or a bad
    threshold, `OutputError` / `SchemaError` for a folder that is not a labeled one."""
    folder = OutputFolder.open(output)
    if not folder.is_folder():
        raise OutputError(f"{folder} is not a folder (or does not exist): pass the output folder of a labeling run")
    old = folder.read_metadata(accept=(SCHEMA_VERSION, *UPGRADABLE_VERSIONS))
    own = old.painting if old.schema_version >= 2 else painting.RULES[painting.DEFAULT_RULE]  # v1's was "parts"
    if rule is None and min_purity is None:
        rule = own
    else:
        rule = painting.rule_named(rule or own.name, min_purity=min_purity)
    metadata = layout.DatasetMetadata(old.class_names, old.semantic_classes, old.semantic_source, SCHEMA_VERSION, rule)
    manifest = folder.read_json(layout.MANIFEST_FILE) or {}
    num_shards = _num_shards(folder, manifest)
    todo, skipped = [], []
    for index in sorted(shards.committed_shards(folder, num_shards)):
        with folder.fs.open_input_file(folder.path(layout.data_path(index, num_shards))) as f:
            (skipped if is_current(pq.ParquetFile(f).schema_arrow, rule) else todo).append(index)
    log(f"repainting {len(todo)} of {len(todo) + len(skipped)} shards under rule {rule.name!r} "
        f"(dataset schema v{old.schema_version} -> v{SCHEMA_VERSION})")
    bar = tqdm(total=len(todo), unit="shard", desc="repaint", disable=not progress)
    rows = 0
    with bar:
        if workers > 1 and len(todo) > 1:
            with ProcessPoolExecutor(workers) as pool:
                for n in pool.map(repaint_shard, [folder] * len(todo), todo, [num_shards] * len(todo),
                                  [metadata] * len(todo), [rule] * len(todo)):
                    rows += n
                    bar.update(1)
        else:
            for index in todo:
                rows += repaint_shard(folder, index, num_shards, metadata, rule)
                bar.update(1)
    folder.write_bytes(layout.METADATA_FILE, metadata.to_json().encode())
    if manifest:
        record = {"rule": rule.to_dict(), "from_schema_version": old.schema_version, "shards": len(todo),
                  "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
        manifest["repaints"] = [*manifest.get("repaints", []), record]
        manifest["schema_version"] = SCHEMA_VERSION
        manifest["painting"] = rule.to_dict()
        if isinstance(manifest.get("arguments"), dict):  # a labeling run resuming here must paint alike
            default = painting.RULES[rule.name].min_purity
            manifest["arguments"].update(painting_rule=rule.name,
                                         min_purity=None if rule.min_purity == default else rule.min_purity)
        folder.write_bytes(layout.MANIFEST_FILE, json.dumps(manifest, indent=2).encode())
    from dataset_card.card.build import build_card

    build_card(folder)
    return RepaintResult(rule, old.schema_version, tuple(todo), tuple(skipped), rows)


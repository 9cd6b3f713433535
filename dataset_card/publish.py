"""`python -m dataset_card publish OUT DEST`: the copy of a labeled folder to share (on the Hub).

What a release holds, and why it differs from OUT:
- the dataset's files only (`PUBLISHED`): the shards, errors tables, statistics, metadata, card
  and its pictures. Run leftovers (`.lease.json`, `.parts/`, `.journal/`, `*.tmp`: every name
  starting with a dot) and files outside the layout are left out, and listed as such;
- no internal paths: in every JSON file (the manifest's input, output and checkpoint paths, a local
  semantic model's folder) a string that is an absolute path or a storage URL (s3://, gs://; not
  http) becomes `<redacted>/NAME` (its last component), a HOST:PORT (the Ray address)
  `<redacted>`, and the card's text likewise (`redact_value`, `redact_text`);
- label maps a person can see: each data file gains `semantic_preview` and `instance_preview`, PNG
  `datasets.Image` columns (palette-indexed, so their pixels are the ids, `gallery.palette_png`)
  that the Hub's viewer and `load_dataset` show as pictures. The v3 maps stay as they are, so the
  release is still what the trainer reads (it reads only its columns); `previews=False` copies the
  data files unchanged.

`plan` lists what would be written without writing (`--dry-run`); it reads OUT only and needs no
network beyond what reading OUT needs. `publish` writes DEST, which must be new or empty.
"""

from __future__ import annotations

import io
import json
import posixpath
import re
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from urllib.parse import urlsplit

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from dataset_card.card import gallery
from dataset_card.contract import codecs, layout, shards
from dataset_card.contract.output_folder import OutputError, OutputFolder

# Where the files of a release lie (regular expressions on the path relative to OUT).
PUBLISHED = {
    r"data/train-\d{5}-of-\d{5}\.parquet": "rows",
    r"errors/errors-\d{5}-of-\d{5}\.parquet": "failed inputs",
    r"stats/stats-\d{5}-of-\d{5}\.json": "shard statistics",
    r"assets/[^/]+\.png": "card picture",
    re.escape(layout.METADATA_FILE): "taxonomy and painting rule",
    re.escape(layout.MANIFEST_FILE): "provenance",
    re.escape(layout.RUN_STATS_FILE): "run summary",
    re.escape(layout.CARD_FILE): "dataset card",
    re.escape(layout.CARD_OPTIONS_FILE): "what the card was told",
    r"quality\.json": "quality gate",
}
PREVIEWS = ("semantic_preview", "instance_preview")
REDACTED = "<redacted>"
# A local path or a storage URL (s3://, gs://, file://...): where the run's files lay. Web URLs
# (http, https: a checkpoint's public download) are provenance, and stay.
_ABSOLUTE = re.compile(r"^(/|~|[A-Za-z]:[\\/]|(?!https?://)[a-z][a-z0-9+.-]*://)")
# A cluster address such as the Ray head's 10.0.0.5:6379 or head-node:6379 (not a time like 16:16).
_HOST_PORT = re.compile(r"^(?=[^:]*[A-Za-z.])[\w.-]+:\d{2,5}$")


@dataclass(frozen=True)
class Entry:
    name: str  # relative path, the same in OUT and DEST
    nbytes: int  # its size in OUT
    action: str  # "copy", "previews" (rows rewritten with preview columns) or "redact" (text with paths removed)


@dataclass
class Plan:
    entries: list[Entry] = field(default_factory=list)
    left_out: list[tuple[str, str]] = field(default_factory=list)  # (relative path, why)

    def format(self, dest: str = "DEST") -> str:
        """What would be written and what is left out, one file a line (relative paths only)."""
        what = {"copy": "", "previews": "  + PNG previews of the label maps", "redact": "  (absolute paths redacted)"}
        lines = [f"{len(self.entries)} files, {sum(e.nbytes for e in self.entries) / 1e6:.1f} MB before previews, "
                 f"would be written to {dest}:"]
        lines += [f"  {e.name}  {e.nbytes:,} B{what[e.action]}" for e in self.entries]
        if self.left_out:
            lines.append(f"left out ({len(self.left_out)}):")
            lines += [f"  {name}  ({why})" for name, why in self.left_out]
        return "\n".join(lines)


def plan(output: str | OutputFolder, previews: bool = True) -> Plan:
    """Sort every file under `output` into what a release holds and what it leaves out."""
    folder = OutputFolder.open(output)
    folder.read_metadata()  # one sentence when `output` is not a labeled folder of this schema
    infos = folder.fs.get_file_info(pafs.FileSelector(folder.root, recursive=True))
    out = Plan()
    hidden_dirs = set()
    for info in sorted(infos, key=lambda i: i.path):
        name = posixpath.relpath(info.path, folder.root)
        parts = name.split("/")
        hidden = next((k for k, part in enumerate(parts) if part.startswith(".")), None)
        if hidden is not None:
            top = "/".join(parts[: hidden + 1])
            if top not in hidden_dirs:  # one line per leftover folder, not per file in it
                hidden_dirs.add(top)
                folder_like = top != name or info.type == pafs.FileType.Directory
                out.left_out.append((top + ("/" if folder_like else ""), "run leftover: lease, unfinished shard or "
                                     "temporary file"))
            continue
        if info.type != pafs.FileType.File:
            continue
        if not any(re.fullmatch(pattern, name) for pattern in PUBLISHED):
            out.left_out.append((name, "not part of a labeled folder's layout"))
            continue
        action = ("previews" if previews and name.startswith(f"{layout.DATA_DIR}/") else
                  "redact" if name.endswith(".json") or name == layout.CARD_FILE else "copy")
        out.entries.append(Entry(name, int(info.size), action))
    if not any(e.name.startswith(f"{layout.DATA_DIR}/") for e in out.entries):
        raise OutputError(f"{folder} has no data files to publish: label it first")
    return out


def redact_value(value, found: set[str]):
    """`value` (parsed JSON) with every absolute path or URL string made `<redacted>/NAME`; the
    strings replaced are added to `found`."""
    if isinstance(value, dict):
        return {k: redact_value(v, found) for k, v in value.items()}
    if isinstance(value, list):
        return [redact_value(v, found) for v in value]
    if isinstance(value, str) and (_ABSOLUTE.match(value) or _HOST_PORT.match(value)) and value != "/":
        found.add(value)
        return _redacted(value)
    return value


def redact_text(text: str, found: set[str]) -> str:
    """`text` with each of the strings `found` (longest first) replaced as `redact_value` replaced it."""
    for value in sorted(found, key=len, reverse=True):
        text = text.replace(value, _redacted(value))
    return text


def _redacted(value: str) -> str:
    """`<redacted>/NAME` keeping the last component of a path (a URL's path, never its host)."""
    if _HOST_PORT.match(value):
        return REDACTED
    path = urlsplit(value).path if "://" in value else value.replace("\\", "/")
    name = posixpath.basename(path.rstrip("/"))
    return f"{REDACTED}/{name}" if name else REDACTED


def with_previews(table: pa.Table, num_semantic_classes: int) -> pa.Table:
    """A data file's rows plus `PREVIEWS`: each label map as a palette PNG (`gallery.palette_png`),
    typed `datasets.Image` in the file's features; the file's contract metadata is kept."""
    import datasets

    semantic_palette = gallery.class_palette(num_semantic_classes)
    semantic, instance = [], []
    for row in table.select(["semantic_mask", "instance_mask"]).to_pylist():
        instance_map = codecs.decode_mask(row["instance_mask"]["bytes"])
        semantic.append({"bytes": gallery.palette_png(codecs.decode_mask(row["semantic_mask"]["bytes"]),
                                                      semantic_palette), "path": None})
        instance.append({"bytes": gallery.palette_png(instance_map, gallery.instance_palette(int(instance_map.max(
            initial=0)) + 1)), "path": None})
    features = datasets.Features.from_arrow_schema(table.schema)
    for name in PREVIEWS:
        features[name] = datasets.Image()
    schema = features.arrow_schema
    metadata = {**(table.schema.metadata or {}), b"huggingface": schema.metadata[b"huggingface"]}
    columns = [*table.columns, pa.array(semantic, schema.field(PREVIEWS[0]).type),
               pa.array(instance, schema.field(PREVIEWS[1]).type)]
    return pa.Table.from_arrays(columns, schema=schema.with_metadata(metadata))


def card_with_previews(text: str) -> str:
    """The card's text with `PREVIEWS` added to the default config's features and a line on them."""
    from huggingface_hub import DatasetCard

    card = DatasetCard(text)
    info = card.data.dataset_info
    default = next(i for i in info if i.get("config_name") == "default") if isinstance(info, list) else info
    default["features"] = [f for f in default["features"] if f["name"] not in PREVIEWS] + [
        {"name": name, "dtype": "image"} for name in PREVIEWS]
    note = ("\n\n## Previews\n\n`semantic_preview` and `instance_preview` show `semantic_mask` and `instance_mask` as "
            "palette PNGs: the Hub's viewer draws them, and each pixel's palette index is its id (`np.asarray(image)`; "
            "an image with 256 or more instances keeps only the colours). The zstd maps stay the labels of record.\n")
    return str(card).rstrip() + note


def publish(output: str | OutputFolder, dest: str, previews: bool = True, workers: int = 1, log=print) -> Plan:
    """Write the release of `output` into `dest` (new or empty); returns its plan. The data files
    come first and the card last, so a release cut short has no card. `workers`: processes that
    write the previews (about 14 ms of CPU a 375 x 500 row)."""
    folder = OutputFolder.open(output)
    target = OutputFolder.open(dest)
    kind = target.fs.get_file_info(target.root).type
    if kind == pafs.FileType.File or (kind == pafs.FileType.Directory
                                      and target.fs.get_file_info(pafs.FileSelector(target.root))):
        raise OutputError(f"{dest} is not empty: publish into a new or empty folder")
    if type(folder.fs) is type(target.fs) and f"{target.root}/".startswith(f"{folder.root.rstrip('/')}/"):
        raise OutputError(f"{dest} lies inside {folder}: publish to a folder outside it")
    work = plan(folder, previews)
    num_classes = folder.read_metadata().num_semantic_classes
    jobs = [(folder, target, e.name, num_classes) for e in work.entries if e.action == "previews"]
    if workers > 1 and len(jobs) > 1:
        with ProcessPoolExecutor(min(workers, len(jobs))) as pool:
            for name in pool.map(_write_with_previews, *zip(*jobs)):
                log(f"wrote {name}")
    else:
        for job in jobs:
            log(f"wrote {_write_with_previews(*job)}")
    found: set[str] = set()
    texts = {e.name: json.dumps(redact_value(json.loads(folder.read_bytes(e.name)), found), indent=2).encode()
             for e in work.entries if e.name.endswith(".json")}
    for entry in work.entries:
        if entry.name in texts:
            target.write_bytes(entry.name, texts[entry.name])
        elif entry.action == "copy":
            target.fs.create_dir(posixpath.dirname(target.path(entry.name)), recursive=True)
            pafs.copy_files(folder.path(entry.name), target.path(entry.name), folder.fs, target.fs)
        else:
            continue  # the data files were written above, the card comes last
        log(f"wrote {entry.name}")
    if any(e.name == layout.CARD_FILE for e in work.entries):
        text = redact_text(folder.read_bytes(layout.CARD_FILE).decode(), found)
        target.write_bytes(layout.CARD_FILE, (card_with_previews(text) if previews else text).encode())
        log(f"wrote {layout.CARD_FILE}")
    return work


def _write_with_previews(folder: OutputFolder, target: OutputFolder, name: str, num_semantic_classes: int) -> str:
    """Data file `name` of `folder` written into `target` with `PREVIEWS` added; returns `name`."""
    with folder.fs.open_input_file(folder.path(name)) as f:
        table = pq.read_table(f)
    sink = io.BytesIO()
    shards.write_parquet(with_previews(table, num_semantic_classes), sink, shards.row_group_rows(table))
    target.write_bytes(name, sink.getvalue())
    return name

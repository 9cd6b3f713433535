"""`python -m dataset_card show OUT IMAGE_ID`: one image's labels drawn over it, as a PNG of its size.

Layers (`LAYERS`):
- "semantic": the image tinted by semantic class (the card's palette; no class: untinted);
- "instances": each painted instance of `instance_mask` in its own colour, outlined in white;
- "levels": every kept mask of `instances` (also those the map does not paint) tinted and outlined
  in its level's colour (`painting.LEVELS`), smaller masks on top.

A labels-only folder's row holds no image: the labels are drawn over the file found under
`images` (checked against its stored hash) when that is given, else over neutral grey.
"""

from __future__ import annotations

import io
import posixpath
import re
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pyarrow.parquet as pq
from PIL import Image

from dataset_card.card import gallery
from dataset_card.contract import codecs, images, layout, painting
from dataset_card.contract.output_folder import OutputError, OutputFolder
from dataset_card.contract.schema import REFERENCE_COLUMNS

LAYERS = ("semantic", "instances", "levels")
GREY = 128  # the background of a labels-only row shown without its image
MAX_LISTED = 30  # painted instances the legend names one by one
_SHARD_COUNT = re.compile(r"-of-(\d{5})\.parquet$")


@dataclass(frozen=True)
class Shown:
    png: bytes  # the picture, at the image's size
    legend: list[str]  # what its colours mean, one line each


def find_row(folder: OutputFolder, image_id: str) -> dict:
    """The row whose `image_id` is `image_id` (every column), reading only the ids of the data file
    its hash files it in (`layout.shard_of`), then of the others (a folder renamed by hand) until it is
    found, then its row group. `OutputError` when no row has it."""
    names = folder.list_files(layout.DATA_DIR)
    if not names:
        raise OutputError(f"{folder.path(layout.DATA_DIR)} holds no data files: is {folder} the output folder of a "
                          "labeling run?")
    counts = {int(m.group(1)) for m in map(_SHARD_COUNT.search, names) if m}
    if len(counts) == 1:
        home = posixpath.basename(layout.data_path(layout.shard_of([image_id], *counts)[0], *counts))
        names = sorted(names, key=lambda name: name != home)
    for name in names:
        with folder.fs.open_input_file(folder.path(layout.DATA_DIR, name)) as f:
            parquet = pq.ParquetFile(f)
            ids = parquet.read(columns=["image_id"]).column(0).to_pylist()
            if image_id not in ids:
                continue
            row, start = ids.index(image_id), 0
            for g in range(parquet.num_row_groups):
                rows = parquet.metadata.row_group(g).num_rows
                if row < start + rows:
                    return parquet.read_row_group(g).slice(row - start, 1).to_pylist()[0]
                start += rows
    raise OutputError(f"no row of {folder} has image_id {image_id!r}: an image_id is the input's relative path "
                      "without its extension, e.g. n01440764/n01440764_10026")


def background(row: dict, image_root: str | None) -> np.ndarray:
    """(H, W, 3) uint8: the row's image, the labeled file under `image_root` for a labels-only row,
    else neutral grey."""
    stored = row["image"]["bytes"]
    if stored is None and image_root is not None:
        checks = [row.get(c) for c in REFERENCE_COLUMNS]
        stored = images.ImageSource(image_root).read(row["image"]["path"], *checks)
    if stored is None:
        return np.full((row["height"], row["width"], 3), GREY, np.uint8)
    return codecs.decode_image(stored)


def draw(row: dict, metadata: layout.DatasetMetadata, layer: str, rgb: np.ndarray) -> Shown:
    """The row's `layer` over `rgb` (its image or a background of its size), with its legend."""
    if layer == "semantic":
        semantic = codecs.decode_mask(row["semantic_mask"]["bytes"])
        palette = gallery.class_palette(metadata.num_semantic_classes)
        names = {c.id: c.name for c in metadata.semantic_classes}
        ids, counts = np.unique(semantic, return_counts=True)
        legend = [f"{_hex(palette[i]) if i < len(palette) else 'untinted'} {names.get(i, 'no class')} "
                  f"({100 * n / semantic.size:.1f}% of pixels)" for i, n in sorted(zip(ids.tolist(), counts.tolist()),
                                                                               key=lambda p: -p[1])]
        return Shown(_png(gallery.semantic_overlay(rgb, semantic, palette)), legend)
    if layer == "instances":
        instance_map = codecs.decode_mask(row["instance_mask"]["bytes"])
        painted = sorted(set(np.unique(instance_map).tolist()) - {0})
        by_id = {inst["id"]: inst for inst in row["instances"]}
        names = {c.id: c.name for c in metadata.semantic_classes}
        legend = [f"{len(painted)} painted instance{'s' if len(painted) != 1 else ''} (rule "
                  f"{metadata.painting.name!r}), each its own colour, outlined in white"]
        colours = gallery.instance_palette(int(instance_map.max()) + 1)  # the overlay's colours (same seed)
        legend += [f"  {_hex(colours[i])} id {i}: {names.get(by_id[i]['category_id'], '?')} ({by_id[i]['level']})"
                   for i in painted[:MAX_LISTED] if i in by_id]
        legend += [f"  ... and {len(painted) - MAX_LISTED} more"] if len(painted) > MAX_LISTED else []
        overlay = gallery.instance_overlay(rgb, instance_map, np.random.default_rng(0))
        return Shown(_png(overlay), legend)
    if layer == "levels":
        colours = gallery.level_palette(_levels(row["instances"]))
        counts = {level: sum(i["level"] == level for i in row["instances"]) for level in colours}
        legend = [f"{_hex(colour)} {level}: {counts[level]} mask{'s' if counts[level] != 1 else ''}"
                  for level, colour in colours.items()]
        return Shown(_png(gallery.level_overlay(rgb, row["instances"], colours)), legend)
    raise ValueError(f"unknown layer {layer!r}; use one of {', '.join(LAYERS)}")


def show(output: str | OutputFolder, image_id: str, layer: str = "instances", image_root: str | None = None) -> Shown:
    """Image `image_id` of the labeled folder `output` with its `layer` drawn over it."""
    if layer not in LAYERS:
        raise ValueError(f"unknown layer {layer!r}; use one of {', '.join(LAYERS)}")
    folder = OutputFolder.open(output)
    metadata = folder.read_metadata()
    row = find_row(folder, image_id)
    return draw(row, metadata, layer, background(row, image_root))


def _levels(instances: Sequence[dict]) -> list[str]:
    """The schema's levels, then any level a row holds that this code does not know (drawn too)."""
    return [*painting.LEVELS, *sorted({i["level"] for i in instances} - set(painting.LEVELS))]


def _hex(colour: np.ndarray) -> str:
    return "#" + "".join(f"{int(c):02x}" for c in colour)


def _png(rgb: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="PNG")
    return buf.getvalue()

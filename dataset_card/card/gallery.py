"""Pictures for the card: a gallery of a fixed sample (image | semantic overlay | instance overlay)
and histograms of the run's statistics. Figures are drawn on matplotlib's Agg canvas (no pyplot
state, no display) and returned as PNG bytes so they can be written to any filesystem.

The overlays and palettes here are also what `python -m dataset_card show` draws one image with,
and `palette_png` the label-map previews `python -m dataset_card publish` adds to a release.

Only the sampled rows are read (their row groups, without the `instances` column) and decoded.
"""

from __future__ import annotations

import io
from collections.abc import Sequence

import numpy as np
import pyarrow.parquet as pq
from matplotlib import colormaps
from matplotlib.figure import Figure
from matplotlib.patches import Patch
from PIL import Image

from dataset_card.card.run_summary import ClassShare, bin_labels
from dataset_card.contract import codecs, coverage, layout, painting
from dataset_card.contract.output_folder import OutputFolder

GALLERY_COLUMNS = ("image_id", "label", "image", "width", "height", "semantic_mask", "instance_mask")
ALPHA = 0.55  # overlay opacity: the image stays recognisable under the colours


def sample_rows(folder: OutputFolder, data_files: Sequence[str], rows_per_file: Sequence[int], num: int,
                seed: int) -> list[dict]:
    """`num` rows drawn without replacement, uniformly over all shards, with a seeded generator.

    Reads only the row groups holding them and only `GALLERY_COLUMNS`. Rows come back in
    dataset order (shard, then row), each with its `file` and `row` added.
    """
    total = sum(rows_per_file)
    picks = np.sort(np.random.default_rng(seed).choice(total, size=min(num, total), replace=False))
    file_starts = np.cumsum([0, *rows_per_file])
    out = []
    for i, name in enumerate(data_files):
        local = picks[(picks >= file_starts[i]) & (picks < file_starts[i + 1])] - file_starts[i]
        if not len(local):
            continue
        with folder.fs.open_input_file(folder.path(name)) as f:
            parquet = pq.ParquetFile(f)
            group_rows = [parquet.metadata.row_group(g).num_rows for g in range(parquet.num_row_groups)]
            group_starts = np.cumsum([0, *group_rows])
            for g in np.unique(np.searchsorted(group_starts, local, side="right") - 1):
                in_group = local[(local >= group_starts[g]) & (local < group_starts[g + 1])]
                table = parquet.read_row_group(int(g), columns=list(GALLERY_COLUMNS))
                for row, record in zip(in_group, table.take(in_group - group_starts[g]).to_pylist()):
                    out.append({**record, "file": name, "row": int(row)})
    return out


def class_palette(num_classes: int, seed: int = 0) -> np.ndarray:
    """(C, 3) uint8 colours: tab20's for the first 20 classes (its 10 hues, then their light shades,
    so neighbouring ids differ in hue), seeded random ones after."""
    tab20 = np.array(colormaps["tab20"].colors)
    base = (np.concatenate([tab20[0::2], tab20[1::2]]) * 255).astype(np.uint8)
    extra = np.random.default_rng(seed).integers(30, 256, size=(max(num_classes - len(base), 0), 3))
    return np.concatenate([base, extra.astype(np.uint8)])[:num_classes]


def instance_palette(num_ids: int, seed: int = 0) -> np.ndarray:
    """(num_ids, 3) uint8 seeded random colours, black for id 0 (no instance)."""
    colours = np.random.default_rng(seed).integers(40, 256, size=(max(num_ids, 1), 3)).astype(np.uint8)
    colours[0] = 0
    return colours


def level_palette(levels: Sequence[str] = painting.LEVELS) -> dict[str, np.ndarray]:
    """Level name -> its uint8 colour: tab20's hues in the order the painting rules list the levels."""
    return dict(zip(levels, class_palette(len(levels))))


def palette_png(values: np.ndarray, palette: np.ndarray, missing: Sequence[int] = (0, 0, 0)) -> bytes:
    """(H, W) ids -> a PNG that shows each id in its `palette` colour (ids past it in `missing`).

    While every id is below 256 the PNG is palette-indexed: its pixels are the ids themselves
    (`np.asarray(Image.open(f))` gives the map back) and any image viewer shows the colours;
    otherwise it holds the colours as RGB (the ids then live only in the stored map).
    """
    ids = values.astype(np.int64)
    if ids.size == 0 or int(ids.max()) < 256:
        table = np.tile(np.asarray(missing, np.uint8), (256, 1))
        table[: min(len(palette), 256)] = palette[:256]
        img = Image.fromarray(ids.astype(np.uint8))
        img.putpalette(table.ravel().tolist())  # an "L" image with a palette is a "P" image
    else:
        table = np.concatenate([palette, np.tile(np.asarray(missing, np.uint8), (int(ids.max()) + 1 - len(palette), 1))]) \
            if int(ids.max()) >= len(palette) else palette
        img = Image.fromarray(table[ids].astype(np.uint8))
    buf = io.BytesIO()
    img.save(buf, format="PNG", optimize=False)
    return buf.getvalue()


def _blend(rgb: np.ndarray, colours: np.ndarray, where: np.ndarray) -> np.ndarray:
    out = rgb.astype(np.float32)
    out[where] = (1 - ALPHA) * out[where] + ALPHA * colours[where]
    return out.round().astype(np.uint8)


def semantic_overlay(rgb: np.ndarray, semantic: np.ndarray, palette: np.ndarray) -> np.ndarray:
    """(H, W, 3) uint8 image, (H, W) class map -> the image tinted by class; the ignore value
    (and any id outside the palette) is left untinted."""
    known = semantic < len(palette)
    return _blend(rgb, palette[np.where(known, semantic, 0)], known)


def instance_boundaries(instance_map: np.ndarray) -> np.ndarray:
    """(H, W) ids -> (H, W) bool, True where a pixel's right or lower neighbour has another id."""
    edge = np.zeros(instance_map.shape, bool)
    edge[:, :-1] |= instance_map[:, :-1] != instance_map[:, 1:]
    edge[:-1, :] |= instance_map[:-1, :] != instance_map[1:, :]
    return edge


def instance_overlay(rgb: np.ndarray, instance_map: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """(H, W, 3) uint8 image, (H, W) instance ids -> a random colour per instance, white outlines."""
    colours = rng.integers(40, 256, size=(int(instance_map.max()) + 1, 3)).astype(np.uint8)
    out = _blend(rgb, colours[instance_map], instance_map > 0)
    out[instance_boundaries(instance_map)] = 255
    return out


def level_overlay(rgb: np.ndarray, instances: Sequence[dict], colours: dict[str, np.ndarray]) -> np.ndarray:
    """(H, W, 3) uint8 image, the row's `instances` -> every kept mask tinted by its level (larger
    first, so smaller masks lie on top, as the `parts` rule paints) and outlined in that colour.
    Levels missing from `colours` are drawn grey."""
    h, w = rgb.shape[:2]
    ids, tint = np.zeros((h, w), np.int64), np.zeros((h, w, 3), np.uint8)
    for inst in sorted(instances, key=lambda i: i["id"]):
        mask = codecs.decode_rle(inst["rle"], check=False)
        ids[mask] = inst["id"]
        tint[mask] = colours.get(inst["level"], np.array([128, 128, 128], np.uint8))
    out = _blend(rgb, tint, ids > 0)
    edge = instance_boundaries(ids)
    out[edge] = tint[edge]
    return out


def _png(fig: Figure) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    return buf.getvalue()


def gallery_png(samples: Sequence[dict], metadata: layout.DatasetMetadata, max_legend: int = 12,
                seed: int = 0) -> bytes:
    """One row per sample: image | semantic overlay | instance overlay; a legend of the classes
    covering most pixels in the sample."""
    palette = class_palette(metadata.num_semantic_classes)
    names = {c.id: c.name for c in metadata.semantic_classes}
    fig = Figure(figsize=(12, 3.2 * len(samples) + 1.0), layout="constrained")
    axes = fig.subplots(len(samples), 3, squeeze=False)
    pixels: dict[int, int] = {}
    for r, row in enumerate(samples):
        semantic = codecs.decode_mask(row["semantic_mask"]["bytes"])
        stored = row["image"]["bytes"]  # None in a labels-only release: the labels over grey
        rgb = codecs.decode_image(stored) if stored is not None else np.full((*semantic.shape, 3), 128, np.uint8)
        instances = codecs.decode_mask(row["instance_mask"]["bytes"])
        ids, counts = np.unique(semantic[semantic < len(palette)], return_counts=True)
        for i, n in zip(ids.tolist(), counts.tolist()):
            pixels[i] = pixels.get(i, 0) + n
        panels = (rgb, semantic_overlay(rgb, semantic, palette),
                  instance_overlay(rgb, instances, np.random.default_rng([seed, r])))
        label = metadata.class_names[row["label"]] if 0 <= row["label"] < len(metadata.class_names) else row["label"]
        painted = len(np.unique(instances[instances > 0]))  # ids in the map: painted objects, not every mask
        titles = (f"{row['image_id']} ({label})", f"{len(ids)} semantic classes",
                  f"{painted} painted object{'s' if painted != 1 else ''}")
        for ax, panel, title in zip(axes[r], panels, titles):
            ax.imshow(panel, interpolation="nearest")
            ax.set_title(title, fontsize=9)
            ax.set_axis_off()
    top = sorted(pixels, key=lambda i: -pixels[i])[:max_legend]
    handles = [Patch(color=palette[i] / 255, label=names.get(i, str(i))) for i in top]
    if handles:
        fig.legend(handles=handles, loc="outside lower center", ncols=min(len(handles), 6), fontsize=9,
                   title="semantic classes covering most pixels in these images")
    return _png(fig)


def bar_png(labels: Sequence[str], counts: Sequence[float], title: str, xlabel: str, ylabel: str) -> bytes:
    fig = Figure(figsize=(6, 3.2), layout="constrained")
    ax = fig.subplots()
    ax.bar(range(len(counts)), counts, color="#4c72b0")
    ax.set_xticks(range(len(labels)), labels, rotation=45 if len(labels) > 6 else 0, ha="right"
                  if len(labels) > 6 else "center", fontsize=8)
    ax.set(title=title, xlabel=xlabel, ylabel=ylabel)
    return _png(fig)


def classes_png(shares: Sequence[ClassShare], title: str) -> bytes:
    """Horizontal bars of each class's pixel share, the largest on top."""
    fig = Figure(figsize=(6, 0.28 * len(shares) + 1.2), layout="constrained")
    ax = fig.subplots()
    ax.barh(range(len(shares)), [100 * s.pixel_share for s in shares], color="#55a868")
    ax.set_yticks(range(len(shares)), [s.name for s in shares], fontsize=8)
    ax.invert_yaxis()
    ax.set(title=title, xlabel="% of labeled pixels")
    return _png(fig)


def coverage_png(stats: layout.ShardStats) -> bytes:
    """Painted objects and instance regions per image side by side, and the largest mask's level."""
    fig = Figure(figsize=(12, 3.4), layout="constrained")
    counts, levels = fig.subplots(1, 2, width_ratios=(3, 1))
    labels, x = bin_labels(coverage.COUNT_EDGES), np.arange(len(coverage.COUNT_EDGES) - 1)
    counts.bar(x - 0.2, stats.painted_per_image, 0.4, label="painted objects", color="#4c72b0")
    counts.bar(x + 0.2, stats.regions_per_image, 0.4, label=f"instance regions ({coverage.IMG_SIZE} px, patch "
               f"{coverage.PATCH_SIZE})", color="#dd8452")
    counts.axvspan(-0.5, coverage.MIN_REGIONS - 0.5, color="#c44e52", alpha=0.08,
                   label=f"under {coverage.MIN_REGIONS} regions: masked randomly")
    counts.set_xticks(x, labels, fontsize=8)
    counts.set(title="What instance-guided masking will see, per image", xlabel="count per image", ylabel="images")
    counts.legend(fontsize=8)
    shown = [level for level in coverage.LARGEST_LEVELS if stats.largest_mask.get(level)]
    levels.bar(range(len(shown)), [stats.largest_mask[level] for level in shown], color="#55a868")
    levels.set_xticks(range(len(shown)), shown, fontsize=8)
    levels.set(title="Level of the largest mask", ylabel="images")
    return _png(fig)


def statistics_pngs(stats: layout.ShardStats, shares: Sequence[ClassShare], top: int = 20) -> dict[str, bytes]:
    """Asset file name -> PNG of each distribution in the summed shard statistics."""
    return {
        **({"masking_coverage.png": coverage_png(stats)} if stats.coverage_measured else {}),
        "instances_per_image.png": bar_png(bin_labels(layout.INSTANCE_COUNT_EDGES), stats.instances_per_image,
                                           "Instances per image", "instances", "images"),
        "coverage.png": bar_png(bin_labels(layout.FRACTION_EDGES, percent=True), stats.coverage,
                                "Share of each image under some instance mask", "pixels covered", "images"),
        "purity.png": bar_png(bin_labels(layout.FRACTION_EDGES, percent=True), stats.purity,
                              "Instance purity (share of its majority semantic class)", "purity", "instances"),
        "semantic_classes.png": classes_png(shares[:top], f"Top {min(top, len(shares))} semantic classes"),
    }

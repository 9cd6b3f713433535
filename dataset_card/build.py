"""Build the full dataset card of a labeled output: `OUTPUT/README.md` plus its pictures in `OUTPUT/assets/`.

    from dataset_card.build import build_card
    build_card("OUTPUT")  # also run by the labeling CLI at the end of a run

Statistics come from the per-shard statistics; only the gallery's few sampled rows are decoded.
Works on local paths and anything `pyarrow.fs` understands (s3://, gs://).
"""

from __future__ import annotations

import posixpath
from dataclasses import dataclass

from dataset_card import card, gallery, layout, sections, shards
from dataset_card.summary import class_shares, read_summary

ASSETS_DIR = "assets"


@dataclass(frozen=True)
class BuildConfig:
    card: card.CardConfig = card.CardConfig()
    gallery_size: int = 6  # rows in the gallery
    seed: int = 0  # which rows the gallery shows
    top_classes: int = 20  # semantic classes in the table and the plot
    dataset: str = "DATASET"  # the name the usage snippets load (a Hub repo id or a path)


def build_card(output: str, cfg: BuildConfig = BuildConfig()) -> str:
    """Write `output/README.md` and `output/assets/*.png`; return the README's path.

    Raises `summary.OutputError` or `schema.SchemaError` (one sentence each) when `output` is not
    a labeled folder of this schema version.
    """
    summary = read_summary(output)
    fs, root = shards.filesystem(output)
    shares = class_shares(summary.stats, summary.metadata)
    pictures: dict[str, bytes] = {}
    if summary.rows and cfg.gallery_size > 0:
        samples = gallery.sample_rows(output, summary.data_files, summary.rows_per_file, cfg.gallery_size, cfg.seed)
        pictures["gallery.png"] = gallery.gallery_png(samples, summary.metadata, seed=cfg.seed)
    if summary.stats.rows:
        pictures.update(gallery.statistics_pngs(summary.stats, shares, cfg.top_classes))
    for name, png in pictures.items():
        shards.write_bytes(fs, posixpath.join(root, ASSETS_DIR, name), png)
    assets = {name: f"{ASSETS_DIR}/{name}" for name in pictures}
    data = card.full_card_data(summary.metadata, summary.error_rows > 0, summary.rows, cfg.card,
                               summary.reference_columns)
    text = card.full_card(data, sections.body(summary, cfg.card, shares, assets, cfg.dataset))
    path = posixpath.join(root, layout.CARD_FILE)
    shards.write_bytes(fs, path, str(text).encode())
    return path if "://" not in output else posixpath.join(output, layout.CARD_FILE)

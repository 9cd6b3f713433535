"""Build the full dataset card of a labeled output: `OUTPUT/README.md` plus its pictures in `OUTPUT/assets/`.

    from dataset_card.card.build import build_card
    build_card("OUTPUT")  # also run by the labeling CLI at the end of a run

Statistics come from the per-shard statistics; only the gallery's few sampled rows are decoded.
Works on local paths and anything `pyarrow.fs` understands (s3://, gs://).
"""

from __future__ import annotations

import json
import posixpath
from dataclasses import dataclass, replace

from dataset_card.card import gallery, readme, sections, source
from dataset_card.card.run_summary import class_shares, read_summary
from dataset_card.contract import layout
from dataset_card.contract.output_folder import OutputError, OutputFolder

ASSETS_DIR = "assets"


@dataclass(frozen=True)
class BuildConfig:
    options: source.CardOptions = source.CardOptions()  # what the user tells (kept in OUTPUT/card.json)
    gallery_size: int = 6  # rows in the gallery
    seed: int = 0  # which rows the gallery shows
    top_classes: int = 20  # semantic classes in the table and the plot
    dataset: str = "DATASET"  # the name the usage snippets load (a Hub repo id or a path)


def card_options(folder: OutputFolder, told: source.CardOptions) -> source.CardOptions:
    """`told` over what `OUTPUT/card.json` recorded; records the result when `told` adds to it."""
    recorded = folder.read_json(layout.CARD_OPTIONS_FILE) or {}
    if not isinstance(recorded, dict):
        raise OutputError(f"{folder.path(layout.CARD_OPTIONS_FILE)} is not a JSON object; delete it and pass "
                          "--pretty-name / --license / --source-dataset again")
    options = told.over(source.CardOptions.from_dict(recorded))
    if options.told() != recorded:
        folder.write_bytes(layout.CARD_OPTIONS_FILE, json.dumps(options.told(), indent=2).encode())
    return options


def build_card(output: str | OutputFolder, cfg: BuildConfig = BuildConfig()) -> str:
    """Write `output/README.md` and `output/assets/*.png`; return the README's path.

    Raises `OutputError` or `schema.SchemaError` (one sentence each) when `output` is not a
    labeled folder of this schema version, `shards.OutputWriteError` when a file cannot be written.
    """
    folder = OutputFolder.open(output)
    summary = read_summary(folder)
    options = card_options(folder, cfg.options)
    config = source.card_config(summary.metadata.class_names, options)
    if sections.tiny_random(summary) and options.pretty_name is None:  # the Hub shows the name first
        config = replace(config, pretty_name=f"{config.pretty_name} [tiny-random models: meaningless labels]")
    shares = class_shares(summary.stats, summary.metadata)
    pictures: dict[str, bytes] = {}
    if summary.rows and cfg.gallery_size > 0:
        samples = gallery.sample_rows(folder, summary.data_files, summary.rows_per_file, cfg.gallery_size, cfg.seed)
        pictures["gallery.png"] = gallery.gallery_png(samples, summary.metadata, seed=cfg.seed)
    if summary.stats.rows:
        pictures.update(gallery.statistics_pngs(summary.stats, shares, cfg.top_classes))
    for name, png in pictures.items():
        folder.write_bytes(posixpath.join(ASSETS_DIR, name), png)
    assets = {name: f"{ASSETS_DIR}/{name}" for name in pictures}
    data = readme.full_card_data(summary.metadata, summary.error_rows > 0, summary.rows, config,
                               summary.reference_columns, summary.image_storage == "inline")
    text = readme.full_card(data, sections.body(summary, config, shares, assets, cfg.dataset))
    folder.write_bytes(layout.CARD_FILE, str(text).encode())
    return folder.path(layout.CARD_FILE) if "://" not in folder.uri else posixpath.join(folder.uri, layout.CARD_FILE)

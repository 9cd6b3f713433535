"""The dataset card (`OUTPUT/README.md`): YAML metadata that `datasets` and `huggingface_hub` read.

`card_data` is the YAML header every output gets (the minimal card at the start of a run has
nothing else); `full_card` adds the body that `dataset_card.card.build` writes from the run's files.
"""

from __future__ import annotations

import datasets
from huggingface_hub import DatasetCard, DatasetCardData

from dataset_card.card.source import CardConfig
from dataset_card.contract import layout
from dataset_card.contract.output_folder import OutputFolder
from dataset_card.contract.schema import build_features

# The Hub's size buckets (also datasets/utils/resources/size_categories.json).
_SIZE_CATEGORIES = ("n<1K", "1K<n<10K", "10K<n<100K", "100K<n<1M", "1M<n<10M", "10M<n<100M",
                    "100M<n<1B", "1B<n<10B", "10B<n<100B", "100B<n<1T")


def size_category(num_rows: int) -> str:
    """The Hub's `size_categories` bucket of a row count: 999 -> "n<1K", 1_281_167 -> "1M<n<10M"."""
    for i, category in enumerate(_SIZE_CATEGORIES):
        if num_rows < 1000 * 10**i:
            return category
    return "n>1T"


def errors_features(class_names) -> datasets.Features:
    """The errors table's columns as `datasets` features (`label` typed by the dataset's classes)."""
    features = datasets.Features.from_arrow_schema(layout.ERRORS_SCHEMA)
    features["label"] = datasets.ClassLabel(names=list(class_names))
    return features


def card_data(metadata: layout.DatasetMetadata, has_errors: bool, image_reference: bool = False,
              image_bytes: bool = True, **extra) -> DatasetCardData:
    """YAML header: the train split, the errors table as a second config (only when there are
    errors: `datasets` refuses a split with no rows), and the typed features of each.
    `image_reference`: the data files carry `schema.REFERENCE_COLUMNS` (the labeler writes them);
    `image_bytes=False`: a labels-only release, whose `image` is declared as its data files declare
    it (a plain struct: `load_dataset` reads each path without opening the file)."""
    features = build_features(metadata.class_names, metadata.semantic_class_names, image_reference, image_bytes)
    info = [{"config_name": "default", "features": features._to_yaml_list()}]
    configs = [{"config_name": "default", "data_files": [{"split": "train", "path": layout.DATA_GLOB}]}]
    if has_errors:
        configs.append({"config_name": "errors", "data_files": [{"split": "train", "path": layout.ERRORS_GLOB}]})
        info.append({"config_name": "errors", "features": errors_features(metadata.class_names)._to_yaml_list()})
    return DatasetCardData(
        configs=configs,
        dataset_info=info if has_errors else info[0],
        annotations_creators=["machine-generated"],
        **extra,
    )


def full_card_data(metadata: layout.DatasetMetadata, has_errors: bool, num_rows: int,
                   config: CardConfig, image_reference: bool = False, image_bytes: bool = True) -> DatasetCardData:
    """`card_data` plus the Hub metadata a reader filters by: name, licence, tasks, size, source."""
    return card_data(
        metadata,
        has_errors,
        image_reference,
        image_bytes,
        pretty_name=config.pretty_name,
        license=config.license,
        license_name=config.license_name if config.license == "other" else None,
        license_link=config.license_link if config.license == "other" else None,
        task_categories=list(config.task_categories),
        task_ids=list(config.task_ids),
        size_categories=[size_category(num_rows)],
        source_datasets=list(config.source_datasets) or None,
        tags=list(config.tags),
    )


def full_card(data: DatasetCardData, body: str) -> DatasetCard:
    return DatasetCard(f"---\n{data.to_yaml()}\n---\n\n{body.strip()}\n")


def minimal_card(metadata: layout.DatasetMetadata, has_errors: bool = False, body: str = "",
                 image_reference: bool = False, image_bytes: bool = True) -> DatasetCard:
    data = card_data(metadata, has_errors, image_reference, image_bytes)
    return DatasetCard(f"---\n{data.to_yaml()}\n---\n\n{body or '# Multi-granular labeled images'}\n")


def write_minimal_card(folder: OutputFolder, metadata: layout.DatasetMetadata, has_errors: bool = False,
                       image_reference: bool = False, image_bytes: bool = True) -> str:
    card = minimal_card(metadata, has_errors, image_reference=image_reference, image_bytes=image_bytes)
    folder.write_bytes(layout.CARD_FILE, str(card).encode())
    return folder.path(layout.CARD_FILE)

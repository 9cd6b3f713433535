"""The dataset card (`OUTPUT/README.md`): YAML metadata that `datasets` and `huggingface_hub` read.

This is the minimal card every output gets; the full card with statistics and a gallery is built
on top of `card_data`.
"""

from __future__ import annotations

import posixpath

from huggingface_hub import DatasetCard, DatasetCardData

from dataset_card import layout
from dataset_card.schema import build_features


def card_data(metadata: layout.DatasetMetadata, has_errors: bool, **extra) -> DatasetCardData:
    """YAML header: the train split, the errors table as a second config (only when there are
    errors: `datasets` refuses a split with no rows), and the typed features."""
    features = build_features(metadata.class_names, metadata.semantic_class_names)
    info = {"config_name": "default", "features": features._to_yaml_list()}
    configs = [{"config_name": "default", "data_files": [{"split": "train", "path": layout.DATA_GLOB}]}]
    if has_errors:
        configs.append({"config_name": "errors", "data_files": [{"split": "train", "path": layout.ERRORS_GLOB}]})
    return DatasetCardData(
        configs=configs,
        dataset_info=info,
        annotations_creators=["machine-generated"],
        **extra,
    )


def minimal_card(metadata: layout.DatasetMetadata, has_errors: bool = False, body: str = "") -> DatasetCard:
    data = card_data(metadata, has_errors)
    return DatasetCard(f"---\n{data.to_yaml()}\n---\n\n{body or '# Multi-granular labeled images'}\n")


def write_minimal_card(root: str, metadata: layout.DatasetMetadata, has_errors: bool = False) -> str:
    path = posixpath.join(root, layout.CARD_FILE)
    minimal_card(metadata, has_errors).save(path)
    return path

"""What the card says of the images: their dataset's name, licence and source (`CardConfig`).

The run's files cannot say it, so the card claims nothing by default (licence `unknown`, no
source dataset), says ImageNet-1K's name, terms and citation when the image classes are its 1000
synsets (or when told the source is ImageNet-1K), and takes what the user tells it
(`CardOptions`: `--pretty-name`, `--license`, `--source-dataset`, kept in `OUTPUT/card.json`).
Light on imports: the labeling command builds its flags from here.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace

# sha256 of ImageNet-1K's 1000 WordNet synsets, sorted and joined by newlines (`n01440764` ...
# `n15075141`): the class names of an ImageFolder of its train or val split (timm's
# `imagenet_synsets.txt`; a test checks this digest against it).
IMAGENET_1K_CLASSES_SHA256 = "385e0240499426c022b773be1ae4da780f057b89c9694c7f47199f62746b6edd"
IMAGENET_1K_SOURCE = "extended|imagenet-1k"
IMAGENET_TERMS = "imagenet-terms-of-access"


@dataclass(frozen=True)
class CardConfig:
    """What the run's files cannot say: the dataset's name and the terms its images are under.

    The defaults claim nothing: no source dataset and licence `unknown`. `imagenet_1k()` is what
    the card says of ImageNet-1K's images; `card_config` picks it when the classes are
    ImageNet-1K's 1000 synsets or when told the source is ImageNet-1K.
    """

    pretty_name: str = "Multi-granular pseudo-labels (SAM instances + semantic masks)"
    license: str = "unknown"  # a Hub licence id; "unknown": nobody said
    license_name: str | None = None  # with license "other"
    license_link: str | None = None
    source_datasets: tuple[str, ...] = ()
    task_categories: tuple[str, ...] = ("image-segmentation", "image-classification")
    task_ids: tuple[str, ...] = ("instance-segmentation", "semantic-segmentation")
    tags: tuple[str, ...] = ("pseudo-labels", "segment-anything", "instance-masks", "semantic-masks", "c2fmae")


def imagenet_1k() -> CardConfig:
    """ImageNet-1K's images: not under an open licence (hence "other", with its terms of access)."""
    return CardConfig(pretty_name="ImageNet-1K multi-granular pseudo-labels (SAM instances + semantic masks)",
                      license="other", license_name=IMAGENET_TERMS, license_link="https://image-net.org/download.php",
                      source_datasets=(IMAGENET_1K_SOURCE,))


def is_imagenet_1k(class_names: Sequence[str]) -> bool:
    """Whether the image classes are exactly ImageNet-1K's 1000 synsets (an ImageFolder of its train
    or val split)."""
    return (len(class_names) == 1000
            and hashlib.sha256("\n".join(sorted(class_names)).encode()).hexdigest() == IMAGENET_1K_CLASSES_SHA256)


@dataclass(frozen=True)
class CardOptions:
    """What a user told about the images (`--pretty-name`, `--license`, `--source-dataset`; None:
    not told). Kept in `OUTPUT/card.json`, so a later build (a resumed run, `repaint`, `build`
    without flags) says the same."""

    pretty_name: str | None = None
    license: str | None = None
    source_datasets: tuple[str, ...] | None = None

    def told(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items() if v is not None}

    def over(self, earlier: CardOptions) -> CardOptions:
        """These options, with what `earlier` told where these say nothing."""
        return CardOptions(**{**earlier.told(), **self.told()})

    @staticmethod
    def add_arguments(group) -> None:
        """--pretty-name, --license, --source-dataset (of `python -m dataset_card build` and the labeling command)."""
        group.add_argument("--pretty-name", help="the dataset's display name (default: ImageNet-1K's when the "
                                                 "classes are its 1000 synsets, else a name that claims no dataset)")
        group.add_argument("--license", help="a Hub licence id of the images and labels, e.g. cc-by-4.0 (default: "
                                             "ImageNet's terms of access for ImageNet-1K, else unknown)")
        group.add_argument("--source-dataset", action="append",
                           help="where the images come from, in the Hub's form (extended|imagenet-1k, a repo id), "
                                "repeatable; extended|imagenet-1k also gives ImageNet's name, terms and citation "
                                "(default: extended|imagenet-1k when the classes are its 1000 synsets, else none)")

    @classmethod
    def from_args(cls, args) -> CardOptions:
        sources = args.source_dataset
        return cls(pretty_name=args.pretty_name, license=args.license,
                   source_datasets=tuple(sources) if sources is not None else None)

    @classmethod
    def from_dict(cls, values: dict) -> CardOptions:
        sources = values.get("source_datasets")
        return cls(pretty_name=values.get("pretty_name"), license=values.get("license"),
                   source_datasets=tuple(sources) if sources is not None else None)


def names_imagenet_1k(source_datasets: Sequence[str]) -> bool:
    """Whether a source names ImageNet-1K: `extended|imagenet-1k`, `imagenet-1k`, `ILSVRC/imagenet-1k`."""
    return any(s.split("|")[-1].split("/")[-1].lower() == "imagenet-1k" for s in source_datasets)


def card_config(class_names: Sequence[str], options: CardOptions = CardOptions()) -> CardConfig:
    """The card's name, licence and source: ImageNet-1K's when the told sources name it or, when no
    source was told, the classes are its 1000 synsets; else nothing claimed. What the user told
    replaces either."""
    told = options.source_datasets
    imagenet = names_imagenet_1k(told) if told is not None else is_imagenet_1k(class_names)
    config = imagenet_1k() if imagenet else CardConfig()
    if options.license is not None and options.license != config.license:
        config = replace(config, license=options.license, license_name=None, license_link=None)
    if options.pretty_name is not None:
        config = replace(config, pretty_name=options.pretty_name)
    if told is not None:
        config = replace(config, source_datasets=tuple(told))
    return config

"""The card's body (`body`): its sections in reading order, and those that frame it: the overview
at the top, the licence and the citation at the end. The sections in between have modules of their
own: `provenance` (how the labels were made), `data_format` (schema and usage), `statistics`
(the figures and label quality). Every section is a pure function of a `RunSummary` (no file access).

`assets` maps a picture's file name to its path relative to the card (absent pictures are
skipped), so the same text renders on the Hub and in a local Markdown viewer.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from dataset_card.card.data_format import schema, usage
from dataset_card.card.markdown import picture
from dataset_card.card.provenance import production
from dataset_card.card.run_summary import ClassShare, RunSummary
from dataset_card.card.source import IMAGENET_TERMS, CardConfig, names_imagenet_1k
from dataset_card.card.statistics import quality, statistics


def model_names(summary: RunSummary) -> tuple[str, str]:
    """(instance model, semantic model) as Markdown: the recorded name in backticks, or "an unrecorded model"."""
    models = summary.manifest.get("models") or {}
    instance = (models.get("instance") or {}).get("name")
    semantic = (models.get("semantic") or {}).get("name") or summary.metadata.semantic_source
    return tuple(f"`{name}`" if name else "an unrecorded model" for name in (instance, semantic))


TINY_RANDOM = (
    "> **These labels are meaningless.** They were made by `--models tiny-random`: small, randomly initialised "
    "twins of the models, for offline smoke runs and tests. Do not train on them or publish them; label with "
    "`--models default` for real labels.\n\n")
UNTOLD = (
    "This card was not told where the images come from or under which terms they may be used: name them with "
    "`python -m dataset_card build OUTPUT --pretty-name NAME --license ID --source-dataset SOURCE` (or the same "
    "flags of the labeling command).")


def tiny_random(summary: RunSummary) -> bool:
    """Whether the labels come from `--models tiny-random` (the manifest's arguments or model names say so)."""
    models = summary.manifest.get("models") or {}
    return ((summary.manifest.get("arguments") or {}).get("models") == "tiny-random"
            or any("tiny-random" in str((m or {}).get("name", "")) for m in models.values()))


def overview(summary: RunSummary, config: CardConfig, assets: Mapping[str, str]) -> str:
    md, stats = summary.metadata, summary.stats
    instance, semantic = model_names(summary)
    things = sum(c.isthing for c in md.semantic_classes)
    per_image = f", {stats.instances / stats.rows:.1f} per image" if stats.rows else ""
    failed = (f" {summary.error_rows:,} input{'s' if summary.error_rows > 1 else ''} could not be labeled; "
              "the `errors` config lists each with its reason."
              if summary.error_rows else " Every input was labeled.")
    return (
        f"# {config.pretty_name}\n\n"
        + (TINY_RANDOM if tiny_random(summary) else "")
        + f"{summary.rows:,} images with machine-generated labels at three granularities: the image-level class "
        f"({len(md.class_names):,} classes), a semantic segmentation map over {md.num_semantic_classes} classes "
        f"({things} things, {md.num_semantic_classes - things} stuff), and every automatic instance mask "
        f"({stats.instances:,} in all{per_image}) as COCO RLE, each marked object, part, stuff or dropped"
        f"{' (or class-agnostic object)' if md.painting.salience else ''}, with the "
        f"objects painted into an instance id map ({painting_phrase(md.painting)}). "
        f"Instances come from {instance}, semantic classes from {semantic}, aligned per pixel; "
        f"no person checked them.{failed}\n\n"
        "They are the multi-granular inputs (semantic -> instance -> RGB) that C2FMAE pretraining reads."
        + ("" if config.source_datasets or config.license != "unknown" else f" {UNTOLD}")
        + picture(assets, "gallery.png", "Sample images with their semantic and instance labels")
        + ("\n\n*A fixed random sample: the image, its semantic classes, its painted objects (the ids in "
           "`instance_mask`, random colours, white outlines). The count over each instance panel is of those "
           "objects; the statistics below count every kept mask (objects, parts, stuff and dropped).*"
           if "gallery.png" in assets else "")
    )


def painting_phrase(rule) -> str:
    if rule.paint != "objects":
        return "every mask, smaller ones on top"
    return "each object clipped to its semantic class region" + (
        ", and whole, salient masks with no thing class as class-agnostic objects" if rule.salience else "")


def licence(summary: RunSummary, config: CardConfig) -> str:
    instance, semantic = model_names(summary)
    if config.license == "other" and config.license_name == IMAGENET_TERMS:
        images = ("The images are ImageNet's and remain under the [ImageNet terms of access]"
                  f"({config.license_link}): non-commercial research and educational use only; whoever downloads "
                  "them agrees to those terms. The labels are derived from the images and are shared under the same "
                  "terms.")
    elif config.license == "unknown":
        images = ("Licence: `unknown`. This card was not told the images' terms, and the labels are derived from the "
                  "images: check those terms before you share or use them, then name them with `python -m "
                  "dataset_card build OUTPUT --license ID` (a Hub licence id).")
    else:
        name = config.license_name if config.license == "other" and config.license_name else config.license
        images = f"Licence: `{name}`" + (f" ({config.license_link})." if config.license_link else ".")
    hub_id = semantic.strip("`")
    semantic_link = (f"[its model card](https://huggingface.co/{hub_id})" if hub_id.count("/") == 1
                     and " " not in hub_id and not hub_id.startswith(("/", ".")) else "its model card")
    return (
        f"## Licence\n\n{images}\n\nThe labeling models carry their own licences: Segment Anything (the "
        f"instance model, {instance}) is Apache-2.0, code and weights; for the semantic model, {semantic}, "
        f"see {semantic_link}. Machine-generated labels have errors: check the statistics and the "
        "label quality above before relying on them."
    )


BIBTEX = {
    "c2fmae": """@article{xiang2026c2fmae,
  title   = {From Semantics to Pixels: Coarse-to-Fine Masked Autoencoders for Hierarchical Visual Understanding},
  author  = {Xiang and Wu and Yu and Gao and Yang and Chen},
  journal = {arXiv preprint arXiv:2603.09955},
  year    = {2026}
}""",
    "sam": """@inproceedings{kirillov2023segment,
  title     = {Segment Anything},
  author    = {Kirillov, Alexander and Mintun, Eric and Ravi, Nikhila and Mao, Hanzi and Rolland, Chloe and
               Gustafson, Laura and Xiao, Tete and Whitehead, Spencer and Berg, Alexander C. and Lo, Wan-Yen and
               Doll{\\'a}r, Piotr and Girshick, Ross},
  booktitle = {ICCV},
  year      = {2023}
}""",
    "mask2former": """@inproceedings{cheng2022masked,
  title     = {Masked-attention Mask Transformer for Universal Image Segmentation},
  author    = {Cheng, Bowen and Misra, Ishan and Schwing, Alexander G. and Kirillov, Alexander and Girdhar, Rohit},
  booktitle = {CVPR},
  year      = {2022}
}""",
    "segformer": """@inproceedings{xie2021segformer,
  title     = {SegFormer: Simple and Efficient Design for Semantic Segmentation with Transformers},
  author    = {Xie, Enze and Wang, Wenhai and Yu, Zhiding and Anandkumar, Anima and Alvarez, Jose M. and Luo, Ping},
  booktitle = {NeurIPS},
  year      = {2021}
}""",
    "coco": """@inproceedings{lin2014microsoft,
  title     = {Microsoft COCO: Common Objects in Context},
  author    = {Lin, Tsung-Yi and Maire, Michael and Belongie, Serge and Hays, James and Perona, Pietro and
               Ramanan, Deva and Doll{\\'a}r, Piotr and Zitnick, C. Lawrence},
  booktitle = {ECCV},
  year      = {2014}
}""",
    "imagenet": """@article{russakovsky2015imagenet,
  title   = {ImageNet Large Scale Visual Recognition Challenge},
  author  = {Russakovsky, Olga and Deng, Jia and Su, Hao and Krause, Jonathan and Satheesh, Sanjeev and Ma, Sean and
             Huang, Zhiheng and Karpathy, Andrej and Khosla, Aditya and Bernstein, Michael and Berg, Alexander C. and
             Fei-Fei, Li},
  journal = {International Journal of Computer Vision},
  volume  = {115},
  number  = {3},
  pages   = {211--252},
  year    = {2015}
}""",
}


def citation(summary: RunSummary, config: CardConfig) -> str:
    """BibTeX for C2FMAE, SAM, the semantic model (when we know its paper) and the image source."""
    _, semantic = model_names(summary)
    keys = ["c2fmae", "sam"]
    keys += [k for k in ("mask2former", "segformer", "coco") if k in semantic.lower()]
    imagenet = names_imagenet_1k(config.source_datasets)
    keys += ["imagenet"] if imagenet else []
    unknown = ("" if any(k in semantic.lower() for k in ("mask2former", "segformer"))
               else f"\n\nPlease also cite the semantic model, {semantic}, as its authors ask.")
    images = "" if imagenet else "\n\nCite the images as their source asks."
    return ("## Citation\n\nIf you use these labels, please cite the method they were made for, the models that "
            "made them and the images:\n\n```bibtex\n" + "\n\n".join(BIBTEX[k] for k in keys) + "\n```"
            + unknown + images)


def body(summary: RunSummary, config: CardConfig, shares: Sequence[ClassShare], assets: Mapping[str, str],
         dataset: str) -> str:
    """The whole card below the YAML header."""
    return "\n\n".join([
        overview(summary, config, assets), production(summary), schema(summary),
        statistics(summary, shares, assets), usage(summary, dataset), quality(summary),
        licence(summary, config), citation(summary, config),
    ])

"""The card's Schema and Usage sections: what a row holds (columns, instance fields, the semantic
taxonomy, the folder's files) and how to read it (`datasets`, the label maps, the RLEs)."""

from __future__ import annotations

import datasets

from dataset_card.card.markdown import table
from dataset_card.card.run_summary import RunSummary
from dataset_card.contract import layout
from dataset_card.contract.schema import COLUMNS, SCHEMA_VERSION, build_features, semantic_mask_dtype

COLUMN_DOCS = {
    "image_id": "stable id: the input's relative path without extension (`n01440764/n01440764_10026`)",
    "label": "image-level class; names are the sorted input class folder names (ImageNet: the 1000 synsets)",
    "image": "the original encoded file, never re-encoded; `path` holds the relative input path",
    "width": "width in pixels as decoded (EXIF orientation not applied, so the masks align with the stored pixels)",
    "height": "height in pixels, likewise",
    "semantic_mask": "`bytes`: a zstd-compressed `.npy` of the (H, W) map at the image's size (see Usage); pixel = semantic class id, {ignore} = no class",
    "instance_mask": "`bytes`: a zstd-compressed `.npy` of the (H, W) map at the image's size, uint8 (uint16 when an image has 256 or more instances); 0 = no instance, k = the instance with `id` k; what it shows follows from `instances` and `semantic_mask` by the painting rule (below)",
    "instances": "every kept automatic mask, fields below",
}
LABELS_ONLY = (
    "**Labels only.** The rows hold no image bytes (`image.bytes` is null): `image.path` is each image's path "
    "relative to the folder it was labeled from, `image_sha256` and `image_nbytes` its content hash and length. "
    "`load_dataset` hands `image` over as that `{bytes, path}` struct, without opening a file: join your own copy "
    "of the images by path; `python -m pretraining.train --images ROOT` does so and checks each file.\n\n")
INSTANCE_DOCS = {
    "id": "1..K, numbered by area, largest first (the painting order: later ids on top)",
    "rle": "`{size: [h, w], counts: str}`, COCO compressed RLE (pycocotools) of the full mask",
    "bbox": "`[x, y, w, h]` in pixels",
    "area": "pixels of the full mask",
    "visible_area": "its pixels in `instance_mask` (0 when the rule does not paint it)",
    "score": "the instance model's predicted IoU",
    "stability_score": "IoU of the mask thresholded at two offsets of the logits",
    "category_id": "majority semantic class under the mask",
    "category_purity": "that class's share of the mask's pixels",
    "level": "`object` (a thing, painted), `part` (inside a larger object of its class, or of the painted objects under `salient`), `stuff` (a stuff class: a region, not an object), `dropped` (a thing class under the rule's purity, or no class), or under rule `salient` `object_agnostic` (painted: a whole, salient mask with no thing class, an object the taxonomy does not cover; `category_id` is not its class)",
    "parent": "for a part, the `id` of its object; else 0",
}


def feature_type(feature) -> str:
    if isinstance(feature, datasets.ClassLabel):
        return f"ClassLabel ({feature.num_classes} classes)"
    if isinstance(feature, datasets.Image):
        return "Image"
    if isinstance(feature, datasets.Value):
        return feature.dtype
    if isinstance(feature, (list, datasets.List, datasets.Sequence)):
        return "list of struct"
    if isinstance(feature, dict):
        return "struct {" + ", ".join(feature) + "}"
    return type(feature).__name__


def schema(summary: RunSummary) -> str:
    md = summary.metadata
    features = build_features(md.class_names, md.semantic_class_names, image_bytes=summary.image_storage == "inline")
    docs = dict(COLUMN_DOCS, semantic_mask=COLUMN_DOCS["semantic_mask"].format(ignore=md.ignore_value))
    columns = table(["column", "type", "meaning"], [(f"`{c}`", feature_type(features[c]), docs[c]) for c in COLUMNS])
    instance_fields = table(["field", "meaning"], [(f"`{k}`", v) for k, v in INSTANCE_DOCS.items()])
    taxonomy = table(["id", "name", "kind"], [(c.id, c.name, "thing" if c.isthing else "stuff")
                                              for c in md.semantic_classes])
    files = table(["path", "content"], [
        (f"`{layout.DATA_GLOB}`", "the rows (config `default`)"),
        (f"`{layout.ERRORS_GLOB}`", "inputs that failed, with stage, reason and message (config `errors`)"),
        ("`stats/*.json`", "per-shard statistics this card is computed from"),
        (f"`{layout.METADATA_FILE}`", "schema version, class names, semantic taxonomy, ignore value, painting rule"),
        (f"`{layout.MANIFEST_FILE}`", "inputs, arguments, models, their hashes and hub revision, library versions, "
                                      "code version, repaints"),
        (f"`{layout.CARD_OPTIONS_FILE}`", "what this card was told: name, licence, source dataset (when told)"),
    ])
    return (
        f"## Schema (version {SCHEMA_VERSION})\n\n{columns}\n\nEach element of `instances`:\n\n{instance_fields}\n\n"
        f"`semantic_mask` is {semantic_mask_dtype(md.num_semantic_classes).replace('uint', '')}-bit. "
        f"Painting rule `{md.painting.name}`: {md.painting.description} (purity threshold "
        f"{md.painting.min_purity:g}, part containment {md.painting.containment:g}; `python -m dataset_card repaint` "
        "repaints the folder under another rule without the models).\n\n"
        + (LABELS_ONLY if summary.image_storage == "reference" else "")
        + f"<details><summary>Semantic taxonomy ({md.num_semantic_classes} classes, ignore value "
        f"{md.ignore_value})</summary>\n\n{taxonomy}\n\n</details>\n\nFiles:\n\n{files}"
    )


USAGE = '''## Usage

```python
import io

import numpy as np
import zstandard
from datasets import load_dataset
from pycocotools import mask as mask_utils


def label_map(column):  # a zstd-compressed .npy: (H, W) uint8 or uint16
    return np.load(io.BytesIO(zstandard.decompress(column["bytes"])))


DATASET = "{dataset}"  # a Hub repo id, or a local copy of this folder
ds = load_dataset(DATASET, split="train", streaming=True)
row = next(iter(ds))
image = row["image"]                              # {image}
semantic = label_map(row["semantic_mask"])        # (H, W) class ids, {ignore} = no class
instance_map = label_map(row["instance_mask"])    # (H, W) 0 = none, k = instances[k-1]
label = ds.features["label"].int2str(row["label"])

# Every mask is kept, with what it is: "object" (in the map), "part" (of object `parent`), "stuff", "dropped".
objects = [i for i in row["instances"] if i["level"] == "object"]
# Each instance's full mask (also the parts and regions the map does not show) from its RLE:
inst = row["instances"][0]
mask = mask_utils.decode({{"size": inst["rle"]["size"], "counts": inst["rle"]["counts"].encode()}})  # (H, W) uint8
assert mask.shape == (row["height"], row["width"])
```

The semantic taxonomy (names, thing or stuff) and the ignore value are in `metadata.json`:

```python
import json
import os

# On the Hub: huggingface_hub.hf_hub_download(DATASET, "metadata.json", repo_type="dataset")
with open(os.path.join(DATASET, "metadata.json")) as f:
    metadata = json.load(f)
names = {{c["id"]: c["name"] for c in metadata["semantic_classes"]}}
print(names[int(semantic.flat[0])] if semantic.flat[0] != metadata["ignore_value"] else "(no class)")
```
'''

USAGE_ERRORS = '''
The inputs that failed, with the stage and the reason:

```python
errors = load_dataset(DATASET, "errors", split="train")
print(errors[0]["image_id"], errors[0]["error_type"], errors[0]["message"])
```
'''


def usage(summary: RunSummary, dataset: str) -> str:
    image = ("PIL image, the original file" if summary.image_storage == "inline" else
             "labels only: {'bytes': None, 'path': ...}; join your copy by path")
    text = USAGE.format(dataset=dataset, ignore=summary.metadata.ignore_value, image=image)
    return text + (USAGE_ERRORS if summary.error_rows else "")

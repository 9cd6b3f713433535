"""The card's body, one Markdown section per function, from a `RunSummary` (pure: no file access).

`assets` maps a picture's file name to its path relative to the card (absent pictures are
skipped), so the same text renders on the Hub and in a local Markdown viewer.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence

import datasets

from dataset_card.card.run_summary import ClassShare, RunSummary, bin_labels
from dataset_card.card.source import IMAGENET_TERMS, CardConfig, names_imagenet_1k
from dataset_card.contract import coverage, invariants, layout
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


def table(header: Sequence[str], rows: Sequence[Sequence]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c).replace("|", "\\|") for c in row) + " |" for row in rows]
    return "\n".join(lines)


def percent(x: float) -> str:
    return f"{100 * x:.1f}%" if x >= 0.001 or x == 0 else f"{100 * x:.3f}%"


def duration(seconds: float) -> str:
    minutes, s = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min" if hours else f"{minutes} min {s:02d} s" if minutes else f"{seconds:.1f} s"


def _picture(assets: Mapping[str, str], name: str, alt: str) -> str:
    return f"\n\n![{alt}]({assets[name]})" if name in assets else ""


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
        + _picture(assets, "gallery.png", "Sample images with their semantic and instance labels")
        + ("\n\n*A fixed random sample: the image, its semantic classes, its painted objects (the ids in "
           "`instance_mask`, random colours, white outlines). The count over each instance panel is of those "
           "objects; the statistics below count every kept mask (objects, parts, stuff and dropped).*"
           if "gallery.png" in assets else "")
    )


def production(summary: RunSummary) -> str:
    manifest, run = summary.manifest, summary.run_stats
    models = manifest.get("models") or {}
    out = ["## How it was produced"]
    if models:
        out.append(table(["role", "model", "checkpoint", "revision", "sha256"],
                         [(role, f"`{m.get('name', '?')}`", f"`{m.get('checkpoint') or '-'}`",
                           f"`{m['revision']}`" if m.get("revision") else "-",
                           f"`{m['sha256']}`" if m.get("sha256") else "-") for role, m in models.items()]))
        params = [(role, f"`{k}`", json.dumps(v)) for role, m in models.items()
                  for k, v in sorted((m.get("params") or {}).items())]
        if params:
            out.append("Thresholds and settings:\n\n" + table(["model", "parameter", "value"], params))
    else:
        out.append(f"The manifest names no models (semantic source: `{summary.metadata.semantic_source or '?'}`).")
    facts = [("dataset schema version", summary.metadata.schema_version)]
    for key, name in (("labels_version", "labels version"), ("code_version", "code version"), ("created", "created"),
                      ("num_inputs", "inputs"),
                      ("num_shards", "shards"), ("shard_size", "images per shard"), ("inputs_hash", "inputs sha256")):
        if manifest.get(key) is not None:
            facts.append((name, f"`{manifest[key]}`" if key in ("code_version", "inputs_hash") else manifest[key]))
    sample = (manifest.get("execution") or {}).get("sample")
    if sample is not None and manifest.get("planned_inputs") is not None:  # a trial: `--sample N`
        facts.append(("sample", f"class-stratified, {manifest.get('num_inputs')} of {manifest['planned_inputs']:,} "
                                f"inputs (`--sample {sample}`, seed {(manifest.get('execution') or {}).get('sample_seed', 0)}"
                                "); the shards are planned for all of them"))
    if run.get("wall_time_s") is not None:
        facts.append(("wall time", duration(run["wall_time_s"])))
    if run.get("gpu_hours") is not None:
        facts.append(("GPU-hours in the models", f"{run['gpu_hours']:.2f}"))
    if run.get("billed_gpu_hours") is not None:  # the model actors' lifetimes: what the cluster bills
        facts.append(("GPU-hours billed", f"{run['billed_gpu_hours']:.2f}"))
    if run.get("images_per_s") is not None:
        facts.append(("throughput", f"{run['images_per_s']:.3g} images/s"))
    for stage, seconds in (run.get("stage_time_s") or {}).items():
        facts.append((f"time in stage `{stage}`", duration(seconds)))
    if not summary.environments:  # a folder from before footers named them: the manifest's record
        for name, version in (manifest.get("software") or {}).items():
            facts.append((f"`{name}`", version or "not installed"))
    for record in manifest.get("repaints") or []:
        facts.append(("repainted", f"{record.get('created', '?')}: rule `{(record.get('rule') or {}).get('name')}` "
                                   f"(from schema v{record.get('from_schema_version')})"))
    out.append(table(["", ""], facts))
    if summary.environments:
        out.append(environments_table(summary.environments))
    if manifest.get("arguments"):
        out.append("<details><summary>Labeling arguments</summary>\n\n```json\n"
                   + json.dumps(manifest["arguments"], indent=2, sort_keys=True) + "\n```\n\n</details>")
    return "\n\n".join(out)


def environments_table(environments: Sequence[tuple[dict, int]]) -> str:
    """The environments that made the labels (one column each, with the data files it made rows of)."""
    keys = sorted({k for env, _ in environments for k in env})

    def shown(value) -> str:
        return "-" if value is None else ("on" if value else "off") if isinstance(value, bool) else f"`{value}`"

    header = ["", *(f"{n} data file{'s' if n > 1 else ''}" for _, n in environments)]
    return ("The environments that made the labels, as each data file's footer records them (a resumed run may "
            "have labeled under newer libraries or on other GPUs):\n\n"
            + table(header, [(f"`{k}`", *(shown(env.get(k)) for env, _ in environments)) for k in keys]))


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


def _histogram(title: str, labels: Sequence[str], counts: Sequence[int], unit: str) -> str:
    return f"{table([title, *labels], [(unit, *(f'{c:,}' for c in counts))])}"


def statistics(summary: RunSummary, shares: Sequence[ClassShare], assets: Mapping[str, str], top: int = 20) -> str:
    stats = summary.stats
    inputs = summary.rows + summary.error_rows
    out = ["## Statistics",
           f"Computed from the per-shard statistics written during labeling ({summary.num_stats_files} of "
           f"{len(summary.data_files)} shards), without decoding a mask again."]
    out.append(table(["", "images", "share of inputs"], [
        ("labeled", f"{summary.rows:,}", percent(summary.rows / max(inputs, 1))),
        ("failed", f"{summary.error_rows:,}", percent(summary.error_rows / max(inputs, 1))),
    ]))
    reasons = summary.errors_by_type  # from the errors tables, like the "failed" count above
    if reasons:
        out.append("Failures by reason:\n\n" + table(["reason", "images"], [
            (f"`{k}`", f"{v:,}") for k, v in sorted(reasons.items(), key=lambda kv: -kv[1])]))
    if not stats.rows:
        return "\n\n".join(out)
    out.append(f"### Instances per image\n\n{stats.instances:,} instances, {stats.instances / stats.rows:.1f} per "
               "image on average: every mask kept in `instances`, whatever its level (objects, parts, stuff and "
               "dropped masks; the painted objects alone are counted under Objects and Regions below).\n\n"
               + _histogram("instances", bin_labels(layout.INSTANCE_COUNT_EDGES), stats.instances_per_image, "images")
               + _picture(assets, "instances_per_image.png", "Histogram of instances per image"))
    out.append("### Mask coverage\n\nShare of each image's pixels that `instance_mask` assigns to an instance "
               f"(under the painting rule `{summary.metadata.painting.name}`).\n\n"
               + _histogram("covered", bin_labels(layout.FRACTION_EDGES, True), stats.coverage, "images")
               + _picture(assets, "coverage.png", "Histogram of instance mask coverage"))
    rows = [(s.name, s.id, "-" if s.isthing is None else "thing" if s.isthing else "stuff",
             percent(s.pixel_share), percent(s.image_share)) for s in shares[:top]]
    out.append(f"### Semantic classes\n\n{len(shares)} of {summary.metadata.num_semantic_classes} classes occur; the "
               f"{len(rows)} covering most pixels:\n\n"
               + table(["class", "id", "kind", "pixels", "images containing it"], rows)
               + _picture(assets, "semantic_classes.png", "Pixel share of the top semantic classes"))
    out.append(objects_section(summary))
    out.append(coverage_section(summary, assets))
    pure = sum(stats.purity[-1:]) / max(sum(stats.purity), 1)
    out.append("### Instance purity\n\nThe share of an instance's pixels that belong to its majority semantic class "
               f"(`category_purity`): how well the two label sources agree. {percent(pure)} of instances are at "
               "least 90% pure.\n\n"
               + _histogram("purity", bin_labels(layout.FRACTION_EDGES, True), stats.purity, "instances")
               + _picture(assets, "purity.png", "Histogram of instance purity"))
    return "\n\n".join(out)


def painting_phrase(rule) -> str:
    if rule.paint != "objects":
        return "every mask, smaller ones on top"
    return "each object clipped to its semantic class region" + (
        ", and whole, salient masks with no thing class as class-agnostic objects" if rule.salience else "")


def coverage_section(summary: RunSummary, assets: Mapping[str, str]) -> str:
    """What instance-guided masking will see of each image (`dataset_card.contract.coverage`)."""
    stats = summary.stats
    head = "### Regions for instance-guided masking"
    if not stats.coverage_measured:
        return head + ("\n\nNot measured: these statistics were written before the labeler measured regions "
                       "(relabeling, or `python -m dataset_card repaint` under another rule, measures them).")
    images = stats.coverage_measured
    few = sum(stats.regions_per_image[:coverage.MIN_REGIONS]) / images
    labels = bin_labels(coverage.COUNT_EDGES)
    partial = (f" (measured on {images:,} of {stats.rows:,} images: the others were labeled before coverage was "
               "measured)") if images < stats.rows else ""
    levels = [(f"`{level}`", f"{stats.largest_mask.get(level, 0):,}", percent(stats.largest_mask.get(level, 0) / images))
              for level in coverage.LARGEST_LEVELS if stats.largest_mask.get(level)]
    return (
        f"{head}\n\nPer image{partial}: the painted objects (ids in `instance_mask`), and the instance regions at "
        f"the pretraining patch grid (the map resized whole to {coverage.IMG_SIZE} x {coverage.IMG_SIZE}, each "
        f"{coverage.PATCH_SIZE}-pixel patch taking its most frequent id; the regions are the distinct ids). "
        f"Instance-guided masking needs at least {coverage.MIN_REGIONS} regions and masks randomly otherwise: "
        f"**{percent(few)} of the images have fewer.** Training crops show part of an image, usually with fewer "
        "regions.\n\n"
        + table(["per image", *labels], [("painted objects", *(f"{c:,}" for c in stats.painted_per_image)),
                                         ("instance regions", *(f"{c:,}" for c in stats.regions_per_image))])
        + "\n\nWhat each image's largest mask (SAM's biggest kept segment) became: `stuff` or `dropped` means the "
          "image's main segment is no painted object (`object_agnostic`: painted without a class, rule "
          "`salient`).\n\n"
        + table(["largest mask", "images", "share"], levels)
        + _picture(assets, "masking_coverage.png", "Painted objects and instance regions per image")
    )


def objects_section(summary: RunSummary) -> str:
    """What the instances are (levels) and the alignment invariants' figures, from the shard statistics."""
    stats, rule = summary.stats, summary.metadata.painting
    out = ["### Objects, parts and alignment"]
    total = sum(stats.levels.values())
    if not total:
        return out[0] + ("\n\nThe shard statistics carry no levels (written before schema v2): `python -m "
                         "dataset_card repaint` recomputes them.")
    out.append(f"What each of the {total:,} instances is under the painting rule `{rule.name}`:\n\n"
               + table(["level", "instances", "share"], [(f"`{level}`", f"{n:,}", percent(n / total))
                                                          for level, n in stats.levels.items()]))
    if stats.painted:
        classed = stats.painted - stats.painted_agnostic  # class-agnostic objects have no class to agree with
        mean = stats.agreement_sum / classed if classed else float("nan")
        rows = [
            ("painted instances", f"{stats.painted:,} ({stats.painted / max(stats.rows, 1):.1f} per image)", ""),
            ("painted ids that are no thing-class instance", percent(stats.painted_not_thing / stats.painted), "0"),
            (f"painted instances under {invariants.MIN_AGREEMENT:.0%} on their class",
             percent(stats.painted_disagreeing / stats.painted), "0"),
            ("mean share of a painted instance's pixels on its class", percent(mean) if classed else "-",
             f"≥ {invariants.MIN_MEAN_AGREEMENT:.0%}"),
            (f"painted instances ≥ {invariants.NESTED_SHARE:.0%} inside a painted one of their class",
             percent(stats.painted_nested / stats.painted), f"≤ {invariants.MAX_NESTED:.0%}"),
            ("... inside a painted one of any class", percent(stats.painted_nested_any / stats.painted), "-"),
        ]
        if stats.painted_agnostic:  # rule "salient": objects outside the taxonomy, painted without a class
            rows.insert(1, ("... class-agnostic objects (`object_agnostic`: no thing class, "
                            "exempt from the class rows)",
                            f"{stats.painted_agnostic:,} ({percent(stats.painted_agnostic / stats.painted)})", ""))
        checked = "required (`python -m dataset_card validate` checks it)" if rule.paint == "objects" else \
            "required of the `objects` rule (not this one)"
        out.append("The alignment invariants, over every labeled image:\n\n" + table(["", "measured", checked], rows))
    return "\n\n".join(out)


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


def _flatten(values: Mapping, prefix: str = "") -> list[tuple[str, object]]:
    rows = []
    for key, value in values.items():
        if isinstance(value, Mapping):
            rows += _flatten(value, f"{prefix}{key}.")
        else:
            rows.append((f"{prefix}{key}", f"{value:.4g}" if isinstance(value, float) else value))
    return rows


def quality(summary: RunSummary) -> str:
    if not summary.quality:
        return ("## Label quality\n\nNot measured for this release yet: `python -m labeling.evaluate` compares "
                "the labels with human annotations and writes `quality.json`, which the next card build shows here.")
    return ("## Label quality\n\nAs measured by `python -m labeling.evaluate` (`quality.json`):\n\n"
            + table(["metric", "value"], [(f"`{k}`", v) for k, v in _flatten(summary.quality)]))


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

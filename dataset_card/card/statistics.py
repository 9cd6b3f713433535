"""The card's measured sections, from a `RunSummary`: Statistics (images, instances, mask coverage,
semantic classes; the levels and the alignment invariants' figures; the regions instance-guided
masking sees; purity), all from the per-shard statistics, and Label quality (`quality.json`)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from dataset_card.card.markdown import percent, picture, table
from dataset_card.card.run_summary import ClassShare, RunSummary, bin_labels
from dataset_card.contract import coverage, invariants, layout


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
               + picture(assets, "instances_per_image.png", "Histogram of instances per image"))
    out.append("### Mask coverage\n\nShare of each image's pixels that `instance_mask` assigns to an instance "
               f"(under the painting rule `{summary.metadata.painting.name}`).\n\n"
               + _histogram("covered", bin_labels(layout.FRACTION_EDGES, True), stats.coverage, "images")
               + picture(assets, "coverage.png", "Histogram of instance mask coverage"))
    rows = [(s.name, s.id, "-" if s.isthing is None else "thing" if s.isthing else "stuff",
             percent(s.pixel_share), percent(s.image_share)) for s in shares[:top]]
    out.append(f"### Semantic classes\n\n{len(shares)} of {summary.metadata.num_semantic_classes} classes occur; the "
               f"{len(rows)} covering most pixels:\n\n"
               + table(["class", "id", "kind", "pixels", "images containing it"], rows)
               + picture(assets, "semantic_classes.png", "Pixel share of the top semantic classes"))
    out.append(objects_section(summary))
    out.append(coverage_section(summary, assets))
    pure = sum(stats.purity[-1:]) / max(sum(stats.purity), 1)
    out.append("### Instance purity\n\nThe share of an instance's pixels that belong to its majority semantic class "
               f"(`category_purity`): how well the two label sources agree. {percent(pure)} of instances are at "
               "least 90% pure.\n\n"
               + _histogram("purity", bin_labels(layout.FRACTION_EDGES, True), stats.purity, "instances")
               + picture(assets, "purity.png", "Histogram of instance purity"))
    return "\n\n".join(out)


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
        + picture(assets, "masking_coverage.png", "Painted objects and instance regions per image")
    )


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

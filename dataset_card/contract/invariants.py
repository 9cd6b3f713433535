"""The alignment invariants of an object-level instance map: what `python -m dataset_card validate`
checks and the dataset card reports as figures (dataset schema v2).

For a rule that paints objects (`PaintingRule.paint == "objects"`):
1. every painted id is an `instances` entry whose `category_id` is a thing class, or one at level
   "object_agnostic" (rule "salient": an object the taxonomy has no class for, any `category_id`);
2. the semantic class under at least MIN_AGREEMENT (95%) of each painted class instance's pixels
   is its `category_id`, and MIN_MEAN_AGREEMENT (98%) on average (class-agnostic objects have no
   class to agree with: they are counted apart, `agnostic`);
3. at most MAX_NESTED (5%) of painted instances lie NESTED_SHARE (90%) or more inside the full
   mask of another painted instance *of the same class* (a part painted as if it were an object;
   the class-agnostic objects count as one class here: one nested in another is a part).
   The same share over instances of any class is reported beside it: an object of another class
   inside a larger mask (a tie on a person, a cup on a table) is a panoptic object in its own
   right, not a part, so it is not held against the map (docs/DESIGN.md).
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import pycocotools.mask as mask_utils

from dataset_card.contract import codecs
from dataset_card.contract.painting import AGNOSTIC, contains, id_counts

MIN_AGREEMENT = 0.95
MIN_MEAN_AGREEMENT = 0.98
NESTED_SHARE = 0.9
MAX_NESTED = 0.05


@dataclass
class MapFigures:
    """The invariants' raw figures of one image's map."""

    painted: int = 0  # instances with at least one pixel in the map
    not_thing: list[int] = field(default_factory=list)  # painted ids that are no thing-class instance
    agreement: dict[int, float] = field(default_factory=dict)  # painted id -> share of its pixels of its class
    nested: list[int] = field(default_factory=list)  # painted ids >= NESTED_SHARE inside a same-class painted one
    nested_any: list[int] = field(default_factory=list)  # the same, inside a painted one of any class
    agnostic: list[int] = field(default_factory=list)  # painted ids at level "object_agnostic" (no class)

    @property
    def disagreeing(self) -> list[int]:
        """Painted ids whose agreement is below MIN_AGREEMENT."""
        return [k for k, share in self.agreement.items() if share < MIN_AGREEMENT]


def _rle(rle: Mapping) -> dict:
    counts = rle["counts"]
    return {"size": [int(s) for s in rle["size"]], "counts": counts.encode("ascii") if isinstance(counts, str) else counts}


def map_figures(instances: Sequence[Mapping], semantic: np.ndarray, instance_map: np.ndarray,
                things: Collection[int], chunk_rows: int = 512) -> MapFigures:
    """The figures of one image: its `instances`, (H, W) semantic map and (H, W) instance map."""
    by_id = {int(inst["id"]): inst for inst in instances}
    top = max([int(instance_map.max(initial=0)), *by_id])
    counts = id_counts(instance_map, top)
    painted = [int(k) for k in np.flatnonzero(counts) if k > 0]
    out = MapFigures(painted=len(painted))
    out.agnostic = [k for k in painted if k in by_id and by_id[k].get("level") == AGNOSTIC]
    out.not_thing = [k for k in painted if k not in by_id
                     or (int(by_id[k]["category_id"]) not in things and k not in out.agnostic)]
    category = np.full(top + 1, -1, np.int64)  # id -> its class (-1: no instance; -2: class-agnostic)
    for k, inst in by_id.items():
        category[k] = -2 if inst.get("level") == AGNOSTIC else int(inst["category_id"])
    agree = np.zeros(top + 1, np.int64)
    for y in range(0, instance_map.shape[0], chunk_rows):
        ids = instance_map[y : y + chunk_rows].astype(np.int64)
        same = semantic[y : y + chunk_rows] == category[ids]
        agree += np.bincount(ids[same], minlength=top + 1)[: top + 1]
    out.agreement = {k: float(agree[k] / counts[k]) for k in painted if k not in out.agnostic}
    known = [k for k in painted if k in by_id]
    if len(known) > 1:
        h, w = instance_map.shape
        own = []
        for k in known:  # a painted region lies inside its full mask, so inside the mask's box
            y0, x0, y1, x1 = codecs.tight_box(by_id[k]["rle"])
            own.append(_rle(codecs.crop_rle(instance_map[y0:y1, x0:x1] == k, y0, x0, h, w)))
        full = [_rle(by_id[k]["rle"]) for k in known]
        inside = np.asarray(mask_utils.iou(own, full, [1] * len(full))).reshape(len(known), len(known))
        np.fill_diagonal(inside, 0.0)
        classes = np.array([category[k] for k in known])
        same_class = classes[:, None] == classes[None, :]
        areas = [int(mask_utils.area(rle)) for rle in own]
        nested = np.array([[contains(v, area, NESTED_SHARE) for v in row] for row, area in zip(inside, areas)])
        out.nested_any = [k for k, row in zip(known, nested) if row.any()]
        out.nested = [k for k, row in zip(known, nested & same_class) if row.any()]
    return out


@dataclass
class Figures:
    """The alignment invariants' figures over the rows checked (sums of `MapFigures`)."""

    rows: int = 0
    painted: int = 0
    not_thing: int = 0
    disagreeing: int = 0
    agreement_sum: float = 0.0
    nested: int = 0
    nested_any: int = 0
    agnostic: int = 0

    def add(self, figures: MapFigures) -> None:
        self.rows += 1
        self.painted += figures.painted
        self.not_thing += len(figures.not_thing)
        self.disagreeing += len(figures.disagreeing)
        self.agreement_sum += sum(figures.agreement.values())
        self.nested += len(figures.nested)
        self.nested_any += len(figures.nested_any)
        self.agnostic += len(figures.agnostic)

    def merge(self, other: Figures) -> None:
        for name in ("rows", "painted", "not_thing", "disagreeing", "agreement_sum", "nested", "nested_any",
                     "agnostic"):
            setattr(self, name, getattr(self, name) + getattr(other, name))

    @property
    def mean_agreement(self) -> float:
        """The mean agreement of the painted class instances (not the class-agnostic ones)."""
        classed = self.painted - self.agnostic
        return self.agreement_sum / classed if classed else float("nan")

    def share(self, count: int) -> float:
        return count / self.painted if self.painted else 0.0

    def __str__(self) -> str:
        if not self.painted:
            return f"no painted instance in the {self.rows:,} rows checked"
        mean = f"{self.mean_agreement:.2%}" if self.painted > self.agnostic else "- (no class instance)"
        return (f"{self.painted:,} painted instances in {self.rows:,} rows: {self.share(self.not_thing):.1%} not a "
                f"thing-class instance, {self.share(self.disagreeing):.1%} under {MIN_AGREEMENT:.0%} of "
                f"their class, mean agreement {mean}, {self.share(self.nested):.1%} nested "
                f">= {NESTED_SHARE:.0%} in a same-class painted instance "
                f"({self.share(self.nested_any):.1%} in one of any class)"
                + (f"; {self.agnostic:,} of them class-agnostic objects" if self.agnostic else ""))

    def problems(self, objects: bool) -> list[str]:
        """The folder-level invariants these figures break (checked for a rule that paints objects)."""
        if not objects or not self.painted:
            return []
        where, out = f"{self.rows:,} rows checked", []
        if self.painted > self.agnostic and self.mean_agreement < MIN_MEAN_AGREEMENT:
            out.append(f"painted instances lie on average {self.mean_agreement:.2%} on their class in the {where}, "
                       f"under the {MIN_MEAN_AGREEMENT:.0%} the painting rule guarantees: repaint the folder")
        if self.share(self.nested) > MAX_NESTED:
            out.append(f"{self.share(self.nested):.1%} of the painted instances in the {where} lie >= "
                       f"{NESTED_SHARE:.0%} inside a painted instance of their class (at most {MAX_NESTED:.0%} "
                       "allowed): the map paints parts, not objects")
        return out

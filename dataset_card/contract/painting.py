"""Painting rules: how `instances` and `semantic_mask` define `instance_mask` (dataset schema v2).

Every automatic mask stays in `instances`; the rule says what each one is (`level`, `parent`) and
which of them the map shows. Both follow from the stored fields (`category_id`,
`category_purity`, `rle`; for "salient" also `score` and `stability_score`), the semantic map and
the taxonomy's thing classes alone, so a labeled folder can be repainted under another rule
without running a model (`python -m dataset_card repaint`).

Levels (the same under every rule but for "object_agnostic"), decided in id order (ids are
numbered by area, largest first):
- "stuff": the mask's majority class is a stuff class (sky, wall, grass): a region, not an object;
- "dropped": a thing class, but under `min_purity` of the mask is that class (SAM merged the
  object with its surroundings, or the semantic model disagrees), or no class at all (ignore);
- "part": a thing mask whose *aligned pixels* (the mask's pixels of its own class) lie at least
  `containment` inside the full mask of an earlier (larger) object of the same class: the wheel
  of a car, a dog's head; `parent` is that object's id (the one holding most of it);
- "object": every other thing mask. `parent` is 0 except for parts;
- "object_agnostic" (only under a rule with `salience`, i.e. "salient"): a mask with no thing class
  (its level would be "stuff" or "dropped": a stuff majority, a thing under `min_purity`, or no
  class the taxonomy has) that is a whole, salient segment (`Salience`): an object the semantic
  taxonomy does not cover, kept class-agnostic (its `category_id` stays the majority class, which is
  not its class). A salient no-class mask whose pixels lie `containment` inside painted objects is
  a "part" of the object holding most of them.

Rules (`RULES`):
- "objects" (the default): the objects, each clipped to its own class region (its pixels whose
  semantic class is its `category_id`); where two objects of one class overlap, the larger (the
  lower id) keeps the shared pixels, so an object never lies inside another's mask in the map.
  Every painted pixel's semantic class is then its instance's class, and objects of different
  classes never compete for a pixel.
- "salient": "objects", then the class-agnostic objects, in id order, each on its pixels no object
  painted before it holds (class objects first, then larger agnostic ones): the map shows the
  subject of an image whose subject the taxonomy has no class for (a fish, a beetle, a violin
  under COCO's 80 things).
- "parts": schema v1's map: every instance's full mask, in id order (smaller on top), so the map
  shows SAM's finest masks: parts over wholes, stuff regions included.

What "whole" and "salient" mean (`Salience`, read from the stored `rle`, `score` and
`stability_score` only, so a repaint decides alike), for a mask without a thing class, in id order:
- confident: predicted IoU >= `min_score` (0.88) and stability >= `min_stability` (0.95), SAM's own
  automatic-generator thresholds: with no semantic class behind it, the mask must at least meet
  SAM's bar (also in a run that lowered the generator's thresholds, as the tiny twins do);
- sized like an object: between `min_area` (1% of the image, two of the trainer's 196 patches: a
  smaller one rarely owns a patch) and `max_area` (80%) of the image;
- not background: at most `max_border` (30%) of the image's border pixels (its four edges, corners
  counted with each) are in it. Sky, water, a wall or a table top run along the frame: a band the
  image's full width along one edge of a square image holds 25% of the border plus its height on
  both sides, so a band over a tenth of the image tall is background; a photographed subject cut by
  the frame touches part of one or two edges;
- whole, not a part: under `containment` (90%) of its pixels are already painted (by a class
  object or a larger agnostic object), else it is a "part" of the object holding most of them;
- its own: at least `min_free` (50%) of its pixels are unpainted, else it is SAM merging painted
  objects with their surroundings (it keeps its level, "stuff" or "dropped").
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, MutableMapping, Sequence
from dataclasses import asdict, dataclass, replace

import numpy as np

from dataset_card.contract import codecs

AGNOSTIC = "object_agnostic"  # the level of a class-agnostic object (rule "salient")
LEVELS = ("object", "part", "stuff", "dropped", AGNOSTIC)


@dataclass(frozen=True)
class Salience:
    """When a mask without a thing class is a whole, salient object (module doc; shares of the image)."""

    min_score: float = 0.88  # SAM's predicted IoU (SAM's automatic-generator default threshold)
    min_stability: float = 0.95  # SAM's stability score (its generator's default threshold)
    min_area: float = 0.01  # of the image's pixels
    max_area: float = 0.8
    max_border: float = 0.3  # of the image's border pixels (four edges, corners counted with each)
    min_free: float = 0.5  # of its pixels that no object painted before it holds

    def passes(self, score: float, stability: float, area_share: float, border_share: float) -> bool:
        """The confident, object-sized, not-background tests (wholeness is decided while painting)."""
        confident = (np.float32(score) >= np.float32(self.min_score)
                     and np.float32(stability) >= np.float32(self.min_stability))  # float32 as stored
        return (bool(confident)
                and self.min_area <= area_share <= self.max_area and border_share <= self.max_border)


@dataclass(frozen=True)
class PaintingRule:
    name: str  # a key of RULES
    paint: str  # "objects": objects clipped to their class region; "all": every full mask
    min_purity: float = 0.75  # a thing mask below this share of its class is "dropped"
    containment: float = 0.9  # aligned pixels this far inside a same-class object make a "part"
    description: str = ""
    salience: Salience | None = None  # set: no-class masks that pass it are class-agnostic objects

    def to_dict(self) -> dict:
        out = asdict(self)
        if self.salience is None:  # the dict of a rule without it is what earlier versions wrote
            del out["salience"]
        return out

    @classmethod
    def from_dict(cls, data: Mapping) -> PaintingRule:
        salience = data.get("salience")
        rule = cls(str(data["name"]), str(data["paint"]), float(data["min_purity"]), float(data["containment"]),
                   str(data.get("description", "")),
                   None if salience is None else Salience(**{k: float(v) for k, v in salience.items()}))
        if rule.paint not in ("objects", "all"):
            raise ValueError(f"unknown painting {rule.paint!r} (expected 'objects' or 'all')")
        if rule.salience is not None and rule.paint != "objects":
            raise ValueError("a painting rule with salience must paint 'objects'")
        return rule


RULES = {
    "objects": PaintingRule("objects", "objects", description=(
        "objects only (thing masks of purity >= 0.75 not nested >= 90% in a larger same-class object), each "
        "clipped to its class region; where two objects of one class overlap, the larger keeps the pixels")),
    "salient": PaintingRule("salient", "objects", salience=Salience(), description=(
        "the objects rule, plus class-agnostic objects: whole, salient masks with no thing class (confident, "
        "1-80% of the image, on at most 30% of its border, not inside painted objects) painted on the pixels no "
        "object holds")),
    "parts": PaintingRule("parts", "all", description=(
        "every instance's full mask in id order (ids by area, largest first: smaller masks, i.e. parts, on top); "
        "schema v1's map")),
}
DEFAULT_RULE = "objects"


def rule_named(name: str, min_purity: float | None = None, containment: float | None = None) -> PaintingRule:
    """The rule `name` of RULES, with its thresholds optionally replaced."""
    if name not in RULES:
        raise ValueError(f"unknown painting rule {name!r}; use one of {', '.join(RULES)}")
    rule = RULES[name]
    changes = {k: v for k, v in (("min_purity", min_purity), ("containment", containment))
               if v is not None and v != getattr(rule, k)}
    if not changes:
        return rule
    for key, value in changes.items():
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"{key} must lie in [0, 1], got {value}")
    return replace(rule, **changes, description=f"{rule.description}; {changes}")


Crop = tuple[int, int, np.ndarray]  # (y0, x0, (h, w) bool): all of a mask's pixels, in its box


def mask_crop(rle: Mapping) -> Crop:
    """The pixels of an RLE as a crop of its tight box (one full-size decode)."""
    y0, x0, y1, x1 = codecs.tight_box(rle)
    return y0, x0, codecs.decode_rle(rle, check=False)[y0:y1, x0:x1]


def _overlaps(a: Sequence[float], b: Sequence[float]) -> bool:
    """Whether two [x, y, w, h] boxes share any pixel."""
    return a[0] < b[0] + b[2] and b[0] < a[0] + a[2] and a[1] < b[1] + b[3] and b[1] < a[1] + a[3]


def contains(fraction: float, area: int, share: float) -> bool:
    """Whether `fraction` of `area` pixels (a pycocotools containment) is at least `share` of them,
    decided on the pixel count so that every caller rounds alike."""
    return area > 0 and round(float(fraction) * area) >= share * area - 1e-9


def paint_instances(instances: Sequence[MutableMapping], semantic: np.ndarray, things: Collection[int],
                    rule: PaintingRule, num_classes: int | None = None,
                    crops: Sequence[Crop | None] | None = None) -> np.ndarray:
    """Set `level`, `parent` and `visible_area` of every instance (in place) and return the
    (H, W) uint16 `instance_mask` under `rule`.

    instances: contract instances (ids 1..K numbered by area, largest first), at the map's size.
    semantic: (H, W) class map. things: thing class ids; the other ids below `num_classes` are
    stuff, and an id at or above it (the ignore value) is "dropped" (None: every other id is stuff).
    crops: optional pixels of instance i (`mask_crop` form) already at hand, else its RLE is decoded.

    Objects are settled in two steps. In id order, a thing mask whose aligned pixels lie
    `containment` inside an earlier object's full mask is a part; the others are objects, painted
    where no earlier (larger) object of their class is. Then, as long as some painted object lies
    `containment` inside another painted object of its class (an object whose larger rivals left it
    only a sliver, inside a smaller mask), the first such is made a part of it and the objects are
    repainted; an object left without a pixel becomes a part of the object holding most of its own.
    """
    height, width = semantic.shape
    order = sorted(range(len(instances)), key=lambda i: int(instances[i]["id"]))
    instance_map = np.zeros((height, width), np.uint16)
    objects: list[int] = []  # indices of accepted objects, in id order
    rles: dict[int, dict] = {}
    for i in order:
        inst = instances[i]
        category = int(inst["category_id"])
        level = None
        if category not in things:
            level = "stuff" if (num_classes is None or 0 <= category < num_classes) else "dropped"
        elif np.float32(inst["category_purity"]) < np.float32(rule.min_purity):
            level = "dropped"  # float32 as stored: labeler and repaint compare the same number
        parent = 0
        crop = crops[i] if crops is not None and crops[i] is not None else None
        if level is None or rule.paint == "all":
            y0, x0, inside = crop if crop is not None else mask_crop(inst["rle"])
            box = (slice(y0, y0 + inside.shape[0]), slice(x0, x0 + inside.shape[1]))
        if level is None:
            aligned = inside & (semantic[box] == category)  # the mask's pixels of its own class
            level = "object"
            rivals = [j for j in objects if int(instances[j]["category_id"]) == category
                      and _overlaps(instances[j]["bbox"], inst["bbox"])]
            count = int(aligned.sum())
            if rivals and count:
                inside_of = codecs.coco_mask().iou([_coco_rle(codecs.crop_rle(aligned, y0, x0, height, width))],
                                           [rles.setdefault(j, _coco_rle(instances[j]["rle"])) for j in rivals],
                                           [1] * len(rivals))[0]  # share of `aligned` inside each rival
                best = int(np.argmax(inside_of))
                if contains(inside_of[best], count, rule.containment):
                    level, parent = "part", int(instances[rivals[best]]["id"])
            if level == "object":
                objects.append(i)
                if rule.paint == "objects":  # only pixels no larger object of this class holds
                    window = instance_map[box]
                    window[aligned & (window == 0)] = int(inst["id"])
        if rule.paint == "all":
            instance_map[box][inside] = int(inst["id"])
        inst["level"], inst["parent"] = level, parent
    if rule.paint == "objects":
        instance_map = _settle(instances, objects, instance_map, semantic, rule.containment, crops)
    if rule.paint == "objects" and rule.salience is not None:
        _paint_agnostic(instances, order, instance_map, rule.salience, rule.containment, crops)
    visible = id_counts(instance_map, max((int(inst["id"]) for inst in instances), default=0))
    for inst in instances:
        inst["visible_area"] = int(visible[int(inst["id"])])
    return instance_map


def _paint_objects(instances: Sequence[Mapping], objects: Sequence[int], semantic: np.ndarray,
                   crops: Sequence[Crop | None] | None) -> np.ndarray:
    """The objects' map: each object's aligned pixels that no earlier object holds, in id order."""
    instance_map = np.zeros(semantic.shape, np.uint16)
    for i in objects:
        y0, x0, inside = crops[i] if crops is not None and crops[i] is not None else mask_crop(instances[i]["rle"])
        box = (slice(y0, y0 + inside.shape[0]), slice(x0, x0 + inside.shape[1]))
        window = instance_map[box]
        window[inside & (semantic[box] == int(instances[i]["category_id"])) & (window == 0)] = int(instances[i]["id"])
    return instance_map


def _settle(instances: Sequence[MutableMapping], objects: list[int], instance_map: np.ndarray, semantic: np.ndarray,
            share: float, crops: Sequence[Crop | None] | None) -> np.ndarray:
    """The second step of `paint_instances`: demote painted objects nested in a painted object of
    their class until none is, then objects without a pixel; returns the final map."""
    height, width = instance_map.shape
    full = {i: _coco_rle(instances[i]["rle"]) for i in objects}
    while True:
        painted, own = [], []
        for i in objects:
            y0, x0, y1, x1 = codecs.tight_box(instances[i]["rle"])
            region = instance_map[y0:y1, x0:x1] == int(instances[i]["id"])
            if region.any():
                painted.append(i)
                own.append(_coco_rle(codecs.crop_rle(region, y0, x0, height, width)))
        if len(painted) < 2:
            break
        inside = np.asarray(codecs.coco_mask().iou(own, [full[i] for i in painted], [1] * len(painted)))
        inside = inside.reshape(len(painted), len(painted))
        classes = np.array([int(instances[i]["category_id"]) for i in painted])
        inside[(classes[:, None] != classes[None, :]) | np.eye(len(painted), dtype=bool)] = 0.0
        areas = [int(codecs.coco_mask().area(rle)) for rle in own]
        nested = next((a for a in range(len(painted)) if contains(inside[a].max(), areas[a], share)), None)
        if nested is None:
            break
        demoted, holder = painted[nested], painted[int(np.argmax(inside[nested]))]
        instances[demoted]["level"], instances[demoted]["parent"] = "part", int(instances[holder]["id"])
        objects.remove(demoted)
        instance_map = _paint_objects(instances, objects, semantic, crops)
    for i in list(objects):  # objects their larger rivals left without a pixel
        inst = instances[i]
        y0, x0, inside = crops[i] if crops is not None and crops[i] is not None else mask_crop(inst["rle"])
        window = instance_map[y0 : y0 + inside.shape[0], x0 : x0 + inside.shape[1]]
        if (window == int(inst["id"])).any():
            continue
        held = window[inside & (semantic[y0 : y0 + inside.shape[0], x0 : x0 + inside.shape[1]]
                                == int(inst["category_id"]))]
        held = held[held > 0]
        if held.size:
            inst["level"], inst["parent"] = "part", int(np.bincount(held).argmax())
            objects.remove(i)
    return instance_map


def border_share(crop: Crop, height: int, width: int) -> float:
    """The share of an (height, width) image's border pixels (its four edges, a corner counted with
    each of its two edges) that the mask of `crop` covers."""
    y0, x0, inside = crop
    h, w = inside.shape
    on = ((inside[0].sum() if y0 == 0 else 0) + (inside[-1].sum() if y0 + h == height else 0)
          + (inside[:, 0].sum() if x0 == 0 else 0) + (inside[:, -1].sum() if x0 + w == width else 0))
    return float(on) / float(2 * (height + width))


def _paint_agnostic(instances: Sequence[MutableMapping], order: Sequence[int], instance_map: np.ndarray,
                    salience: Salience, containment: float, crops: Sequence[Crop | None] | None) -> None:
    """The "salient" rule's last step, in place on the objects' map: in id order, each salient mask
    with no thing class becomes a class-agnostic object painted on its unpainted pixels, or a part of
    the object holding >= `containment` of it, or stays as it is (module doc)."""
    height, width = instance_map.shape
    for i in order:
        inst = instances[i]
        if inst["level"] not in ("stuff", "dropped"):
            continue
        area = int(inst["area"])  # the full mask's pixels: most masks fail before any decode
        if not salience.passes(inst["score"], inst["stability_score"], area / (height * width), 0.0):
            continue
        crop = crops[i] if crops is not None and crops[i] is not None else mask_crop(inst["rle"])
        y0, x0, inside = crop
        if not salience.passes(inst["score"], inst["stability_score"], area / (height * width),
                               border_share(crop, height, width)):
            continue
        window = instance_map[y0 : y0 + inside.shape[0], x0 : x0 + inside.shape[1]]
        held = window[inside]
        free = int(np.count_nonzero(held == 0))
        if area - free >= containment * area - 1e-9:
            inst["level"], inst["parent"] = "part", int(np.bincount(held[held > 0]).argmax())
        elif free >= salience.min_free * area - 1e-9:
            inst["level"] = AGNOSTIC
            window[inside & (window == 0)] = int(inst["id"])


def id_counts(instance_map: np.ndarray, max_id: int, chunk_rows: int = 512) -> np.ndarray:
    """(max_id + 1,) pixel count of each id in an (H, W) map, counted in row slices (the int64 copy
    bincount makes stays small on a huge image); ids above `max_id` are not counted."""
    total = np.zeros(max_id + 1, np.int64)
    for y in range(0, instance_map.shape[0], chunk_rows):
        total += np.bincount(instance_map[y : y + chunk_rows].ravel(), minlength=max_id + 1)[: max_id + 1]
    return total


def _coco_rle(rle: Mapping) -> dict:
    counts = rle["counts"]
    return {"size": [int(s) for s in rle["size"]], "counts": counts.encode("ascii") if isinstance(counts, str) else counts}


def level_counts(instances: Sequence[Mapping]) -> dict[str, int]:
    """Instances per level: every level of every rule, and "object_agnostic" where it occurs."""
    out = dict.fromkeys((level for level in LEVELS if level != AGNOSTIC), 0)
    for inst in instances:
        out[inst["level"]] = out.get(inst["level"], 0) + 1
    return out

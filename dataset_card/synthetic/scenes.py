"""Procedural scenes with exact labels, written through the contract: data on which we know what a
model should learn (pretraining/study/ablations.py trains and probes on it).

A scene is a stuff background (one stuff class, or two split by a tilted horizon) with 2-5 objects
painted back to front, so later objects occlude earlier ones. An object's semantic class is its
*shape* (`SHAPES`); its colour and texture are random, so no pixel statistic gives the class away.
Stuff classes (`STUFF`) are told apart by texture (a smooth gradient, grainy noise, bricks) in
random colours. The image class is the shape of the object with the largest visible area. Labels
are exact: the semantic map holds each pixel's stuff or shape class, and each object's visible
pixels are one instance (occlusion can cut an object in two; it stays one instance).

Label variants (`labels=`), the same images in each:
- "clean": the exact maps.
- "noisy": every instance's boundary jittered by a pixel (grown or shrunk), and at `noise_rate`
  an instance merged into a touching neighbour (the pair takes the larger one's class) or split in
  two along a random line through its centre: what automatic masks get wrong.
- "shuffled": the maps of another scene (image i gets scene i + 1's), so labels say nothing about
  their image: the control that any gain comes from the labels' content.

Rows go through `synthetic.write_labeled_folder` (hence `synthetic_row`), so they follow the
contract's current schema.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from dataset_card.contract import layout
from dataset_card.synthetic.shapes import write_labeled_folder

STUFF = ("sky", "ground", "wall")
SHAPES = ("ellipse", "rectangle", "triangle", "cross", "star", "ring")
SEMANTIC_CLASSES = (
    *(layout.SemanticClass(i, name, False) for i, name in enumerate(STUFF)),
    *(layout.SemanticClass(len(STUFF) + i, name, True) for i, name in enumerate(SHAPES)),
)
LABEL_VARIANTS = ("clean", "noisy", "shuffled")


@dataclass(frozen=True)
class Scene:
    rgb: np.ndarray  # (H, W, 3) uint8
    semantic: np.ndarray  # (H, W) uint8 class ids (STUFF then SHAPES)
    masks: list[np.ndarray]  # (H, W) bool visible pixels of each object, back to front; none empty
    label: int  # image class: index into SHAPES of the largest visible object


def metadata() -> layout.DatasetMetadata:
    return layout.DatasetMetadata(SHAPES, SEMANTIC_CLASSES, semantic_source="procedural scenes (exact)")


# ---------------------------------------------------------------------------------------------
# Drawing


def _colour(rng: np.random.Generator) -> np.ndarray:
    return rng.uniform(0, 255, 3)


def _texture(rng: np.random.Generator, yy: np.ndarray, xx: np.ndarray, kind: str) -> np.ndarray:
    """(H, W, 3) float texture of one kind in random colours."""
    a, b = _colour(rng), _colour(rng)
    if kind == "flat":
        return a + rng.normal(0, 8, (*yy.shape, 3))
    if kind == "stripes":
        angle, period = rng.uniform(0, np.pi), rng.uniform(3, 7)
        phase = (np.cos(angle) * xx + np.sin(angle) * yy) / period
        return np.where((np.floor(phase) % 2 == 0)[..., None], a, b)
    if kind == "checker":
        cell = rng.integers(3, 6)
        return np.where((((yy // cell) + (xx // cell)) % 2 == 0)[..., None], a, b)
    if kind == "gradient":  # the sky's texture: smooth, vertical
        t = (yy - yy.min()) / max(float(np.ptp(yy)), 1.0)
        return a + (b - a) * t[..., None]
    if kind == "grain":  # the ground's: coarse noise
        return a + rng.normal(0, 35, (*yy.shape, 3))
    if kind == "bricks":  # the wall's: a brick grid of dark mortar lines
        h, w = rng.integers(4, 7), rng.integers(7, 11)
        offset = (yy // h % 2) * (w // 2)
        mortar = (yy % h == 0) | ((xx + offset) % w == 0)
        return np.where(mortar[..., None], a * 0.35, a + rng.normal(0, 6, (*yy.shape, 3)))
    raise ValueError(kind)


_STUFF_TEXTURE = {"sky": "gradient", "ground": "grain", "wall": "bricks"}
_OBJECT_TEXTURES = ("flat", "stripes", "checker", "flat")


def _shape_mask(shape: str, yy: np.ndarray, xx: np.ndarray, cy: float, cx: float, radius: float,
                angle: float, aspect: float) -> np.ndarray:
    """(H, W) bool: `shape` centred at (cy, cx), `radius` pixels, rotated by `angle`, stretched by `aspect`."""
    u = ((xx - cx) * np.cos(angle) + (yy - cy) * np.sin(angle)) / (radius * aspect)
    v = (-(xx - cx) * np.sin(angle) + (yy - cy) * np.cos(angle)) / (radius / aspect)
    r, phi = np.hypot(u, v), np.arctan2(v, u)
    if shape == "ellipse":
        return r < 1
    if shape == "rectangle":
        return (np.abs(u) < 0.85) & (np.abs(v) < 0.85)
    if shape == "triangle":  # equilateral: three half-planes
        return (v > -0.5) & (np.sqrt(3) * u - v > -1) & (-np.sqrt(3) * u - v > -1)
    if shape == "cross":
        return ((np.abs(u) < 1) & (np.abs(v) < 0.33)) | ((np.abs(u) < 0.33) & (np.abs(v) < 1))
    if shape == "star":
        return r < 0.55 + 0.5 * np.cos(5 * phi) ** 2 * (np.cos(5 * phi) > 0)
    if shape == "ring":
        return (r < 1) & (r > 0.55)
    raise ValueError(shape)


def _background(rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray]:
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
    kinds = rng.choice(len(STUFF), size=2, replace=False)
    if rng.random() < 0.4:
        below = np.zeros((size, size), bool)  # one stuff class
    else:
        horizon = rng.uniform(0.3, 0.7) * size + np.tan(rng.uniform(-0.4, 0.4)) * (xx - size / 2)
        below = yy > horizon
    rgb = np.empty((size, size, 3))
    semantic = np.where(below, kinds[1], kinds[0]).astype(np.uint8)
    for k in kinds:
        region = semantic == k
        rgb[region] = _texture(rng, yy, xx, _STUFF_TEXTURE[STUFF[k]])[region]
    return rgb, semantic


def render_scene(rng: np.random.Generator, size: int = 48, target: int | None = None, tries: int = 50,
                 target_radius: tuple[float, float] = (0.28, 0.38),
                 other_radius: tuple[float, float] = (0.08, 0.16),
                 target_centre: tuple[float, float] = (0.35, 0.65)) -> Scene:
    """One scene; with `target` (an index into SHAPES), redrawn (up to `tries` times) until the image
    class is that shape. One object (the first) has a radius in `target_radius` and its centre in
    `target_centre` (shares of the image size; near the middle, as photographed objects are), the
    others a radius in `other_radius` anywhere, so the class-defining object is usually the largest.
    """
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
    for _ in range(tries):
        rgb, semantic = _background(rng, size)
        count = int(rng.integers(2, 6))
        shapes = [int(rng.integers(len(SHAPES))) for _ in range(count)]
        radii = rng.uniform(*other_radius, count) * size
        radii[0] = rng.uniform(*target_radius) * size
        if target is not None:
            shapes[0] = target
        owner = np.full((size, size), -1)  # which object each pixel shows
        for i in rng.permutation(count):  # painting order: later objects occlude earlier ones
            cy, cx = rng.uniform(*(target_centre if i == 0 else (0.15, 0.85)), 2) * size
            mask = _shape_mask(SHAPES[shapes[i]], yy, xx, cy, cx, radii[i], rng.uniform(0, 2 * np.pi),
                               rng.uniform(0.8, 1.25))
            kind = _OBJECT_TEXTURES[int(rng.integers(len(_OBJECT_TEXTURES)))]
            rgb[mask] = _texture(rng, yy, xx, kind)[mask]
            owner[mask] = i
        visible = [owner == i for i in range(count)]
        areas = [int(v.sum()) for v in visible]
        label = shapes[int(np.argmax(areas))]
        if target is None or label == target:
            break
    kept = [i for i in range(count) if areas[i] > 0]
    for i in kept:
        semantic[visible[i]] = len(STUFF) + shapes[i]
    return Scene(rgb.clip(0, 255).astype(np.uint8), semantic, [visible[i] for i in kept], label)


# ---------------------------------------------------------------------------------------------
# Label variants


def _grow(mask: np.ndarray) -> np.ndarray:
    """3 x 3 dilation."""
    out = mask.copy()
    out[1:] |= mask[:-1]
    out[:-1] |= mask[1:]
    out[:, 1:] |= mask[:, :-1]
    out[:, :-1] |= mask[:, 1:]
    return out


def _shrink(mask: np.ndarray) -> np.ndarray:
    return ~_grow(~mask)


def noisy_labels(rng: np.random.Generator, scene: Scene, noise_rate: float) -> tuple[np.ndarray, list[np.ndarray]]:
    """(semantic, masks) with the errors of automatic labels: every instance's boundary moved by a
    pixel (grown or shrunk; where masks then overlap, the later one wins, as in painting), and at
    `noise_rate` each instance merged into the touching instance it shares most border with (the
    merged region takes the larger one's class) or split in two along a random line through its centre."""
    classes = [int(np.bincount(scene.semantic[m]).argmax()) for m in scene.masks]
    masks = [(_grow if rng.random() < 0.5 else _shrink)(m) for m in scene.masks]
    size = scene.semantic.shape
    owner = np.full(size, -1)
    for i, m in enumerate(masks):
        owner[m] = i
    semantic = scene.semantic.copy()
    stuff = np.isin(scene.semantic, np.arange(len(STUFF)))
    # Pixels that lost their instance show stuff: the most common stuff class around the object.
    for m in scene.masks:
        lost = m & (owner == -1)
        if lost.any():
            around = _grow(_grow(m)) & stuff
            semantic[lost] = np.bincount(scene.semantic[around]).argmax() if around.any() else semantic[lost]
    regions = [owner == i for i in range(len(masks))]
    for i in range(len(regions)):
        if not regions[i].any() or rng.random() >= noise_rate:
            continue
        if rng.random() < 0.5:  # merge into the neighbour sharing most border
            border = _grow(regions[i]) & ~regions[i]
            shared = [int((border & regions[j]).sum()) if j != i else 0 for j in range(len(regions))]
            j = int(np.argmax(shared))
            if shared[j] == 0:
                continue
            keep, gone = (i, j) if regions[i].sum() >= regions[j].sum() else (j, i)
            regions[keep], regions[gone] = regions[keep] | regions[gone], np.zeros(size, bool)
            classes[gone] = classes[keep]
        else:  # split along a random line through the centre
            ys, xs = np.nonzero(regions[i])
            angle = rng.uniform(0, np.pi)
            yy, xx = np.mgrid[0:size[0], 0:size[1]]
            side = (np.cos(angle) * (xx - xs.mean()) + np.sin(angle) * (yy - ys.mean())) > 0
            part = regions[i] & side
            if part.any() and (regions[i] & ~side).any():
                regions[i] = regions[i] & ~side
                regions.append(part)
                classes.append(classes[i])
    for region, cls in zip(regions, classes):
        semantic[region] = cls
    return semantic, [r for r in regions if r.any()]


# ---------------------------------------------------------------------------------------------
# Writing


def write_scenes(root: str, num_images: int, size: int = 48, seed: int = 0, labels: str = "clean",
                 noise_rate: float = 0.2, num_shards: int = 1) -> layout.DatasetMetadata:
    """A complete labeled folder of `num_images` scenes (classes balanced) under `root`.

    The images depend only on (num_images, size, seed), never on `labels`, so the variants of one
    seed are the same images with different maps.
    """
    if labels not in LABEL_VARIANTS:
        raise ValueError(f"Unknown label variant {labels!r}; use one of {', '.join(LABEL_VARIANTS)}.")
    rng = np.random.default_rng([seed, 0])
    noise_rng = np.random.default_rng([seed, 1])
    scenes = [render_scene(rng, size, target=i % len(SHAPES)) for i in range(num_images)]
    def example(i: int) -> tuple:
        scene = scenes[i]
        if labels == "shuffled":
            other = scenes[(i + 1) % num_images]
            semantic, masks = other.semantic, other.masks
        elif labels == "noisy":
            semantic, masks = noisy_labels(noise_rng, scene, noise_rate)
        else:
            semantic, masks = scene.semantic, scene.masks
        return f"{SHAPES[scene.label]}/{i:06d}", scene.label, scene.rgb, semantic, masks

    return write_labeled_folder(root, metadata(), example, num_images, num_shards,
                                {"source": "dataset_card.synthetic.scenes", "seed": seed, "size": size, "labels": labels,
                                 "noise_rate": noise_rate})

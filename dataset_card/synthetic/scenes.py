"""Procedural scenes with exact labels, written through the contract: data on which we know what a
model should learn (pretraining/study/ablations.py trains and probes on it).

A scene is a stuff background (one stuff class, or two split by a tilted horizon) with 2-5 objects
painted back to front, so later objects occlude earlier ones. An object's semantic class is its
*shape* (`SHAPES`); its colours are random, so no colour gives the class away. Stuff classes
(`STUFF`) are told apart by texture (a smooth gradient, grainy noise, bricks) in random colours.
Labels are exact: the semantic map holds each pixel's stuff or shape class, and each object's
visible pixels are one instance (occlusion can cut an object in two; it stays one instance).

Two tasks (`task=`) say what the image class is:
- "shape": the shape of the object with the largest visible area; objects are flat, striped or
  checked at random. The class is a function of the semantic map: a label-informed task.
- "appearance": the texture of the largest object, one of `APPEARANCES` (flat, stripes, checker,
  dots, speckle, grid), the other objects' textures random. Geometry and paint come from separate
  generators, so the label maps (shapes and instances only) say nothing about the class, while the
  RGB shows it. `Scene.shape` keeps the largest object's shape for the label-informed probe, and
  `Scene.appearance` every object pixel's texture (the dense texture probe no arm is trained on).

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
TASKS = ("shape", "appearance")
APPEARANCE_FILE = "appearance.npy"  # beside the shards: per-pixel object textures
# The appearance task's classes: object textures, none of them a stuff texture, each in random colours.
APPEARANCES = ("flat", "stripes", "checker", "dots", "speckle", "grid")
_SHAPE_TASK_TEXTURES = ("flat", "stripes", "checker", "flat")


@dataclass(frozen=True)
class Scene:
    rgb: np.ndarray  # (H, W, 3) uint8
    semantic: np.ndarray  # (H, W) uint8 class ids (STUFF then SHAPES)
    masks: list[np.ndarray]  # (H, W) bool visible pixels of each object, back to front; none empty
    label: int  # image class: the task's class of the largest visible object (SHAPES or APPEARANCES index)
    shape: int  # index into SHAPES of the largest visible object (the label-informed probe's class)
    appearance: np.ndarray  # (H, W) int8 index into APPEARANCES of each object pixel's texture; -1 on stuff


def metadata(task: str = "shape") -> layout.DatasetMetadata:
    return layout.DatasetMetadata(APPEARANCES if task == "appearance" else SHAPES, SEMANTIC_CLASSES,
                                  semantic_source="procedural scenes (exact)")


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
    if kind == "dots":  # discs on a square grid
        period = rng.integers(4, 7)
        dy, dx = (yy + rng.integers(period)) % period - period / 2, (xx + rng.integers(period)) % period - period / 2
        return np.where((np.hypot(dy, dx) < period / 3)[..., None], a, b)
    if kind == "speckle":  # every pixel one of two colours at random
        return np.where((rng.random(yy.shape) < 0.5)[..., None], a, b)
    if kind == "grid":  # thin lines in both directions
        period = rng.integers(4, 7)
        lines = ((yy + rng.integers(period)) % period == 0) | ((xx + rng.integers(period)) % period == 0)
        return np.where(lines[..., None], a, b)
    raise ValueError(kind)


_STUFF_TEXTURE = {"sky": "gradient", "ground": "grain", "wall": "bricks"}


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


def _geometry(rng: np.random.Generator, size: int, shapes: list[int], target_radius: tuple[float, float],
              other_radius: tuple[float, float], target_centre: tuple[float, float]) -> tuple[np.ndarray, np.ndarray]:
    """Where everything is, no pixel colours: (stuff (H, W) uint8 stuff class of every pixel, owner (H, W)
    int: which object each pixel shows, -1 none). Object 0 has a radius in `target_radius` and its centre
    in `target_centre` (shares of the image size), the others a radius in `other_radius` anywhere; objects
    are painted in random order, so later ones occlude earlier ones."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
    kinds = rng.choice(len(STUFF), size=2, replace=False)
    if rng.random() < 0.4:
        below = np.zeros((size, size), bool)  # one stuff class
    else:
        horizon = rng.uniform(0.3, 0.7) * size + np.tan(rng.uniform(-0.4, 0.4)) * (xx - size / 2)
        below = yy > horizon
    stuff = np.where(below, kinds[1], kinds[0]).astype(np.uint8)
    radii = rng.uniform(*other_radius, len(shapes)) * size
    radii[0] = rng.uniform(*target_radius) * size
    owner = np.full((size, size), -1)
    for i in rng.permutation(len(shapes)):
        cy, cx = rng.uniform(*(target_centre if i == 0 else (0.15, 0.85)), 2) * size
        mask = _shape_mask(SHAPES[shapes[i]], yy, xx, cy, cx, radii[i], rng.uniform(0, 2 * np.pi), rng.uniform(0.8, 1.25))
        owner[mask] = i
    return stuff, owner


def _paint(rng: np.random.Generator, stuff: np.ndarray, owner: np.ndarray, textures: list[str]) -> np.ndarray:
    """(H, W, 3) float RGB: each stuff region in its class's texture, object i's visible pixels in
    `textures[i]`, all in colours drawn from `rng`."""
    size = stuff.shape[0]
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
    rgb = np.empty((size, size, 3))
    for k in np.unique(stuff):
        region = stuff == k
        rgb[region] = _texture(rng, yy, xx, _STUFF_TEXTURE[STUFF[k]])[region]
    for i, kind in enumerate(textures):
        region = owner == i
        rgb[region] = _texture(rng, yy, xx, kind)[region]
    return rgb


def render_scene(rng: np.random.Generator, size: int = 48, target: int | None = None, tries: int = 50,
                 target_radius: tuple[float, float] = (0.28, 0.38),
                 other_radius: tuple[float, float] = (0.08, 0.16),
                 target_centre: tuple[float, float] = (0.35, 0.65), task: str = "shape",
                 paint_rng: np.random.Generator | None = None) -> Scene:
    """One scene of `task` ("shape" or "appearance"); with `target` (an index into the task's
    classes), one whose image class is that. The first of 2-5 objects is big and near the middle (as
    photographed objects are), so it is usually the largest.

    shape: the scene is redrawn (up to `tries` times) until the largest object's shape is `target`;
    objects take a random texture of `_SHAPE_TASK_TEXTURES`. appearance: the geometry is drawn once
    from `rng`, then the largest object takes texture `target` and the others random ones, all painted
    from `paint_rng` (default `rng`). With a separate `paint_rng`, the label maps are a function of
    `rng` alone and the image class of `paint_rng` alone: the maps cannot tell the class.
    """
    if task not in TASKS:
        raise ValueError(f"Unknown scene task {task!r}; use one of {', '.join(TASKS)}.")
    paint_rng = rng if paint_rng is None else paint_rng
    for _ in range(tries if task == "shape" else 1):
        count = int(rng.integers(2, 6))
        shapes = [int(rng.integers(len(SHAPES))) for _ in range(count)]
        if target is not None and task == "shape":
            shapes[0] = target
        stuff, owner = _geometry(rng, size, shapes, target_radius, other_radius, target_centre)
        areas = [int((owner == i).sum()) for i in range(count)]
        largest = int(np.argmax(areas))
        if task == "appearance" or target is None or shapes[largest] == target:
            break
    choices = APPEARANCES if task == "appearance" else _SHAPE_TASK_TEXTURES
    textures = [choices[int(paint_rng.integers(len(choices)))] for _ in range(count)]
    if task == "appearance" and target is not None:
        textures[largest] = APPEARANCES[target]
    rgb = _paint(paint_rng, stuff, owner, textures)
    kept = [i for i in range(count) if areas[i] > 0]
    semantic, appearance = stuff.copy(), np.full(stuff.shape, -1, np.int8)
    for i in kept:
        semantic[owner == i] = len(STUFF) + shapes[i]
        appearance[owner == i] = APPEARANCES.index(textures[i])
    label = APPEARANCES.index(textures[largest]) if task == "appearance" else shapes[largest]
    return Scene(rgb.clip(0, 255).astype(np.uint8), semantic, [owner == i for i in kept], label, shapes[largest],
                 appearance)


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
                 noise_rate: float = 0.2, num_shards: int = 1, task: str = "shape",
                 target_radius: tuple[float, float] = (0.28, 0.38)) -> layout.DatasetMetadata:
    """A complete labeled folder of `num_images` scenes of `task` (classes balanced) under `root`, and
    beside its shards `appearance.npy`: (num_images, size, size) int8, each object pixel's texture
    (index into APPEARANCES, -1 on stuff), the dense texture probe's labels.

    The images depend only on (num_images, size, seed, task, target_radius: the first object's radius as
    a share of `size`), never on `labels`, so the variants of one
    seed are the same images with different maps. In the appearance task the geometry (hence the
    clean maps) comes from one generator and the paint (hence the class) from another.
    """
    if labels not in LABEL_VARIANTS:
        raise ValueError(f"Unknown label variant {labels!r}; use one of {', '.join(LABEL_VARIANTS)}.")
    if task not in TASKS:
        raise ValueError(f"Unknown scene task {task!r}; use one of {', '.join(TASKS)}.")
    rng = np.random.default_rng([seed, 0])
    noise_rng = np.random.default_rng([seed, 1])
    paint_rng = np.random.default_rng([seed, 2]) if task == "appearance" else rng
    classes = metadata(task).class_names
    scenes = [render_scene(rng, size, target=i % len(classes), task=task, paint_rng=paint_rng,
                           target_radius=target_radius)
              for i in range(num_images)]

    def example(i: int) -> tuple:
        scene = scenes[i]
        if labels == "shuffled":
            other = scenes[(i + 1) % num_images]
            semantic, masks = other.semantic, other.masks
        elif labels == "noisy":
            semantic, masks = noisy_labels(noise_rng, scene, noise_rate)
        else:
            semantic, masks = scene.semantic, scene.masks
        return f"{classes[scene.label]}/{i:06d}", scene.label, scene.rgb, semantic, masks

    written = write_labeled_folder(root, metadata(task), example, num_images, num_shards,
                                   {"source": "dataset_card.synthetic.scenes", "seed": seed, "size": size,
                                    "labels": labels, "noise_rate": noise_rate, "task": task,
                                    "target_radius": list(target_radius)})
    np.save(f"{root}/{APPEARANCE_FILE}", np.stack([scene.appearance for scene in scenes]))
    return written

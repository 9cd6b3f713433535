"""Semantic labeler: taxonomy from the config, aspect-preserving inputs with the real processor form,
buckets, class maps at the image's size that agree with transformers' post-processing, batching,
precision, imports."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import skimage.data
import torch
import torch.nn.functional as F
from transformers import Mask2FormerConfig

from labeling.labelers.semantic import (
    SemanticLabeler,
    SemanticLabelerConfig,
    bucket_of,
    bucket_passes,
    canonical_shapes,
    class_map,
    class_taxonomy,
    model_input_size,
)
from labeling.labelers.tiny_models import TINY_CLASSES, TINY_THING_IDS, build_tiny_random_models

# Small tensors: one torch thread is faster than two fighting on a busy 2-core machine.
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return build_tiny_random_models(str(tmp_path_factory.mktemp("tiny")))


@pytest.fixture(scope="module")
def labeler(tiny):
    torch.manual_seed(0)
    return SemanticLabeler(tiny.semantic_model, SemanticLabelerConfig(batch_size=4, shortest_edge=128))


def test_taxonomy_comes_from_the_config(labeler):
    assert [c.name for c in labeler.classes] == list(TINY_CLASSES)
    assert [c.id for c in labeler.classes] == list(range(len(TINY_CLASSES)))
    assert {c.id for c in labeler.classes if c.isthing} == set(TINY_THING_IDS)
    assert labeler.ignore_value == 255


def test_thing_rules():
    coco = Mask2FormerConfig(id2label={i: f"c{i}" for i in range(133)})
    assert [c.isthing for c in class_taxonomy(coco)] == [True] * 80 + [False] * 53
    cityscapes = Mask2FormerConfig(id2label={i: f"c{i}" for i in range(19)})
    assert [c.id for c in class_taxonomy(cityscapes) if c.isthing] == list(range(11, 19))
    ade20k = Mask2FormerConfig(id2label={i: f"c{i}" for i in range(150)})  # ADE20K panoptic's split
    ade_things = [c.id for c in class_taxonomy(ade20k) if c.isthing]
    assert len(ade_things) == 100 and 126 in ade_things and not {0, 2, 4, 9, 21} & set(ade_things)
    other = Mask2FormerConfig(id2label={i: f"c{i}" for i in range(151)})
    assert not any(c.isthing for c in class_taxonomy(other))
    with pytest.raises(ValueError, match="dense"):
        class_taxonomy(Mask2FormerConfig(id2label={0: "a", 2: "b"}))


def test_class_map_picks_the_query_class_and_leaves_weak_pixels_unlabeled():
    """Query 0 says class 2 on the left half, query 1 says class 4 on the right; query 2 is "no object"."""
    classes = torch.full((3, 6), -10.0)  # 5 classes + no-object
    classes[0, 2] = classes[1, 4] = classes[2, 5] = 10.0
    masks = torch.full((3, 4, 6), -10.0)
    masks[0, :, :3] = masks[1, :, 3:] = 10.0
    masks[2] = 10.0
    out = class_map(masks, 8, 12, classes)  # twice the logits' size
    assert out.dtype == np.uint8 and out.shape == (8, 12)
    assert (out[:, :6] == 2).all() and (out[:, 6:] == 4).all()
    masks[1, :, 5] = -10.0  # nobody claims the last column
    out = class_map(masks, 4, 6, classes, min_score=0.5, ignore_value=255)
    assert (out[:, 5] == 255).all() and (out[:, 3:5] == 4).all()
    many = class_map(torch.randn(300, 2, 3), 4, 6)  # a 300-class semantic model: 16-bit map
    assert many.dtype == np.uint16 and many.max() < 300


def test_class_map_in_bands_equals_one_bilinear_upsampling():
    """Bands of a few rows (a bounded memory) give F.interpolate's upsampling, then the argmax."""
    generator = torch.Generator().manual_seed(0)
    queries, masks = torch.randn(7, 5, generator=generator), torch.randn(7, 9, 13, generator=generator)
    up = F.interpolate(masks[None], size=(37, 50), mode="bilinear", align_corners=False)[0]
    expected = torch.einsum("qc,qhw->chw", queries.softmax(-1)[:, :-1], up.sigmoid()).argmax(0).numpy()
    for budget in (1, 11 * 50 * 3, 1 << 25):  # one row per band, three rows, everything at once
        assert (class_map(masks, 37, 50, queries, max_elements=budget) == expected).mean() > 0.999
    logits = torch.randn(6, 9, 13, generator=generator)  # a semantic model's class logits
    expected = F.interpolate(logits[None], size=(20, 8), mode="bilinear", align_corners=False)[0].argmax(0).numpy()
    assert (class_map(logits, 20, 8, max_elements=100) == expected).mean() > 0.999


def test_model_input_size_keeps_the_aspect_ratio():
    assert model_input_size(375, 500, 640, 1067, 32) == (640, 864)  # 853.3 -> nearest multiple of 32
    assert model_input_size(500, 375, 640, 1067, 32) == (864, 640)
    assert model_input_size(100, 1000, 640, 1067, 32) == (96, 1056)  # the longer side's limit rules
    assert model_input_size(2, 700, 640, 1067, 32) == (32, 1056)  # never below one divisor step


def test_buckets_at_the_default_sizes_hold_imagenets_common_shapes():
    shapes = canonical_shapes(640, 1067, 32, (1.0, 4 / 3))
    assert shapes == ((640, 640), (640, 864), (640, 1056))
    # ImageNet's common sizes (w, h) -> their own input -> the bucket: 4:3 and 1:1 fill theirs exactly.
    for (w, h), content, bucket in [((500, 375), (640, 864), (640, 864)), ((375, 500), (864, 640), (864, 640)),
                                    ((500, 500), (640, 640), (640, 640)), ((500, 400), (640, 800), (640, 864)),
                                    ((500, 333), (640, 960), (640, 1056)), ((333, 500), (960, 640), (1056, 640)),
                                    ((1000, 100), (96, 1056), (640, 1056))]:
        assert model_input_size(h, w, 640, 1067, 32) == content
        assert bucket_of(content, shapes) == bucket, (w, h)
    assert canonical_shapes(64, 107, 32, (1.0, 4 / 3, 3.0)) == ((64, 64), (64, 96))  # duplicates merge; capped
    with pytest.raises(ValueError, match="larger than every bucket"):
        bucket_of((640, 1100), shapes)


def test_without_buckets_nothing_is_padded(tiny):
    labeler = SemanticLabeler(tiny.semantic_model, SemanticLabelerConfig(shortest_edge=128, bucket_aspects=None))
    for h, w in [(100, 150), (100, 170), (150, 100)]:
        item = labeler.prepare(np.zeros((h, w, 3), np.uint8))
        assert item.input_size == item.content and item.inputs["pixel_values"].shape[-2:] == item.content


def test_passes_group_a_buckets_images_in_order():
    a, b = (1, 2), (2, 1)
    assert bucket_passes([a, b, a, a, b, a], 2) == [[0, 2], [3, 5], [1, 4]]
    assert bucket_passes([a, b, a], 4) == [[0, 2], [1]]
    assert bucket_passes([], 4) == []


def test_the_real_processor_form_still_gives_aspect_preserving_inputs(tiny, labeler):
    """The tiny twin's processor config has the published checkpoints' fixed 384 x 384 form, which
    would squash every image; the labeler's input keeps the image's aspect ratio instead, inside
    its bucket, and the model sees the bucket."""
    config = json.loads(Path(tiny.semantic_model, "preprocessor_config.json").read_text())
    assert config["size"] == {"height": 384, "width": 384} and config["size_divisor"] == 32
    seen = []
    hook = labeler.model.register_forward_pre_hook(lambda module, args, kwargs: seen.append(
        tuple(kwargs["pixel_values"].shape)), with_kwargs=True)
    try:
        for h, w in [(300, 451), (451, 300), (120, 700), (64, 64)]:
            seen.clear()
            image = np.full((h, w, 3), 200, np.uint8)
            item = labeler.prepare(image)
            ih, iw = item.content
            assert abs(ih * w / h - iw) <= 32 or ih == 32, (h, w, ih, iw)  # aspect kept within one step
            assert min(ih, iw) == 128 or max(ih, iw) >= 213  # the shorter side, unless the longer limit rules
            assert item.input_size in set(labeler.buckets) | {(long, short) for short, long in labeler.buckets}
            pixels = item.inputs["pixel_values"][0]
            assert (pixels[:, ih:] == 0).all() and (pixels[:, :, iw:] == 0).all() and (pixels[:, :ih, :iw] != 0).all()
            out = labeler([image])[0]
            assert out.shape == (h, w)
            assert seen == [(labeler.batch_size, 3, *item.input_size)]  # one full pass at the bucket's shape
    finally:
        hook.remove()


def test_class_maps_agree_with_transformers_post_processing_on_non_square_images(labeler):
    """Same model outputs (cropped to the image's part of its bucket): our map and
    `post_process_semantic_segmentation(outputs, target_sizes=[(H, W)])`."""
    images = [skimage.data.chelsea(), skimage.data.coffee(), skimage.data.rocket(), skimage.data.astronaut()[:300],
              skimage.data.astronaut()[:, 100:250]]
    agreement, classes, padded = [], set(), 0
    for image in images:
        h, w = image.shape[:2]
        assert h != w
        item = labeler.prepare(image)
        padded += item.content != item.input_size
        outputs = labeler.forward([item])
        ours = labeler.class_map(outputs, 0, item)
        masks, queries = labeler.content_outputs(outputs, 0, item)
        cropped = SimpleNamespace(masks_queries_logits=masks[None], class_queries_logits=queries[None])
        theirs = labeler.processor.post_process_semantic_segmentation(cropped, target_sizes=[(h, w)])[0].numpy()
        agreement.append((ours == theirs).mean())
        classes |= set(np.unique(ours).tolist())
        np.testing.assert_array_equal(labeler([image])[0], ours)  # what the labeler returns
    assert min(agreement) >= 0.995, agreement
    assert len(classes) >= 2  # the twin's maps have boundaries to disagree on
    assert padded >= 2  # the crop is exercised


def test_maps_are_at_the_requested_size_for_any_shape(labeler):
    rng = np.random.default_rng(0)
    shapes = [(100, 150), (150, 100), (1, 1), (2, 700), (64, 64), (300, 40)]
    images = [rng.integers(0, 255, (*s, 3), dtype=np.uint8) for s in shapes]
    maps = labeler(images)
    for (h, w), m in zip(shapes, maps):
        assert m.dtype == np.uint8 and m.shape == (h, w)
        assert ((m >= 0) & (m < len(TINY_CLASSES))).all()
    # The pipeline's case: the models see a shrunk image, the map comes at the original size.
    big = labeler([images[0]], sizes=[(400, 600)])[0]
    assert big.shape == (400, 600)
    with pytest.raises(ValueError, match="2 output sizes for 1 images"):
        labeler([images[0]], sizes=[(1, 1), (2, 2)])


def test_an_images_map_does_not_depend_on_its_batch(labeler):
    """Images of one bucket share a pass whatever their own input size; zero fillers complete it."""
    rng = np.random.default_rng(1)
    a, b = (rng.integers(0, 255, (100, 150, 3), dtype=np.uint8) for _ in range(2))
    wider = rng.integers(0, 255, (100, 170, 3), dtype=np.uint8)  # another input size, a's bucket
    large = rng.integers(0, 255, (200, 180, 3), dtype=np.uint8)  # another bucket
    assert labeler.prepare(wider).content != labeler.prepare(a).content
    assert labeler.prepare(wider).input_size == labeler.prepare(a).input_size != labeler.prepare(large).input_size
    passes = []
    hook = labeler.model.register_forward_pre_hook(lambda module, args, kwargs: passes.append(
        kwargs["pixel_values"].shape[0]), with_kwargs=True)
    try:
        before = labeler.fillers
        alone = labeler([a])[0]
        assert passes == [4] and labeler.fillers - before == 3
        passes.clear()
        together = labeler([large, wider, a, b])
        assert passes == [4, 4] and labeler.fillers - before == 3 + 3 + 1  # a, b and wider share a pass
    finally:
        hook.remove()
    np.testing.assert_array_equal(together[2], alone)
    np.testing.assert_array_equal(labeler([b, a])[1], alone)
    np.testing.assert_array_equal(together[1], labeler([wider])[0])


def test_half_precision_agrees_with_float32(tiny):
    """float16, the model cast (the CUDA default) and under autocast, against float32 on CPU, on photos
    (measured: min 0.993 cast, 0.985 autocast; bfloat16 0.964 / 0.950, see docs/labelers.md)."""
    images = [skimage.data.chelsea(), skimage.data.coffee(), skimage.data.astronaut()[:300]]
    maps = {}
    for name, cfg in {"fp32": {}, "autocast": {"autocast": True, "reduced_on_cpu": True},
                      "cast": {"reduced_on_cpu": True}}.items():
        labeler = SemanticLabeler(tiny.semantic_model, SemanticLabelerConfig(shortest_edge=128, **cfg))
        assert labeler.model.dtype == (torch.float16 if name == "cast" else torch.float32)
        maps[name] = labeler(images)
    for name in ("autocast", "cast"):
        agreement = min((ours == ref).mean() for ours, ref in zip(maps[name], maps["fp32"]))
        assert agreement >= 0.98, (name, agreement)
    with pytest.raises(ValueError, match="float16"):
        SemanticLabeler(tiny.semantic_model, SemanticLabelerConfig(dtype="half"))


def test_bad_inputs_are_one_sentence(tiny, labeler, tmp_path):
    with pytest.raises(ValueError, match="uint8"):
        labeler([np.zeros((4, 4, 3), np.float32)])
    with pytest.raises(RuntimeError) as err:
        SemanticLabeler(str(tmp_path / "missing"))
    assert "\n" not in str(err.value) and "local folder" in str(err.value)


@pytest.mark.gpu
def test_half_precision_on_gpu(tiny):
    cpu = SemanticLabeler(tiny.semantic_model)
    gpu = SemanticLabeler(tiny.semantic_model, device="cuda")
    assert gpu.model.dtype == torch.float16
    image = np.random.default_rng(0).integers(0, 255, (120, 90, 3), dtype=np.uint8)
    assert (cpu([image])[0] == gpu([image])[0]).mean() > 0.9


_IMPORT_SCRIPT = textwrap.dedent("""
    import sys, tempfile
    sys.modules["ray"] = None  # importing either now raises ImportError, as on a box without them
    sys.modules["datasets"] = None
    import numpy as np
    import labeling.labelers.checkpoints, labeling.labelers.instance, labeling.labelers.semantic, labeling.labelers.tiny_models
    import labeling.labelers.model_choice, labeling.labelers.alignment
    import importlib.util
    spec = importlib.util.spec_from_file_location("bench", "benchmarks/instance_labeler.py")
    spec.loader.exec_module(importlib.util.module_from_spec(spec))
    from labeling.labelers.semantic import SemanticLabeler
    tiny = labeling.labelers.tiny_models.build_tiny_random_models(tempfile.mkdtemp())
    labeler = SemanticLabeler(tiny.semantic_model)
    print(labeler.classes[0], labeler.ignore_value, labeler([np.zeros((32, 48, 3), np.uint8)])[0].shape)
    print(labeling.labelers.model_choice.resolve_hub_revision)
""")


def test_labelers_import_without_ray_or_datasets():
    env = dict(os.environ, PYTHONPATH=os.getcwd())
    done = subprocess.run([sys.executable, "-c", _IMPORT_SCRIPT], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "person" in done.stdout and " 255 " in done.stdout


def test_the_semantic_batch_flag_reaches_the_labeler_and_does_not_shape_labels():
    """--semantic-batch-size sets the images per pass; a resume may change it (recorded, not compared:
    an image's label does not depend on its batch, tests/test_label_determinism.py)."""
    from labeling.labelers.semantic import SemanticLabelerConfig
    from labeling.pipeline import manifest
    from labeling.pipeline.driver import LabelingConfig, model_choice
    from labeling.run import config_from_args, parser

    args = ["--input", "in", "--output", "out", "--models", "default", "--semantic-batch-size", "4"]
    cfg = config_from_args(parser().parse_args(args))
    params = model_choice(cfg).semantic_params
    assert SemanticLabelerConfig(**params).batch_size == 4
    plain = LabelingConfig(input="in", output="out")
    assert cfg.arguments() == plain.arguments()
    old, new = ({"arguments": c.arguments(), "models": {"semantic": {"params": model_choice(c).semantic_params}}}
                for c in (plain, cfg))
    assert manifest.differences(old, new) == []

"""Semantic labeler: taxonomy from the config, argmax at the model's resolution, batching, imports."""

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from transformers import Mask2FormerConfig
from transformers.models.mask2former.image_processing_mask2former import Mask2FormerImageProcessor

from labeling.labelers.semantic import (
    SemanticLabeler,
    SemanticLabelerConfig,
    class_taxonomy,
    universal_class_map,
)
from labeling.labelers.tiny_models import TINY_CLASSES, TINY_THING_IDS, build_tiny_random_models


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return build_tiny_random_models(str(tmp_path_factory.mktemp("tiny")))


@pytest.fixture(scope="module")
def labeler(tiny):
    torch.manual_seed(0)
    return SemanticLabeler(tiny.semantic_model, SemanticLabelerConfig(batch_size=4))


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
    other = Mask2FormerConfig(id2label={i: f"c{i}" for i in range(150)})
    assert not any(c.isthing for c in class_taxonomy(other))
    with pytest.raises(ValueError, match="dense"):
        class_taxonomy(Mask2FormerConfig(id2label={0: "a", 2: "b"}))


def test_universal_class_map_picks_the_query_class():
    """Query 0 says class 2 on the left half, query 1 says class 4 on the right; query 2 is "no object"."""
    classes = torch.full((3, 6), -10.0)  # 5 classes + no-object
    classes[0, 2] = classes[1, 4] = classes[2, 5] = 10.0
    masks = torch.full((3, 4, 6), -10.0)
    masks[0, :, :3] = masks[1, :, 3:] = 10.0
    masks[2] = 10.0
    out = universal_class_map(classes, masks, min_score=0.0, ignore_value=255)
    assert out.dtype == torch.int64 and out.shape == (4, 6)
    assert (out[:, :3] == 2).all() and (out[:, 3:] == 4).all()
    masks[1, :, 5] = -10.0  # nobody claims the last column
    out = universal_class_map(classes, masks, min_score=0.5, ignore_value=255)
    assert (out[:, 5] == 255).all() and (out[:, 3:5] == 4).all()


def test_universal_class_map_matches_transformers_formula():
    """Same per-pixel scores as transformers' Mask2Former semantic post-processing, without its resize."""
    generator = torch.Generator().manual_seed(0)
    classes = torch.randn(1, 10, 8, generator=generator)
    masks = torch.randn(1, 10, 384, 384, generator=generator)

    class Out:
        class_queries_logits, masks_queries_logits = classes, masks

    reference = Mask2FormerImageProcessor().post_process_semantic_segmentation(Out())[0]
    assert torch.equal(universal_class_map(classes[0], masks[0], 0.0, 255), reference)


def test_maps_are_at_model_resolution_for_any_shape(labeler):
    rng = np.random.default_rng(0)
    shapes = [(100, 150), (150, 100), (1, 1), (2, 700), (64, 64), (300, 40)]
    images = [rng.integers(0, 255, (*s, 3), dtype=np.uint8) for s in shapes]
    maps = labeler(images)
    for (h, w), m in zip(shapes, maps):
        assert m.dtype == np.int64 and m.ndim == 2
        assert ((m >= 0) & (m < len(TINY_CLASSES))).all()
        # shorter side 64 px in, 1/4 resolution out: 16 rows or columns on the short side
        assert min(m.shape) >= 1 and max(m.shape) <= 32
        if min(h, w) >= 40 and max(h, w) / min(h, w) < 2:
            assert abs(m.shape[0] / m.shape[1] - h / w) < 0.25 * h / w
    assert maps[0].shape == (16, 24) and maps[1].shape == (24, 16)


def test_batching_crops_the_padding(labeler):
    """An image batched with a same-size image equals its own run; with a larger one, same shape."""
    rng = np.random.default_rng(1)
    a, b = (rng.integers(0, 255, (100, 150, 3), dtype=np.uint8) for _ in range(2))
    large = rng.integers(0, 255, (200, 180, 3), dtype=np.uint8)
    alone = labeler([a])[0]
    assert np.array_equal(labeler([a, b])[0], alone)
    assert labeler([large, a])[1].shape == alone.shape


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
    import importlib.util
    spec = importlib.util.spec_from_file_location("bench", "benchmarks/instance_labeler.py")
    spec.loader.exec_module(importlib.util.module_from_spec(spec))
    from labeling.labelers.semantic import SemanticLabeler
    tiny = labeling.labelers.tiny_models.build_tiny_random_models(tempfile.mkdtemp())
    labeler = SemanticLabeler(tiny.semantic_model)
    print(labeler.classes[0], labeler.ignore_value, labeler([np.zeros((32, 48, 3), np.uint8)])[0].shape)
""")


def test_labelers_import_without_ray_or_datasets():
    env = dict(os.environ, PYTHONPATH=os.getcwd())
    done = subprocess.run([sys.executable, "-c", _IMPORT_SCRIPT], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "person" in done.stdout and " 255 " in done.stdout

"""The tiny random twins: deterministic, loadable through the real code paths, and useful (local masks)."""

import hashlib
import os

import numpy as np
import pytest
import torch
from segment_anything import SamAutomaticMaskGenerator

from labeling.labelers.checkpoints import load_sam
from labeling.labelers.tiny_models import (
    TINY_CLASSES,
    TINY_SAM_TYPE,
    TINY_THING_IDS,
    build_tiny_random_models,
    build_tiny_sam_random,
)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return build_tiny_random_models(str(tmp_path_factory.mktemp("tiny")))


def _digest(path):
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


def test_build_is_deterministic(tiny, tmp_path):
    again = build_tiny_random_models(str(tmp_path))
    first, second = torch.load(tiny.sam_checkpoint, weights_only=True), torch.load(again.sam_checkpoint, weights_only=True)
    assert first.keys() == second.keys()
    assert all(torch.equal(first[k], second[k]) for k in first)
    weights = "model.safetensors"
    assert _digest(os.path.join(tiny.semantic_model, weights)) == _digest(os.path.join(again.semantic_model, weights))
    other_seed = build_tiny_sam_random(seed=1).state_dict()
    assert any(not torch.equal(first[k], other_seed[k]) for k in first)


def test_tiny_sam_loads_through_load_sam(tiny):
    assert tiny.sam_model_type == TINY_SAM_TYPE
    sam = load_sam(tiny.sam_model_type, tiny.sam_checkpoint)
    reference = build_tiny_sam_random().state_dict()
    assert all(torch.equal(v, reference[k]) for k, v in sam.state_dict().items())
    assert not sam.training


def test_tiny_sam_gives_many_local_masks(tiny):
    """Plain random weights collapse to one image-wide mask under box NMS; the twin must not."""
    rng = np.random.default_rng(0)
    image = np.kron(rng.integers(0, 255, (8, 12, 3), dtype=np.uint8), np.ones((16, 16, 1), np.uint8))  # 128x192
    sam = load_sam(tiny.sam_model_type, tiny.sam_checkpoint)
    generator = SamAutomaticMaskGenerator(sam, points_per_side=8, pred_iou_thresh=0.0, stability_score_thresh=0.8)
    masks = generator.generate(image)
    areas = np.array([m["area"] for m in masks]) / image[..., 0].size
    assert len(masks) >= 15
    assert np.median(areas) < 0.2
    boxes = {tuple(np.round(m["bbox"])) for m in masks}
    assert len(boxes) == len(masks)


def test_tiny_semantic_loads_offline(tiny):
    from transformers import AutoImageProcessor, AutoModelForUniversalSegmentation

    model = AutoModelForUniversalSegmentation.from_pretrained(tiny.semantic_model)
    processor = AutoImageProcessor.from_pretrained(tiny.semantic_model)
    assert [model.config.id2label[i] for i in range(len(TINY_CLASSES))] == list(TINY_CLASSES)
    assert tuple(model.config.thing_ids) == TINY_THING_IDS
    pixels = processor(images=[np.zeros((40, 60, 3), np.uint8)], return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        out = model(pixel_values=pixels)
    assert out.class_queries_logits.shape[-1] == len(TINY_CLASSES) + 1  # + "no object"


def test_the_ade20k_twin_loads_through_the_real_code_with_ades_taxonomy(tmp_path):
    """The broader-taxonomy alternative's twin: ADE20K's 150 names, no thing_ids in its config, the
    panoptic benchmark's split from `class_taxonomy`, a uint8 map from `SemanticLabeler`."""
    from labeling.labelers.model_choice import ADE20K_SEMANTIC_MODEL, ModelChoice
    from labeling.labelers.semantic import SemanticLabeler, SemanticLabelerConfig
    from labeling.labelers.tiny_models import ADE20K_CLASS_NAMES, build_tiny_ade_semantic

    labeler = SemanticLabeler(build_tiny_ade_semantic(str(tmp_path / "ade")), SemanticLabelerConfig(shortest_edge=64))
    assert not hasattr(labeler.model.config, "thing_ids") or labeler.model.config.thing_ids is None
    assert [c.name for c in labeler.classes] == list(ADE20K_CLASS_NAMES) and len(labeler.classes) == 150
    things = {c.name for c in labeler.classes if c.isthing}
    assert len(things) == 100 and {"animal", "food", "plaything", "apparel", "person"} <= things
    assert not {"sky", "wall", "grass", "water", "tree"} & things
    image = np.random.default_rng(0).integers(0, 255, (48, 80, 3), dtype=np.uint8)
    (semantic,) = labeler([image])
    assert semantic.shape == (48, 80) and semantic.dtype == np.uint8 and semantic.max() < 150
    # `--models tiny-random --semantic-model <the ADE id>` runs on this twin, offline.
    choice = ModelChoice(preset="tiny-random", semantic_model=ADE20K_SEMANTIC_MODEL)
    assert [c.name for c in choice.semantic_classes()] == list(ADE20K_CLASS_NAMES)
    assert choice.describe()["semantic"]["name"] == "tiny-random mask2former (ade20k)"
    assert choice.materialize().describe()["semantic"]["name"] == "tiny-random mask2former (ade20k)"  # as the driver
    assert len(ModelChoice(preset="tiny-random").semantic_classes()) == len(TINY_CLASSES)

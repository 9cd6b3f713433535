"""An image's labels do not depend on the images it is batched with (issue: relabels must repeat).

Both labelers together, from encoded bytes, as a model actor runs them (`PairedLabeler`): eight
images of mixed sizes (in three semantic buckets, two input sizes padded into one, so images of
other sizes share semantic passes, and zero fillers complete the short ones; SAM prompts of several
images share decoder calls) labeled alone and in batches of 2, 4 and 8, in reduced precision (SAM
bf16, the semantic model float16) and in fp32 (and on a GPU where there is one). Every batching must
give the same masks and maps, bit for bit: every encoder call, decoder call and semantic pass has
the same shape whatever shares it.
Without the padding to fixed shapes, this test fails on CPU (masks differ in batches of 2).
"""

import io

import cv2
import numpy as np
import pytest
import skimage.data
from PIL import Image

from labeling.labelers.checkpoints import load_sam
from labeling.labelers.instance import InstanceLabeler, InstanceLabelerConfig
from labeling.labelers.paired import PairedLabeler
from labeling.labelers.semantic import SemanticLabeler, SemanticLabelerConfig
from labeling.labelers.tiny_models import build_tiny_random_models

pytestmark = pytest.mark.usefixtures("one_thread")

SIZES = [(120, 160), (160, 120), (120, 160), (100, 100), (72, 200), (120, 160), (150, 150), (160, 120)]


def _png(rgb: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def encoded():
    photos = [skimage.data.astronaut(), skimage.data.chelsea(), skimage.data.coffee(), skimage.data.rocket()]
    return [_png(cv2.resize(photos[i % 4][:, ::(-1) ** i], (w, h), interpolation=cv2.INTER_AREA))
            for i, (h, w) in enumerate(SIZES)]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return build_tiny_random_models(str(tmp_path_factory.mktemp("tiny")))


@pytest.mark.parametrize("device,bf16", [("cpu", True), ("cpu", False), pytest.param("cuda", True, marks=pytest.mark.gpu)],
                         ids=["cpu-bf16", "cpu-fp32", "cuda-bf16"])
def test_labels_are_the_same_alone_and_in_any_batch(tiny, encoded, device, bf16):
    sam = load_sam(tiny.sam_model_type, tiny.sam_checkpoint)
    instance = InstanceLabeler(sam, InstanceLabelerConfig(
        points_per_side=6, pred_iou_thresh=0.65, stability_score_thresh=0.8, encoder_batch_size=3,
        points_per_batch=48, bf16=bf16, bf16_on_cpu=bf16), device)  # 36 prompts an image: calls mix images
    semantic = SemanticLabeler(tiny.semantic_model, SemanticLabelerConfig(batch_size=2, shortest_edge=64,
                                                                          reduced_on_cpu=bf16), device)
    inputs = [semantic.prepare(np.zeros((h, w, 3), np.uint8)) for h, w in SIZES]
    assert len({item.input_size for item in inputs}) == 3 and len({item.content for item in inputs}) == 4
    labeler = PairedLabeler(instance, semantic, max_side=256, threads=2)
    alone = [labeler([data])[0] for data in encoded]
    assert sum(len(labels.masks) for labels in alone) >= 2 * len(encoded)
    assert len({labels.semantic.tobytes() for labels in alone}) == len(encoded)
    for size in (2, 4, 8):
        batched = [labels for start in range(0, len(encoded), size) for labels in labeler(encoded[start : start + size])]
        for one, other in zip(alone, batched):
            assert other.masks == one.masks, f"masks differ in batches of {size}"
            np.testing.assert_array_equal(other.semantic, one.semantic, err_msg=f"maps differ in batches of {size}")
    labeler.close()


def test_a_bad_file_fails_alone_and_the_batch_still_gets_labels(tiny, encoded):
    from dataset_card.contract.codecs import DecodeError

    sam = load_sam(tiny.sam_model_type, tiny.sam_checkpoint)
    instance = InstanceLabeler(sam, InstanceLabelerConfig(points_per_side=4, pred_iou_thresh=0.65,
                                                          stability_score_thresh=0.8))
    semantic = SemanticLabeler(tiny.semantic_model, SemanticLabelerConfig(shortest_edge=64))
    labeler = PairedLabeler(instance, semantic, max_side=256, threads=2)
    out = labeler([encoded[0], encoded[1][: len(encoded[1]) // 2], encoded[2]])
    assert isinstance(out[1], DecodeError)
    assert out[0].semantic.shape == SIZES[0] and out[2].semantic.shape == SIZES[2]
    assert out[0].masks == labeler([encoded[0]])[0].masks
    labeler.close()

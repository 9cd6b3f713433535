"""Stages without models or Ray: decode, post-processing, shard assembly and commit, journaled retries,
and the manifest's resume rules."""

import io
import json
import posixpath

import cv2
import datasets
import numpy as np
import pyarrow as pa
import pytest
from PIL import Image

from dataset_card import codecs, layout, painting, shards
from dataset_card.schema import arrow_schema
from dataset_card.synthetic import SEMANTIC_CLASSES
from labeling.labelers.model_input import decode, model_size
from labeling.pipeline import failures, manifest, writer
from labeling.pipeline.postprocess import PostprocessConfig, postprocess_stage, staged_schema, upsample_masks

CLASS_NAMES = ("class_a", "class_b")
SEMANTIC_NAMES = [c.name for c in SEMANTIC_CLASSES]
SCHEMA = staged_schema(CLASS_NAMES, SEMANTIC_NAMES)
CONTRACT = arrow_schema(CLASS_NAMES, SEMANTIC_NAMES)
THINGS = tuple(c.id for c in SEMANTIC_CLASSES if c.isthing)
POST = PostprocessConfig(num_semantic_classes=len(SEMANTIC_CLASSES), ignore_value=255, min_instance_area=4,
                         thing_ids=THINGS)


def jpeg(h: int, w: int, seed: int) -> bytes:
    rgb = np.random.default_rng(seed).integers(0, 255, size=(h, w, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="JPEG")
    return buf.getvalue()


def model_row(index: int, h: int = 40, w: int = 60, scale: int = 2, failed: str = "") -> dict:
    """A row as the semantic predictor emits it: fake instance masks at 1/scale of the image size, a
    whole thing (class 2, but for a strip of background) and a part of it; the class map at full size."""
    mh, mw = h // scale, w // scale
    whole = np.zeros((mh, mw), bool)
    whole[2:mh - 2, 3:mw - 3] = True
    part = np.zeros((mh, mw), bool)
    part[4:9, 5:12] = True
    masks = [{"rle": codecs.encode_rle(m), "bbox": [0, 0, 1, 1], "area": int(m.sum()), "predicted_iou": 0.9,
              "stability_score": 0.97} for m in (part, whole)]
    semantic = np.full((h, w), 2, np.uint8)
    semantic[:, :8] = 0
    return {
        "index": index, "shard": index // 3, "path": f"class_a/img{index}.jpg", "image_id": f"class_a/img{index}",
        "label": 0, "image_path": f"class_a/img{index}.jpg",
        "error_stage": failures.MODEL if failed else "", "error_type": failed,
        "error_message": "boom" if failed else "",
        "image_bytes": jpeg(h, w, index), "width": w, "height": h, "pixels_h": mh, "pixels_w": mw,
        "instances_json": json.dumps(masks), "semantic": semantic.tobytes(),
        "semantic_h": semantic.shape[0], "semantic_w": semantic.shape[1],
        "time_read": 0.1, "time_instance": 0.2, "time_semantic": 0.3,
    }


def staged(indices, failed=()) -> pa.Table:
    rows = [model_row(i, failed=failures.MODEL_FAILED if i in failed else "") for i in indices]
    return postprocess_stage(pa.Table.from_pylist(rows), POST, SCHEMA)


def test_model_size_and_decode_refuse_too_many_pixels():
    assert model_size(300, 400, 1024) == (300, 400)
    assert model_size(8000, 4000, 1024) == (1024, 512)
    assert model_size(1, 5000, 1024) == (1, 1024)
    pixels, w, h = decode(jpeg(30, 50, 0), max_pixels=10_000, max_side=20)
    assert (w, h) == (50, 30) and pixels.shape == (12, 20, 3)
    with pytest.raises(codecs.DecodeError, match="too large") as err:
        decode(jpeg(30, 50, 0), max_pixels=1000, max_side=20)
    assert failures.from_exception(failures.DECODE, err.value).error_type == failures.TOO_LARGE


def test_upsampled_masks_equal_a_full_resize():
    rng = np.random.default_rng(0)
    for (h, w), (big_h, big_w) in [((40, 60), (97, 143)), ((30, 50), (300, 500)), ((2, 3), (5, 7))]:
        for _ in range(10):
            m = np.zeros((h, w), bool)
            y, x = rng.integers(0, h), rng.integers(0, w)
            m[y : y + rng.integers(1, h + 1), x : x + rng.integers(1, w + 1)] = True
            m &= rng.random((h, w)) < 0.7
            if not m.any():
                continue
            got = codecs.decode_rle(upsample_masks([{"rle": codecs.encode_rle(m)}], big_h, big_w, chunk_rows=37)[0]["rle"])
            want = cv2.resize(m.astype(np.float32), (big_w, big_h), interpolation=cv2.INTER_LINEAR) > 0.5
            assert (got != want).sum() <= 2  # float rounding exactly at 0.5 only


def test_postprocess_gives_full_size_contract_rows():
    table = staged([0, 1], failed={1})
    ok, bad = table.to_pylist()
    assert ok["width"] == 60 and ok["height"] == 40
    semantic = codecs.decode_mask(ok["semantic_mask"]["bytes"])
    assert semantic.shape == (40, 60) and set(np.unique(semantic)) == {0, 2}
    painted = codecs.decode_mask(ok["instance_mask"]["bytes"])
    again = painting.paint_instances([dict(i) for i in ok["instances"]], semantic, THINGS, painting.RULES["objects"])
    np.testing.assert_array_equal(painted, again)
    assert [inst["area"] for inst in ok["instances"]] == [16 * 24 * 4, 5 * 7 * 4]  # 2x upsampled boxes
    assert [(i["level"], i["parent"]) for i in ok["instances"]] == [("object", 0), ("part", 1)]
    whole = codecs.decode_rle(ok["instances"][0]["rle"])
    np.testing.assert_array_equal(painted == 1, whole & (semantic == 2))  # the object, clipped to its class
    assert json.loads(ok["stat_levels"]) == {"object": 1, "part": 1, "stuff": 0, "dropped": 0}
    assert json.loads(ok["stat_figures"])["painted"] == 1
    assert ok["stat_instances"] == 2 and 0 < ok["stat_coverage"] < 1
    assert sum(ok["stat_semantic_counts"]) == 40 * 60
    assert ok["image"]["bytes"] == jpeg(40, 60, 0) and ok["image"]["path"] == "class_a/img0.jpg"
    assert bad["image"] is None and bad["error_type"] == failures.MODEL_FAILED and bad["stat_instances"] == 0


def test_assembler_dedupes_and_completes_shards_in_any_order():
    assembler = writer.ShardAssembler({0: [0, 1, 2], 1: [3, 4]})
    first = staged([4, 0])
    assert assembler.add(first) == []
    assert assembler.add(staged([0, 3])) == [1]  # index 0 again (a retried task) is ignored
    assert assembler.missing() == {0: {1, 2}, 1: set()}
    assert [r["index"] for r in assembler.take(1).to_pylist()] == [3, 4]
    assert assembler.add(staged([2, 1, 4])) == [0]  # 4 belongs to a shard already taken
    assert [r["index"] for r in assembler.take(0).to_pylist()] == [0, 1, 2]
    assert len(assembler) == 0


def test_committed_shards_load_typed_and_failed_inputs_are_in_errors(tmp_path):
    fs, root = shards.filesystem(str(tmp_path))
    result = writer.commit(fs, root, 0, 2, staged([0, 1, 2], failed={1}), CONTRACT)
    assert result.rows == 2 and result.errors_by_type == {failures.MODEL_FAILED: 1} and result.instances == 4
    empty = writer.commit(fs, root, 1, 2, staged([3, 4], failed={3, 4}), CONTRACT)  # every image failed
    assert empty.rows == 0
    ds = datasets.load_dataset(str(tmp_path), data_files={"train": layout.DATA_GLOB}, split="train")
    assert ds.num_rows == 2 and ds.features["label"].names == list(CLASS_NAMES)
    assert ds["image_id"] == ["class_a/img0", "class_a/img2"]
    errors = pa.concat_tables([writer.read_errors(fs, root, s, 2) for s in (0, 1)]).to_pylist()
    assert [(e["image_id"], e["stage"], e["error_type"]) for e in errors] == [
        (f"class_a/img{i}", failures.MODEL, failures.MODEL_FAILED) for i in (1, 3, 4)]
    stats = layout.ShardStats.from_json((tmp_path / layout.stats_path(0, 2)).read_text())
    assert stats.rows == 2 and stats.errors == 1 and stats.instances == 4
    assert stats.levels == {"object": 2, "part": 2, "stuff": 0, "dropped": 0} and stats.painted == 2
    assert stats.agreement_sum == 2.0 and stats.painted_nested == stats.painted_not_thing == 0
    assert sum(stats.semantic_pixels.values()) == 2 * 40 * 60
    assert not list(tmp_path.rglob(".*"))  # no temporary file is left behind


def test_retry_rewrite_merges_in_input_order_and_survives_a_crash_between_renames(tmp_path):
    fs, root = shards.filesystem(str(tmp_path))
    writer.commit(fs, root, 0, 1, staged([0, 1, 2, 3], failed={1, 2}), CONTRACT)
    shard_inputs = pa.table({"path": [f"class_a/img{i}.jpg" for i in range(4)],
                             "image_id": [f"class_a/img{i}" for i in range(4)], "index": list(range(4))})

    class CrashOnSecondRename:
        """The local filesystem, killed after the first rename of the rewrite."""

        def __init__(self, inner):
            self.inner, self.moves = inner, 0

        def __getattr__(self, name):
            return getattr(self.inner, name)

        def move(self, src, dst):
            if self.moves:
                raise KeyboardInterrupt("killed between renames")
            self.moves += 1
            self.inner.move(src, dst)

    with pytest.raises(KeyboardInterrupt):
        writer.commit_retried(CrashOnSecondRename(fs), root, 0, 1, staged([1, 2], failed={2}), CONTRACT, shard_inputs)
    assert writer.recover(fs, root) == 1  # the journal finishes the renames
    assert writer.recover(fs, root) == 0
    data = datasets.load_dataset(str(tmp_path), data_files={"train": layout.DATA_GLOB}, split="train")
    assert data["image_id"] == ["class_a/img0", "class_a/img1", "class_a/img3"]
    errors = writer.read_errors(fs, root, 0, 1).column("image_id").to_pylist()
    assert errors == ["class_a/img2"]
    stats = layout.ShardStats.from_json((tmp_path / layout.stats_path(0, 1)).read_text())
    assert (stats.rows, stats.errors) == (3, 1)
    assert not list(tmp_path.rglob(".*.rewrite"))


def test_manifest_resume_rules(tmp_path):
    fs, root = shards.filesystem(str(tmp_path / "out"))
    args = {"input": "/data/in", "shard_size": 10, "limit": None}
    models = {"instance": {"name": "sam", "sha256": "a"}, "semantic": {"name": "m2f", "sha256": None}}
    first = manifest.build(25, "hash", 10, args, models, {"read_batch_size": 16})
    assert first["num_shards"] == 3 and first["code_version"] == manifest.code_version()
    assert manifest.prepare(fs, root, first, overwrite=False, output="out") is False
    again = manifest.build(25, "hash", 10, args, models, {"read_batch_size": 64})  # execution may change
    assert manifest.prepare(fs, root, again, overwrite=False, output="out") is True
    changed = manifest.build(25, "hash", 10, {**args, "limit": 5}, {**models, "instance": {"name": "sam",
                                                                                          "sha256": "b"}})
    with pytest.raises(manifest.ResumeRefused, match=r"arguments.limit: None -> 5.*models.instance.sha256"):
        manifest.prepare(fs, root, changed, overwrite=False, output="out")
    (tmp_path / "out" / "data").mkdir()
    (tmp_path / "out" / "data" / "train-00000-of-00003.parquet").write_bytes(b"x")
    (tmp_path / "out" / "notes.txt").write_text("mine")
    assert manifest.prepare(fs, root, changed, overwrite=True, output="out") is False
    assert not (tmp_path / "out" / "data").exists() and (tmp_path / "out" / "notes.txt").exists()
    assert manifest.read(fs, root)["arguments"]["limit"] == 5
    (tmp_path / "out" / "manifest.json").unlink()
    (tmp_path / "out" / "data").mkdir()
    (tmp_path / "out" / "data" / "train-00000-of-00001.parquet").write_bytes(b"x")
    with pytest.raises(manifest.ResumeRefused, match="no manifest.json"):
        manifest.prepare(fs, root, first, overwrite=False, output="out")
    assert posixpath.basename(manifest.OWNED[0]) == "data"


def test_instance_count_check_warns_once_when_real_models_find_almost_nothing(capsys):
    from labeling.pipeline.summary import InstanceCountCheck

    check = InstanceCountCheck(enabled=True, min_images=10)
    assert check.add(writer.ShardResult(0, rows=6, instances=3)) is None  # too early to judge
    message = check.add(writer.ShardResult(1, rows=6, instances=2))
    assert message and "0.42 instances per image" in message and "WARNING" in capsys.readouterr().err
    assert check.add(writer.ShardResult(2, rows=6, instances=0)) is None  # once
    fine = InstanceCountCheck(enabled=True, min_images=10)
    assert fine.add(writer.ShardResult(0, rows=12, instances=40)) is None
    assert InstanceCountCheck(enabled=False).add(writer.ShardResult(0, rows=500, instances=0)) is None


def test_resource_layout_fits_the_cluster_or_says_what_to_change():
    from labeling.pipeline.cluster import ClusterError, plan_layout

    eight = plan_layout(cpus=64, gpus=8)
    assert (eight.gpus_per_actor, eight.instance_actors, eight.semantic_actors) == (1.0, 6, 2)
    one = plan_layout(cpus=8, gpus=1)  # both models share the only GPU
    assert (one.gpus_per_actor, one.instance_actors, one.semantic_actors) == (0.5, 1, 1)
    laptop = plan_layout(cpus=2, gpus=0)
    assert (laptop.gpus_per_actor, laptop.instance_actors, laptop.semantic_actors, laptop.threads) == (0, 2, 1, 1)
    assert (laptop.instance_actors + laptop.semantic_actors) * laptop.actor_cpus + laptop.task_cpus <= 2
    with pytest.raises(ClusterError, match="--gpus-per-actor"):
        plan_layout(cpus=8, gpus=1, gpus_per_actor=1.0)
    with pytest.raises(ClusterError, match="--actor-cpus"):
        plan_layout(cpus=2, gpus=0, actor_cpus=1.0)


def test_node_local_paths_are_refused_on_a_multi_node_cluster(tmp_path, monkeypatch):
    from labeling.pipeline import cluster

    nodes = [{"NodeID": "a", "NodeManagerAddress": "10.0.0.1"}, {"NodeID": "b", "NodeManagerAddress": "10.0.0.2"}]
    monkeypatch.setattr(cluster, "alive_nodes", lambda: nodes)
    probed = []

    def only_the_head_sees_it(found_nodes, path):
        probed.append(path)
        return [True, False]

    monkeypatch.setattr(cluster, "nodes_see", only_the_head_sees_it)
    with pytest.raises(cluster.ClusterError, match=r"--output .* local to this node: nodes 10.0.0.2 .* s3://"):
        cluster.check_shared(str(tmp_path / "out"), "--output", probe_write=True)
    assert probed and not list((tmp_path / "out").iterdir())  # the probe file is removed again
    monkeypatch.setattr(cluster, "nodes_see", lambda found_nodes, path: [True, True])
    cluster.check_shared(str(tmp_path / "out"), "--output", probe_write=True)  # a shared mount passes
    cluster.check_shared("s3://bucket/out", "--output", probe_write=True)  # URLs are shared by definition


def test_a_failing_batch_is_retried_image_by_image_and_failures_become_rows():
    from labeling.labelers.paired import ImageLabels
    from labeling.pipeline.predictors import MODELS_SCHEMA, ModelPredictor, run_each
    from labeling.pipeline.preprocess import DECODED_SCHEMA

    def labeler(images):  # the paired labeler's contract: labels, or the DecodeError of an image
        if any(data == b"poison" for data in images):
            raise RuntimeError("CUDA out of memory (pretend)")
        return [codecs.DecodeError("cannot decode image: truncated") if data == b"truncated" else
                ImageLabels([{"rle": codecs.encode_rle(np.ones((3, 4), bool)), "bbox": [0, 0, 1, 1], "area": 12,
                              "predicted_iou": 0.9, "stability_score": 0.9}], np.full((6, 8), 2, np.uint8), (3, 4),
                            {"decode": 0.5, "instance": 1.0, "semantic": 2.0})
                for data in images]

    results = run_each(labeler, [b"fine", b"poison"])
    assert isinstance(results[0], ImageLabels) and isinstance(results[1], RuntimeError)

    predictor = ModelPredictor.__new__(ModelPredictor)  # the actor class, with a fake model
    predictor.labeler = labeler
    rows = []
    for i, (data, listed_failure) in enumerate([(b"fine", ""), (b"poison", ""), (b"", failures.EMPTY_FILE),
                                                (b"truncated", "")]):
        rows.append({"index": i, "shard": 0, "path": f"p{i}", "image_id": f"p{i}", "label": 0, "image_path": f"p{i}",
                     "error_stage": failures.DECODE if listed_failure else "", "error_type": listed_failure,
                     "error_message": "empty" if listed_failure else "", "image_bytes": data, "width": 8,
                     "height": 6, "time_read": 0.25, "started_at": 0.0})
    out = predictor(pa.Table.from_pylist(rows, schema=DECODED_SCHEMA))
    assert out.schema.equals(MODELS_SCHEMA)
    good, poisoned, empty, truncated = out.to_pylist()
    assert len(json.loads(good["instances_json"])) == 1 and good["error_type"] == ""
    assert (good["semantic_h"], good["semantic_w"], good["pixels_h"], good["pixels_w"]) == (6, 8, 3, 4)
    assert good["semantic"] == np.full((6, 8), 2, np.uint8).tobytes()
    assert (good["time_read"], good["time_instance"], good["time_semantic"]) == (0.75, 1.0, 2.0)
    assert (poisoned["error_stage"], poisoned["error_type"]) == (failures.MODEL, failures.MODEL_FAILED)
    assert "out of memory" in poisoned["error_message"] and poisoned["instances_json"] == "[]"
    assert (empty["error_stage"], empty["error_type"]) == (failures.DECODE, failures.EMPTY_FILE)
    assert (truncated["error_stage"], truncated["error_type"]) == (failures.DECODE, failures.UNDECODABLE)


def test_a_broken_device_restarts_the_actor_instead_of_failing_images():
    """CUDA errors other than out-of-memory leave the device unusable for every later image: they
    propagate out of the model stage (Ray restarts the actor) instead of becoming failed rows."""
    from labeling.pipeline.predictors import run_each

    broken = RuntimeError("CUDA error: an illegal memory access was encountered")
    assert failures.is_fatal_device_error(broken)
    assert not failures.is_fatal_device_error(RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB"))
    assert not failures.is_fatal_device_error(ValueError("Image 0 must be an (H, W, 3) uint8 array"))
    calls = []

    def labeler(images):
        calls.append(len(images))
        raise broken

    with pytest.raises(RuntimeError, match="illegal memory access"):
        run_each(labeler, [b"a", b"b", b"c"])
    assert calls == [3]  # not retried image by image: no image is blamed

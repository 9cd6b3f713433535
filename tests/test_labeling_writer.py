"""Stages without models or Ray: decode, post-processing, parts and the commit that merges them,
journaled updates, keyed shards and the verified resume, and the manifest's resume rules."""

import io
import json
import posixpath

import cv2
import datasets
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from dataset_card.contract import codecs, coverage, images, layout, painting, shards
from dataset_card.contract.output_folder import OutputFolder
from dataset_card.contract.schema import arrow_schema
from dataset_card.synthetic.shapes import SEMANTIC_CLASSES
from labeling.inputs.input_list import Inputs, inputs_table
from labeling.labelers.model_input import decode, model_size
from labeling.pipeline import commits, environment, failures, manifest, plan, writer
from labeling.pipeline.postprocess import PostprocessConfig, postprocess_stage, staged_schema, upsample_masks

CLASS_NAMES = ("class_a", "class_b")
SEMANTIC_NAMES = [c.name for c in SEMANTIC_CLASSES]
SCHEMA = staged_schema(CLASS_NAMES, SEMANTIC_NAMES)
CONTRACT = arrow_schema(CLASS_NAMES, SEMANTIC_NAMES, image_reference=True)
FOOTER = {"run_id": "test-run", "manifest_sha256": "settings", "image_storage": "inline"}
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


def staged(indices, failed=(), shard=None) -> pa.Table:
    rows = [model_row(i, failed=failures.MODEL_FAILED if i in failed else "") for i in indices]
    if shard is not None:
        for row in rows:
            row["shard"] = shard
    return postprocess_stage(pa.Table.from_pylist(rows), POST, SCHEMA)


def listing(indices) -> Inputs:
    """An input list whose input i is class_a/img{i}.jpg (indices in the list are positions)."""
    entries = [(f"class_a/img{i}.jpg", f"class_a/img{i}", 0, f"class_a/img{i}.jpg") for i in indices]
    return Inputs(None, CLASS_NAMES, inputs_table(entries))


def job(output, indices, parts=(), todo=(), reuse=False, shard=0, num_shards=1, lost=None) -> writer.CommitJob:
    """The commit of `shard` whose inputs are class_a/img{i} for i in `indices` (input index = i)."""
    paths = [f"class_a/img{i}.jpg" for i in indices]
    inputs = pa.table({"path": paths, "image_id": [f"class_a/img{i}" for i in indices], "label": [0] * len(indices),
                       "index": pa.array(indices, pa.int64())})
    return writer.CommitJob(OutputFolder.open(output), shard, num_shards, inputs, plan.inputs_digest(paths), tuple(parts),
                            tuple(todo), CONTRACT, FOOTER, THINGS, reuse=reuse, lost=lost, check_lease=False)


def label_shard(output, indices, failed=(), shard=0, num_shards=1) -> writer.ShardResult:
    """Write parts for `indices` and commit them as `shard`, as a run does."""
    results = writer.write_parts(staged(indices, failed, shard), OutputFolder.open(output), "test-run")
    return writer.commit(job(output, indices, results.column("part").to_pylist(), indices, shard=shard,
                             num_shards=num_shards))


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
    # Coverage, measured from the painted map: one object, its region at the trainer's patch grid.
    assert (ok["stat_painted"], ok["stat_largest"]) == (1, "object")
    assert ok["stat_regions"] == coverage.regions(painted) == 1
    assert ok["stat_instances"] == 2 and 0 < ok["stat_coverage"] < 1
    assert sum(ok["stat_semantic_counts"]) == 40 * 60
    assert ok["image"]["bytes"] == jpeg(40, 60, 0) and ok["image"]["path"] == "class_a/img0.jpg"
    assert bad["image"] is None and bad["error_type"] == failures.MODEL_FAILED and bad["stat_instances"] == 0


def test_workers_write_parts_and_the_commit_keeps_each_input_once(tmp_path):
    folder = OutputFolder.open(tmp_path)
    first = writer.write_parts(staged([0, 1, 2], failed={1}, shard=0), folder, "test-run")
    again = writer.write_parts(staged([1, 2, 3, 4], failed={1}, shard=0), folder, "test-run")  # a retry
    # What the driver receives: part names and input indices, no image, mask or label data.
    assert first.schema.equals(writer.PART_SCHEMA) and first.nbytes < 200
    assert first.column("indices").to_pylist() == [[0, 1, 2]] and not any(first.column("error").to_pylist())
    tracker = commits.ShardTracker(5, {0: [0, 1, 2, 3, 4]})
    assert tracker.add(first) == [] and tracker.missing()[0].tolist() == [3, 4]
    assert tracker.add(again) == [0]
    parts, todo = tracker.take(0)
    assert len(parts) == 2 and todo.tolist() == [0, 1, 2, 3, 4]

    result = writer.commit(job(tmp_path, [0, 1, 2, 3, 4], parts, todo))
    assert (result.rows, result.errors_by_type, result.instances) == (4, {failures.MODEL_FAILED: 1}, 8)
    ds = datasets.load_dataset(str(tmp_path), data_files={"train": layout.DATA_GLOB}, split="train")
    assert ds["image_id"] == [f"class_a/img{i}" for i in (0, 2, 3, 4)]
    assert ds.features["label"].names == list(CLASS_NAMES)
    assert ds[0]["image_sha256"] == images.digest(jpeg(40, 60, 0)) and ds[0]["image_nbytes"] == len(jpeg(40, 60, 0))
    errors = folder.read_errors(0, 1).to_pylist()
    assert [(e["image_id"], e["stage"], e["error_type"]) for e in errors] == [
        ("class_a/img1", failures.MODEL, failures.MODEL_FAILED)]
    rows, footer = shards.read_footer(folder.fs, str(tmp_path / layout.data_path(0, 1)))
    assert footer["run_id"] == "test-run" and footer["manifest_sha256"] == "settings"
    assert (footer["rows"], footer["errors"], footer["inputs"], rows) == (4, 1, 5, 4)
    assert footer["inputs_sha256"] == plan.inputs_digest([f"class_a/img{i}.jpg" for i in range(5)])
    stats = layout.ShardStats.from_json((tmp_path / layout.stats_path(0, 1)).read_text())
    assert stats.rows == 4 and stats.errors == 1 and stats.instances == 8
    assert stats.levels == {"object": 4, "part": 4, "stuff": 0, "dropped": 0} and stats.painted == 4
    assert sum(stats.semantic_pixels.values()) == 4 * 40 * 60
    columns = pq.ParquetFile(tmp_path / layout.data_path(0, 1)).metadata.row_group(0)
    kinds = {columns.column(i).path_in_schema: columns.column(i).compression for i in range(columns.num_columns)}
    assert kinds["image.bytes"] == kinds["semantic_mask.bytes"] == "UNCOMPRESSED" and kinds["label"] == "ZSTD"
    assert not list((tmp_path / ".parts").iterdir())  # the shard's parts are gone (the run removes .parts)
    assert not [p for p in tmp_path.rglob(".*") if p.is_file()]  # so are temporary files


def test_an_update_reuses_rows_drops_gone_inputs_and_survives_a_crash_between_renames(tmp_path, monkeypatch):
    label_shard(tmp_path, [0, 1, 2, 3], failed={1, 2})
    # The rerun: input 3 is gone, input 5 is new, and failed input 2 is retried (now it labels).
    folder = OutputFolder.open(tmp_path)
    parts = writer.write_parts(pa.concat_tables([staged([2], shard=0), staged([5], failed={5}, shard=0)]),
                               folder, "run-2").column("part").to_pylist()
    fs, root = folder.fs, folder.root

    class CrashOnSecondRename:
        """The local filesystem, killed after the first rename of the rewrite."""

        def __init__(self, inner):
            self.inner, self.moves = inner, 0

        def __getattr__(self, name):
            return getattr(self.inner, name)

        def move(self, src, dst):
            if src.endswith(".rewrite") and self.moves:
                raise KeyboardInterrupt("killed between renames")
            self.moves += src.endswith(".rewrite")
            self.inner.move(src, dst)

    crashing = OutputFolder(str(tmp_path), CrashOnSecondRename(fs), root)
    with pytest.raises(KeyboardInterrupt):
        writer.commit(job(crashing, [0, 1, 2, 5], parts, [2, 5], reuse=True))
    assert shards.recover(folder) == 1  # the journal finishes the renames
    assert shards.recover(folder) == 0
    data = datasets.load_dataset(str(tmp_path), data_files={"train": layout.DATA_GLOB}, split="train")
    assert data["image_id"] == ["class_a/img0", "class_a/img2"]
    assert folder.read_errors(0, 1).column("image_id").to_pylist() == ["class_a/img1", "class_a/img5"]
    stats = layout.ShardStats.from_json((tmp_path / layout.stats_path(0, 1)).read_text())
    assert (stats.rows, stats.errors, stats.instances) == (2, 2, 4)  # reused rows' statistics recomputed
    _, footer = shards.read_footer(fs, f"{root}/{layout.data_path(0, 1)}")
    assert (footer["rows"], footer["errors"], footer["inputs"]) == (2, 2, 4)
    assert not list(tmp_path.rglob("*.rewrite"))


def test_shards_are_hash_buckets_so_new_inputs_touch_only_their_shards():
    listed = listing(range(1000))
    before = plan.assign(listed, 8)
    assert sum(len(s.indices) for s in before) == 1000 and min(len(s.indices) for s in before) > 90
    assert all(list(s.indices) == sorted(s.indices) for s in before)  # input order inside a shard
    assert [s.digest for s in plan.assign(listed, 8)] == [s.digest for s in before]  # deterministic
    grown = listing([*range(1000), 5000, 5001, 5002])
    after = plan.assign(grown, 8)
    changed = [s.index for s, t in zip(before, after) if s.digest != t.digest]
    ids = grown.table.column("image_id").to_pylist()
    assert sorted(set(plan.shard_of(ids[-3:], 8).tolist())) == changed


def test_resume_trusts_a_shard_only_when_its_files_agree_with_its_footer(tmp_path):
    label_shard(tmp_path, [0, 1, 2, 3], failed={1})
    folder = OutputFolder.open(tmp_path)
    listed = listing(range(4))
    shard = plan.assign(listed, 1)[0]

    def state(shard=shard, listed=listed, retry=False, settings="settings"):
        return plan.inspect(folder, shard, 1, listed, settings, retry)

    assert state() is None  # committed and verified
    retried = state(retry=True)
    assert (retried.todo, retried.reuse, retried.damaged, retried.reason) == ([1], True, False, "")
    grown = listing(range(5))
    changed = state(plan.assign(grown, 1)[0], grown)
    assert changed.todo == [4] and changed.reason == "its inputs changed (1 new, 0 gone)" and not changed.damaged
    assert "other settings" in state(settings="other").reason

    errors_file = tmp_path / layout.errors_path(0, 1)
    saved = errors_file.read_bytes()
    errors_file.unlink()  # errors/ deleted by hand: the failed input is labeled again, the rows are kept
    repaired = state()
    assert (repaired.todo, repaired.reuse, repaired.damaged) == ([1], True, True)
    assert repaired.reason == "its errors table is missing"
    with pytest.raises(plan.RepairRefused, match="errors table is missing.*without --no-repair"):
        plan.make_plan(folder, listed, 1, "settings", retry_errors=False, no_repair=True)
    errors_file.write_bytes(saved)

    data_file = tmp_path / layout.data_path(0, 1)
    whole = data_file.read_bytes()
    data_file.write_bytes(whole[: len(whole) // 2])  # truncated: relabeled from scratch
    broken = state()
    assert broken.todo == [0, 1, 2, 3] and not broken.reuse and broken.reason.startswith("its data file cannot be read")
    data_file.unlink()
    gone = state()
    assert gone.todo == [0, 1, 2, 3] and "deleted by hand" in gone.reason


def test_manifest_resume_rules(tmp_path):
    folder = OutputFolder.open(tmp_path / "out")
    args = {"shard_size": 10, "min_instance_area": 16}
    models = {"instance": {"name": "sam", "sha256": "a"}, "semantic": {"name": "m2f", "sha256": None}}
    first = manifest.build(25, "hash", 10, args, models, {"read_batch_size": 16, "limit": None}, ("a", "b"))
    assert first["num_shards"] == 3 and first["code_version"] == manifest.code_version()
    assert manifest.prepare(folder, first, overwrite=False) == (False, first)
    # Speed settings, --limit and the inputs may change; the shard count stays the folder's.
    again = manifest.build(40, "other", 10, args, models, {"read_batch_size": 64, "limit": 40}, ("a", "b"))
    resumed, used = manifest.prepare(folder, again, overwrite=False)
    assert resumed and used["num_shards"] == 3 and used["num_inputs"] == 40
    assert manifest.labels_hash(used) == manifest.labels_hash(first)
    repainted = {**first, "arguments": {**args, "painting_rule": "parts"}}  # a repaint keeps shards trusted
    assert manifest.labels_hash(repainted) == manifest.labels_hash(first)
    with pytest.raises(manifest.ResumeRefused, match="would make its shards hold about 67 images"):
        manifest.prepare(folder, manifest.build(200, "h", 10, args, models, {}, ("a", "b")), False)
    with pytest.raises(manifest.ResumeRefused, match="classes.sha256"):
        manifest.prepare(folder, manifest.build(25, "h", 10, args, models, {}, ("a", "c")), False)
    changed = manifest.build(25, "hash", 10, args, {**models, "instance": {"name": "sam", "sha256": "b"}},
                             {}, ("a", "b"))
    with pytest.raises(manifest.ResumeRefused, match=r"models.instance.sha256: 'a' -> 'b'"):
        manifest.prepare(folder, changed, overwrite=False)
    assert manifest.labels_hash(changed) != manifest.labels_hash(first)
    (tmp_path / "out" / "data").mkdir()
    (tmp_path / "out" / "data" / "train-00000-of-00003.parquet").write_bytes(b"x")
    (tmp_path / "out" / "notes.txt").write_text("mine")
    (tmp_path / "out" / "card.json").write_text('{"license": "mit"}')  # what the earlier run told its card
    assert manifest.prepare(folder, changed, overwrite=True)[0] is False
    assert not (tmp_path / "out" / "data").exists() and (tmp_path / "out" / "notes.txt").exists()
    assert not (tmp_path / "out" / "card.json").exists()
    assert manifest.read(folder)["models"]["instance"]["sha256"] == "b"
    (tmp_path / "out" / "manifest.json").unlink()
    (tmp_path / "out" / "data").mkdir()
    (tmp_path / "out" / "data" / "train-00000-of-00001.parquet").write_bytes(b"x")
    with pytest.raises(manifest.ResumeRefused, match="no manifest.json"):
        manifest.prepare(folder, first, overwrite=False)
    assert posixpath.basename(manifest.OWNED[0]) == "data"


def test_the_label_code_covers_only_code_that_shapes_labels():
    from labeling.pipeline.labels_version import LABEL_CODE

    covered = [entry.split("/")[-1] for entry in LABEL_CODE]
    assert "postprocess.py" in covered and "painting.py" in covered and "labelers" in covered
    assert not {"driver.py", "writer.py", "sections.py", "card.py", "summary.py", "environment.py",
                "labels_version.py"} & set(covered)


def test_each_shard_footer_lists_the_environments_that_made_its_rows(tmp_path):
    before = {"python": "3.11.7", "torch": "2.3.0+cu121", "gpu": "NVIDIA A100-SXM4-80GB", "compile": False}
    after = {"python": "3.11.9", "torch": "2.3.0+cu124", "gpu": "NVIDIA H100 80GB HBM3", "compile": False}

    def made_in(table: pa.Table, env: dict) -> pa.Table:  # rows as a model actor in `env` tags them
        column = pa.array([environment.encode(env)] * table.num_rows, pa.string())
        return table.set_column(table.schema.get_field_index("environment"), "environment", column)

    def commit(indices, todo, env, reuse=False) -> list[dict]:
        folder = OutputFolder.open(tmp_path)
        parts = writer.write_parts(made_in(staged(todo, shard=0), env), folder, "test-run").column("part")
        writer.commit(job(tmp_path, indices, parts.to_pylist(), todo, reuse=reuse))
        return shards.read_footer(folder.fs, str(tmp_path / layout.data_path(0, 1)))[1]["environments"]

    assert commit([0, 1, 2], [0, 1, 2], before) == [before]
    # A resume under newer libraries on other GPUs labels a new input: the shard keeps rows of both.
    assert sorted(commit([0, 1, 2, 3], [3], after, reuse=True), key=str) == sorted([before, after], key=str)
    assert commit([0, 1, 2, 3], [0, 1, 2, 3], after, reuse=True) == [after]  # every row relabeled
    assert writer.environments([], staged([4])) == []  # rows no actor tagged (lost ones) name none


def test_instance_count_check_warns_once_when_real_models_find_almost_nothing(capsys):
    from labeling.pipeline.finish import InstanceCountCheck

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

    eight = plan_layout(cpus=64, gpus=8)  # one actor per GPU, each with both models: no GPU waits
    assert (eight.gpus_per_actor, eight.model_actors) == (1.0, 8)
    one = plan_layout(cpus=8, gpus=1)  # two actors share the only GPU
    assert (one.gpus_per_actor, one.model_actors) == (0.5, 2)
    laptop = plan_layout(cpus=2, gpus=0)
    assert (laptop.gpus_per_actor, laptop.model_actors, laptop.threads) == (0, 2, 1)
    assert laptop.model_actors * laptop.actor_cpus + laptop.task_cpus <= 2
    with pytest.raises(ClusterError, match="--gpus-per-actor"):
        plan_layout(cpus=8, gpus=1, gpus_per_actor=1.0, model_actors=2)
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
            raise RuntimeError("mat1 and mat2 shapes cannot be multiplied (pretend)")
        return [codecs.DecodeError("cannot decode image: truncated") if data == b"truncated" else
                ImageLabels([{"rle": codecs.encode_rle(np.ones((3, 4), bool)), "bbox": [0, 0, 1, 1], "area": 12,
                              "predicted_iou": 0.9, "stability_score": 0.9}], np.full((6, 8), 2, np.uint8), (3, 4),
                            {"decode": 0.5, "instance": 1.0, "semantic": 2.0}, semantic_fillers=3)
                for data in images]

    results = run_each(labeler, [b"fine", b"poison"])
    assert isinstance(results[0], ImageLabels) and isinstance(results[1], RuntimeError)

    predictor = ModelPredictor.__new__(ModelPredictor)  # the actor class, with a fake model
    predictor.labeler = labeler
    predictor.environment = environment.encode(environment.collect("cpu", compiled=False))
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
    assert (good["count_semantic_fillers"], poisoned["count_semantic_fillers"]) == (3, 0)
    assert (poisoned["error_stage"], poisoned["error_type"]) == (failures.MODEL, failures.MODEL_FAILED)
    assert "shapes cannot be multiplied" in poisoned["error_message"] and poisoned["instances_json"] == "[]"
    assert (empty["error_stage"], empty["error_type"]) == (failures.DECODE, failures.EMPTY_FILE)
    assert (truncated["error_stage"], truncated["error_type"]) == (failures.DECODE, failures.UNDECODABLE)
    assert {row["environment"] for row in (good, poisoned, empty, truncated)} == {predictor.environment}


def test_the_compile_flag_reaches_the_instance_labelers_config():
    from labeling.labelers.instance import InstanceLabelerConfig
    from labeling.pipeline.driver import LabelingConfig, model_choice
    from labeling.run import config_from_args, parser

    cfg = config_from_args(parser().parse_args(["--input", "in", "--output", "out", "--models", "default", "--compile"]))
    assert cfg.compile and model_choice(cfg).instance_params["compile"] is True
    assert InstanceLabelerConfig(**model_choice(cfg).instance_params).compile
    assert "compile" not in model_choice(LabelingConfig(input="in", output="out")).instance_params

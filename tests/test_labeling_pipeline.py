"""The Ray pipeline end to end with the tiny random models (one session-wide local Ray):
skimage photos and a zoo of odd inputs, --retry-errors, a Parquet export with --limit, refused
resumes, the repair of a damaged folder, the failure-rate stop, a labels-only release trained on
with --images, and the restart of a model actor after a fatal device error."""

import hashlib
import importlib.metadata
import io
import json
import os
import shutil
import tempfile
from pathlib import Path

import datasets
import numpy as np
import pyarrow.parquet as pq
import pytest
from huggingface_hub import DatasetCard
from PIL import Image

from dataset_card.card.source import CardOptions
from dataset_card.contract import codecs, layout
from dataset_card.contract.output_folder import OutputFolder
from dataset_card.contract.schema import validate_features
from dataset_card.validate import row_problems, validate
from labeling.inputs.kinds import list_inputs
from labeling.pipeline import environment, failures, manifest, plan
from labeling.pipeline.driver import LabelingConfig, run_labeling

pytestmark = [pytest.mark.ray, pytest.mark.slow]

PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field", "immunohistochemistry")

# Small Ray resources so read, two actor pools and post-processing all fit on 2 CPUs.
SMALL = {"models": "tiny-random", "model_actors": 2, "actor_cpus": 0.5, "task_cpus": 0.5,
         "model_batch_size": 4,
         "read_batch_size": 4, "postprocess_batch_size": 4, "progress": False}


def encode(rgb: np.ndarray | Image.Image, fmt: str, **kw) -> bytes:
    img = rgb if isinstance(rgb, Image.Image) else Image.fromarray(rgb)
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def photo(name: str) -> np.ndarray:
    import skimage.data

    rgb = getattr(skimage.data, name)()
    return np.repeat(rgb[:, :, None], 3, axis=2) if rgb.ndim == 2 else rgb[:, :, :3]


def write_photos(root: Path, names=PHOTOS, cls: str = "a_photos") -> None:
    """The skimage colour photos as an ImageFolder class (one as WebP, one as BMP)."""
    (root / cls).mkdir(parents=True, exist_ok=True)
    formats = {0: ("webp", "WEBP"), 1: ("bmp", "BMP")}
    for i, name in enumerate(names):
        ext, fmt = formats.get(i, ("jpg", "JPEG"))
        (root / cls / f"{name}.{ext}").write_bytes(encode(photo(name), fmt))


def write_zoo(root: Path) -> dict[str, tuple[str, str] | None]:
    """Odd inputs -> expected (stage, error_type), or None when they must be labeled."""
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 255, size=(37, 53, 3), dtype=np.uint8)
    jpeg = encode(rgb, "JPEG")
    files = {
        "b_odd/cmyk.jpg": (encode(Image.fromarray(rgb).convert("CMYK"), "JPEG"), None),
        "b_odd/gray.png": (encode(rgb[:, :, 0], "PNG"), None),
        "b_odd/gray16.png": (encode(Image.fromarray(rgb[:, :, 0].astype(np.uint16) * 257), "PNG"), None),
        "b_odd/palette.png": (encode(Image.fromarray(rgb).convert("P"), "PNG"), None),
        "b_odd/rgba.png": (encode(Image.fromarray(np.dstack([rgb, rgb[:, :, :1]])), "PNG"), None),
        "b_odd/one_pixel.png": (encode(rgb[:1, :1], "PNG"), None),
        "c_bad/empty.jpg": (b"", (failures.DECODE, failures.EMPTY_FILE)),
        "c_bad/huge.png": (encode(np.zeros((1000, 1200, 3), np.uint8), "PNG"), (failures.DECODE, failures.TOO_LARGE)),
        "c_bad/notes.png": (b"these are notes, not a picture\n" * 20, (failures.DECODE, failures.UNDECODABLE)),
        "c_bad/truncated.jpg": (jpeg[: len(jpeg) // 2], (failures.DECODE, failures.UNDECODABLE)),
        "d_dup/z.jpg": (jpeg, None),
        "d_dup/z.png": (encode(rgb, "PNG"), (failures.LIST, failures.DUPLICATE_ID)),
    }
    expected = {}
    for rel, (data, outcome) in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
        expected[rel] = outcome
    return expected


def load(output: Path) -> datasets.Dataset:
    """load_dataset with a fresh cache: a copied folder keeps its files' mtimes, which the cache keys on."""
    return datasets.load_dataset(str(output), split="train", cache_dir=tempfile.mkdtemp(prefix="hf-cache-"))


def read_output(output: Path):
    rows = load(output).with_format("arrow")[:].to_pylist()
    error_files = sorted((output / "errors").glob("errors-*.parquet"))
    errors = [e for f in error_files for e in pq.read_table(f).to_pylist()]
    return rows, errors


def assert_exactly_once(output: Path, input_root: Path) -> tuple[list[dict], list[dict]]:
    """Every listed input is in the data or in the errors table, once; nothing else is."""
    rows, errors = read_output(output)
    paths = sorted(str(p.relative_to(input_root)) for p in input_root.rglob("*") if p.is_file())
    seen = [r["image"]["path"] for r in rows] + [e["path"] for e in errors]
    assert sorted(seen) == paths
    assert not [p for p in output.rglob("*") if p.name.endswith(".tmp") or p.name.endswith(".rewrite")]
    return rows, errors


def check_rows(rows: list[dict], output: Path) -> None:
    metadata = layout.DatasetMetadata.from_json((output / layout.METADATA_FILE).read_text())
    for row in rows:
        h, w = row["height"], row["width"]
        semantic = codecs.decode_mask(row["semantic_mask"]["bytes"])
        instance_map = codecs.decode_mask(row["instance_mask"]["bytes"])
        assert semantic.shape == (h, w) and instance_map.shape == (h, w)
        assert codecs.decode_image(row["image"]["bytes"]).shape == (h, w, 3)
        assert row_problems(row, metadata) == []  # the map is the painting rule's, the invariants hold
        assert all(inst["rle"]["size"] == [h, w] for inst in row["instances"])
        assert [inst["id"] for inst in row["instances"]] == list(range(1, len(row["instances"]) + 1))


ZOO_LOG: list[str] = []  # what the zoo run printed


@pytest.fixture(scope="module")
def zoo_run(tmp_path_factory, ray_session):
    root = tmp_path_factory.mktemp("zoo")
    images, output = root / "train", root / "out"
    write_photos(images)
    expected = write_zoo(images)
    cfg = LabelingConfig(input=str(images), output=str(output), shard_size=4, max_pixels=1_000_000,
                         card=CardOptions(pretty_name="Zoo", license="cc-by-4.0"), **SMALL)
    stats = run_labeling(cfg, log=ZOO_LOG.append)
    return cfg, images, output, expected, stats


def test_end_to_end_photos_load_typed_and_aligned(zoo_run):
    cfg, images, output, _, stats = zoo_run
    rows, _ = assert_exactly_once(output, images)
    ds = load(output)
    validate_features(ds.features)
    assert ds.features["label"].names == ["a_photos", "b_odd", "c_bad", "d_dup"]
    photos = [r for r in rows if r["image_id"].startswith("a_photos/")]
    assert sorted(r["image_id"] for r in photos) == sorted(f"a_photos/{n}" for n in PHOTOS)
    assert {r["label"] for r in photos} == {0}
    astronaut = next(r for r in photos if r["image_id"] == "a_photos/astronaut")
    assert (astronaut["width"], astronaut["height"]) == (512, 512)
    assert astronaut["image"]["bytes"] == (images / "a_photos" / "astronaut.webp").read_bytes()  # never re-encoded
    check_rows(rows, output)
    assert sum(len(r["instances"]) for r in photos) >= len(photos)  # the twins give masks, not nothing
    metadata = layout.DatasetMetadata.from_json((output / "metadata.json").read_text())
    assert metadata.class_names == ("a_photos", "b_odd", "c_bad", "d_dup") and metadata.num_semantic_classes == 6
    for row in rows:
        semantic = codecs.decode_mask(row["semantic_mask"]["bytes"])
        assert semantic.max() < metadata.num_semantic_classes
        for inst in row["instances"]:
            assert 0 <= inst["category_id"] < 6 and 0 < inst["category_purity"] <= 1
            assert inst["area"] >= 16 and 0 <= inst["visible_area"] <= inst["area"]
    saved = json.loads((output / "manifest.json").read_text())
    assert saved["num_inputs"] == 18 and saved["num_shards"] == 5 and saved["shard_size"] == 4
    assert saved["models"]["instance"]["checkpoint"] == "tiny-random"
    assert saved["code_version"] == manifest.code_version() and saved["labels_version"] == manifest.LABELS_VERSION
    assert saved["software"]["torch"] and saved["software"]["transformers"] and saved["software"]["pycocotools"]
    assert saved["models"]["semantic"]["revision"] is None  # a local folder: its sha256 names it
    assert saved["models"]["semantic"]["params"]["shortest_edge"] == 128
    assert metadata.painting.name == "objects"
    report = validate(str(output), full=True)  # the duplicate id's failure beside its labeled twin is no fault
    assert report.ok, report.format()
    assert report.figures.painted > 0 and report.figures.nested == 0 and report.figures.mean_agreement == 1.0
    levels = {}
    for row in rows:
        for inst in row["instances"]:
            levels[inst["level"]] = levels.get(inst["level"], 0) + 1
    assert set(levels) >= {"object", "stuff"}, levels
    on_disk = json.loads((output / "stats.json").read_text())
    assert on_disk == stats
    assert (stats["inputs"], stats["written"], stats["failed"]) == (18, 13, 5)
    assert stats["instances"] == sum(len(r["instances"]) for r in rows)
    assert set(stats["stage_time_s"]) >= {"read", "instance", "semantic", "postprocess", "commit"}
    assert stats["counts"] == {"semantic_fillers": 0}  # one image a semantic pass on CPUs: never a filler
    assert stats["images_per_s"] > 0 and 0 < stats["driver_bytes_per_image"] < 1000
    here = environment.collect("cpu", compiled=False)  # the model actors (Ray workers) ran this software
    software = ("python", "torch", "transformers", "segment-anything", "numpy", "c2fmae", "compile")
    for path in (output / "data").iterdir():  # what the run trusts on resume is in each footer
        footer = json.loads(pq.read_schema(path).metadata[b"c2fmae"])
        assert footer["rows"] == pq.ParquetFile(path).metadata.num_rows
        assert footer["rows"] + footer["errors"] == footer["inputs"] and footer["image_storage"] == "inline"
        for made_in in footer["environments"]:  # and what made its rows (an empty shard: nothing)
            assert {k: made_in[k] for k in software} == {k: here[k] for k in software} and made_in["device"]
        assert len(footer["environments"]) == (1 if footer["inputs"] else 0)
    assert "The environments that made the labels" in (output / "README.md").read_text()
    shard_stats = [layout.ShardStats.from_json(p.read_text()) for p in sorted((output / "stats").glob("*.json"))]
    assert sum(s.rows for s in shard_stats) == 13 and sum(s.instances for s in shard_stats) == stats["instances"]
    assert "data/train-*.parquet" in (output / "README.md").read_text()


def test_the_card_says_what_it_was_told_and_the_closing_line_names_the_errors_table(zoo_run):
    _, _, output, _, _ = zoo_run
    card = DatasetCard.load(output / "README.md")
    assert (card.data.pretty_name, card.data.license, card.data.source_datasets) == ("Zoo", "cc-by-4.0", None)
    assert card.text.strip().split("\n\n")[1].startswith("> **These labels are meaningless.**")  # tiny-random
    assert json.loads((output / layout.CARD_OPTIONS_FILE).read_text()) == {"pretty_name": "Zoo",
                                                                           "license": "cc-by-4.0"}
    closing = ZOO_LOG[-1]
    assert closing.startswith("labeled 13 of 18 inputs, 5 failed (")
    assert closing.endswith(f"the failed inputs and why: {output}/errors/ (datasets.load_dataset('{output}', 'errors'))")


def test_bad_inputs_are_labeled_or_recorded_with_stage_and_reason(zoo_run):
    _, images, output, expected, stats = zoo_run
    rows, errors = read_output(output)
    by_path = {r["image"]["path"]: r for r in rows}
    recorded = {e["path"]: (e["stage"], e["error_type"]) for e in errors}
    for rel, outcome in expected.items():
        if outcome is None:
            assert rel in by_path, f"{rel} should be labeled"
        else:
            assert recorded.get(rel) == outcome, rel
    assert all(e["message"] for e in errors)
    assert (by_path["b_odd/one_pixel.png"]["width"], by_path["b_odd/one_pixel.png"]["height"]) == (1, 1)
    for name in ("cmyk.jpg", "gray.png", "gray16.png", "palette.png", "rgba.png"):
        assert (by_path[f"b_odd/{name}"]["width"], by_path[f"b_odd/{name}"]["height"]) == (53, 37)
    assert stats["failed_by_type"] == {failures.DUPLICATE_ID: 1, failures.EMPTY_FILE: 1, failures.TOO_LARGE: 1,
                                       failures.UNDECODABLE: 2}
    for path in (output / "data").iterdir():  # a shard of failures only commits with no row group at all
        metadata = pq.ParquetFile(path).metadata
        assert metadata.num_row_groups == (1 if metadata.num_rows else 0)
    assert not (output / ".parts").exists() and not (output / layout.LEASE_FILE).exists()


def test_retry_errors_relabels_only_failed_inputs(zoo_run, tmp_path):
    cfg, images, output, _, _ = zoo_run
    images2, output2 = tmp_path / "train", tmp_path / "out"
    shutil.copytree(images, images2)
    shutil.copytree(output, output2)
    fixed = encode(np.full((20, 30, 3), 120, np.uint8), "PNG")
    (images2 / "c_bad" / "notes.png").write_bytes(fixed)  # the user fixed one file
    before = {p.name: p.stat().st_mtime_ns for p in (output2 / "data").iterdir()}
    with_failures = sorted(p.name.replace("errors-", "train-") for p in (output2 / "errors").iterdir()
                           if pq.ParquetFile(p).metadata.num_rows)
    cfg2 = LabelingConfig(**{**cfg.__dict__, "input": str(images2), "output": str(output2), "retry_errors": True})
    stats = run_labeling(cfg2, log=lambda m: None)
    rows, errors = assert_exactly_once(output2, images2)
    check_rows(rows, output2)
    assert "c_bad/notes.png" in {r["image"]["path"] for r in rows}
    assert "c_bad/notes.png" not in {e["path"] for e in errors}
    assert (stats["written"], stats["failed"]) == (14, 4)
    after = {p.name: p.stat().st_mtime_ns for p in (output2 / "data").iterdir()}
    changed = sorted(name for name in after if after[name] != before[name])
    assert changed == with_failures  # only shards that had failures are rewritten


def test_parquet_export_with_limit_and_refused_resume(tmp_path, ray_session, monkeypatch):
    """An ImageNet-style Parquet export (Image + ClassLabel columns) as the input; --limit; resume rules."""
    folder, export, output = tmp_path / "photos", tmp_path / "export", tmp_path / "out"
    write_photos(folder, PHOTOS[:5], cls="x")
    files = sorted((folder / "x").iterdir())
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=["cat", "dog"])})
    table = datasets.Dataset.from_dict({"image": [{"bytes": f.read_bytes(), "path": f"x/{f.name}"} for f in files],
                                        "label": [i % 2 for i in range(len(files))]}, features=features)
    (export / "data").mkdir(parents=True)
    table.to_parquet(str(export / "data" / "train-00000-of-00001.parquet"), batch_size=2)
    cfg = LabelingConfig(input=str(export), output=str(output), shard_size=2, limit=3, **SMALL)
    stats = run_labeling(cfg, log=lambda m: None)
    rows, errors = read_output(output)
    rows = sorted(rows, key=lambda r: r["image_id"])  # shards are hash buckets; rows in input order inside one
    assert [r["image"]["path"] for r in rows] == [f"x/{f.name}" for f in files[:3]] and not errors
    assert [r["image_id"] for r in rows] == [f"x/{f.stem}" for f in files[:3]]
    assert [r["label"] for r in rows] == [0, 1, 0]
    assert rows[1]["image"]["bytes"] == files[1].read_bytes()
    assert load(output).features["label"].names == ["cat", "dog"]
    assert stats["inputs"] == 3 and len(list((output / "data").iterdir())) == 2
    with pytest.raises(manifest.ResumeRefused, match="arguments.shard_size: 2 -> 3"):
        run_labeling(LabelingConfig(**{**cfg.__dict__, "shard_size": 3}), log=lambda m: None)
    with pytest.raises(manifest.ResumeRefused, match="arguments.min_instance_area: 16 -> 20"):
        run_labeling(LabelingConfig(**{**cfg.__dict__, "min_instance_area": 20}), log=lambda m: None)
    messages = []
    again = run_labeling(LabelingConfig(**{**cfg.__dict__, "model_batch_size": 2}), log=messages.append)
    assert any("resuming: 2 shards already committed" in m for m in messages)  # batch sizes may change
    assert again["processed"] == 0 and again["written"] == 3
    assert not [m for m in messages if m.startswith("warning")]  # and are not warned about
    real = importlib.metadata.version
    with monkeypatch.context() as m:  # a newer torch build on the driver: resumed, with one warning
        m.setattr(importlib.metadata, "version", lambda name: "2.9.9+cu999" if name == "torch" else real(name))
        messages.clear()
        run_labeling(LabelingConfig(**cfg.__dict__), log=messages.append)
        warned = [m for m in messages if m.startswith("warning")]
        assert len(warned) == 1 and "software.torch" in warned[0] and "+cu999" in warned[0], messages
        with pytest.raises(manifest.ResumeRefused, match="--strict-environment was given"):
            run_labeling(LabelingConfig(**{**cfg.__dict__, "strict_environment": True}), log=lambda m: None)
    # One more input: only its shard is updated, and only the new image goes through the models.
    more = run_labeling(LabelingConfig(**{**cfg.__dict__, "limit": 4}), log=messages.append)
    assert more["processed"] == 1 and more["written"] == 4 and more["inputs"] == 4
    assert any("its inputs changed (1 new, 0 gone); labeling 1 of its inputs again" in m for m in messages)
    rows, _ = read_output(output)
    assert sorted(r["image"]["path"] for r in rows) == [f"x/{f.name}" for f in files[:4]]


def test_a_truncated_shard_and_a_deleted_errors_table_are_repaired_and_the_folder_validates(zoo_run, tmp_path):
    cfg, images, output, _, _ = zoo_run
    output2 = tmp_path / "out"
    shutil.copytree(output, output2)
    data_files = sorted((output2 / "data").iterdir())
    labeled = max(data_files, key=lambda p: pq.ParquetFile(p).metadata.num_rows)
    labeled.write_bytes(labeled.read_bytes()[: labeled.stat().st_size // 2])  # a disk fault, half a file
    shutil.rmtree(output2 / "errors")  # deleted by hand: which inputs failed, and why, is gone
    messages = []
    stats = run_labeling(LabelingConfig(**{**cfg.__dict__, "output": str(output2)}), log=messages.append)
    assert any(f"{layout.DATA_DIR}/{labeled.name}: its data file cannot be read" in m and "relabeling it" in m
               for m in messages), messages
    assert any("its errors table is missing; labeling" in m for m in messages)
    assert validate(str(output2)).ok  # the run checked it too before its closing line
    rows, errors = assert_exactly_once(output2, images)
    assert (stats["written"], stats["failed"]) == (13, 5) == (len(rows), len(errors))
    assert stats["failed_by_type"] == {failures.DUPLICATE_ID: 1, failures.EMPTY_FILE: 1, failures.TOO_LARGE: 1,
                                       failures.UNDECODABLE: 2}
    card = (output2 / "README.md").read_text()
    assert "| failed | 5 |" in card and "`undecodable` | 2" in card  # from the errors tables, as stats.json


def test_too_many_failures_stop_the_run_and_keep_what_was_committed(tmp_path, ray_session):
    images, output = tmp_path / "train", tmp_path / "out"
    (images / "bad").mkdir(parents=True)
    for i in range(60):
        (images / "bad" / f"{i:02d}.jpg").write_bytes(b"")  # a systematic fault: nothing decodes
    cfg = LabelingConfig(input=str(images), output=str(output), shard_size=2, failure_window=4,
                         max_failure_rate=0.5, **SMALL)
    with pytest.raises(failures.FailureRateExceeded, match=r"of the last \d+ images failed \(100%: empty_file"):
        run_labeling(cfg, log=lambda m: None)
    committed = sorted((output / "data").iterdir())
    assert 2 <= len(committed) < 20  # of 30: it stopped early, and what it committed stays committed
    folder = OutputFolder.open(output)
    saved = json.loads((output / "manifest.json").read_text())
    listed = list_inputs(str(images))
    for shard in plan.assign(listed, 30):
        if (output / layout.data_path(shard.index, 30)).exists():
            assert plan.inspect(folder, shard, 30, listed, manifest.labels_hash(saved), False) is None
    assert not (output / ".parts").exists() and not list(output.rglob("*.tmp"))
    assert not (output / layout.LEASE_FILE).exists()


def test_a_labels_only_release_loads_and_trains_from_the_original_images(tmp_path, ray_session, capsys):
    from pretraining.train import main as train_main

    images, output = tmp_path / "train", tmp_path / "out"
    write_photos(images, PHOTOS[:4])
    cfg = LabelingConfig(input=str(images), output=str(output), shard_size=2, image_storage="reference", **SMALL)
    run_labeling(cfg, log=lambda m: None)
    ds = load(output)  # no cast: a labels-only `image` is a plain {bytes, path} struct, read without the files
    assert ds.num_rows == 4 and set(ds.column_names) >= {"semantic_mask", "instance_mask", "instances", "label",
                                                         "image_sha256", "image_nbytes"}
    row = ds[0]
    assert row["image"]["bytes"] is None and (images / row["image"]["path"]).exists()
    assert row["image_sha256"] == hashlib.sha256((images / row["image"]["path"]).read_bytes()).hexdigest()
    assert codecs.decode_mask(row["semantic_mask"]["bytes"]).shape == (row["height"], row["width"])  # as usual
    assert sum(p.stat().st_size for p in (output / "data").iterdir()) < sum(
        p.stat().st_size for p in (images / "a_photos").iterdir())  # no image bytes in the release
    assert "Labels only." in (output / "README.md").read_text()
    fast = ["--set", "epochs=1", "--set", "data.batch_size=2", "--set", "data.num_workers=0", "--set",
            "figure_every=0", "--set", "checkpoint_every=100", "--no-progress"]
    assert train_main(["--data", str(output), "--images", str(images), "--output", str(tmp_path / "run"), *fast]) == 0
    assert train_main(["--data", str(output), "--output", str(tmp_path / "run2"), *fast]) == 2
    assert "stores no image bytes (a labels-only release)" in capsys.readouterr().err
    victim = images / "a_photos" / "coffee.jpg"
    victim.write_bytes(victim.read_bytes() + b"edited")
    assert train_main(["--data", str(output), "--images", str(images), "--output", str(tmp_path / "run3"), *fast]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error: image ") and "coffee.jpg has" in err and "changed since labeling" in err


@pytest.mark.filterwarnings("ignore:.*ray_remote_args.* is deprecated")
def test_a_fatal_device_error_restarts_the_actor_and_retries_the_batch(tmp_path, ray_session):
    import ray

    marker = str(tmp_path / "first-actor-pid")

    class FlakyDevice:
        """Its first call ever poisons the 'CUDA context'; the predictors' batch loop handles it."""

        def __call__(self, batch):
            from labeling.pipeline.predictors import run_each

            def model(items):
                if not os.path.exists(marker):
                    with open(marker, "w") as f:
                        f.write(str(os.getpid()))
                    raise RuntimeError("CUDA error: an illegal memory access was encountered")
                return items

            out = run_each(model, batch["id"].tolist())
            return {"id": np.array(out), "pid": np.full(len(out), os.getpid())}

    ds = ray.data.range(8, override_num_blocks=2).map_batches(
        FlakyDevice, batch_size=4, compute=ray.data.ActorPoolStrategy(size=1), num_cpus=0.5,
        **failures.ACTOR_RETRIES)
    rows = ds.take_all()
    assert sorted(int(r["id"]) for r in rows) == list(range(8))  # every image labeled, none blamed
    first = int(open(marker).read())
    assert all(int(r["pid"]) != first for r in rows)  # by a new actor process

"""`python -m dataset_card build`: the card of a small labeled folder loads with `DatasetCard.load`
and `load_dataset`, reports the run's statistics and provenance, and embeds pictures that exist."""

import io
import json
import re
import shutil

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from huggingface_hub import DatasetCard
from PIL import Image

from dataset_card.__main__ import main
from dataset_card.card import gallery
from dataset_card.card.build import BuildConfig, build_card
from dataset_card.card.readme import size_category
from dataset_card.card.run_summary import bin_labels, read_summary
from dataset_card.card.source import CardOptions, card_config, is_imagenet_1k
from dataset_card.contract import codecs, layout
from dataset_card.contract.output_folder import OutputFolder
from dataset_card.contract.schema import validate_features
from dataset_card.synthetic.shapes import write_synthetic_dataset

NUM_IMAGES, NUM_SHARDS, GALLERY = 12, 3, 4
MANIFEST = {
    "schema_version": 1, "num_inputs": NUM_IMAGES + 1, "inputs_hash": "ab" * 32, "num_shards": NUM_SHARDS,
    "shard_size": 4, "arguments": {"input": "/data/imagenet/train", "models": "default"},
    "models": {
        "instance": {"name": "sam_vit_h", "checkpoint": "sam_vit_h_4b8939.pth", "sha256": "a7bf3b02" * 8,
                     "params": {"pred_iou_thresh": 0.88, "stability_score_thresh": 0.95, "points_per_side": 32}},
        "semantic": {"name": "facebook/mask2former-swin-large-coco-panoptic", "checkpoint": "model.safetensors",
                     "sha256": None, "params": {}},
    },
    "code_version": "0123abc", "created": "2026-03-14T09:26:53+00:00",
}
RUN_STATS = {"inputs": NUM_IMAGES + 1, "written": NUM_IMAGES, "failed": 1, "failed_by_type": {"decode": 1},
             "wall_time_s": 5432.0, "images_per_s": 0.0022, "stage_time_s": {"model": 5000.0}, "gpu_hours": 12.5,
             "billed_gpu_hours": 20.0}
QUALITY = {"instance_mask_ap": 0.4123, "semantic": {"miou": 0.55, "pixel_accuracy": 0.8}}


def add_failed_input(root, shard: int, image_id: str) -> None:
    """One failed input in `shard`, recorded as the labeler does (errors table and statistics)."""
    errors = pa.Table.from_pylist([{"image_id": image_id, "path": f"{image_id}.JPEG", "label": 1, "stage": "decode",
                                    "error_type": "decode", "message": "cannot decode image"}],
                                  schema=layout.ERRORS_SCHEMA)
    pq.write_table(errors, root / layout.errors_path(shard, NUM_SHARDS))
    stats = layout.ShardStats.from_json((root / layout.stats_path(shard, NUM_SHARDS)).read_text())
    stats.add_error("decode")
    (root / layout.stats_path(shard, NUM_SHARDS)).write_text(stats.to_json())


@pytest.fixture(scope="module")
def labeled(tmp_path_factory):
    """A finished run: rows, one failure, manifest and run statistics as `labeling` writes them, a quality file."""
    root = tmp_path_factory.mktemp("labeled")
    write_synthetic_dataset(str(root), num_images=NUM_IMAGES, num_shards=NUM_SHARDS, size=(48, 64), seed=1)
    add_failed_input(root, 1, "many_shapes/broken")
    (root / layout.MANIFEST_FILE).write_text(json.dumps(MANIFEST))
    (root / layout.RUN_STATS_FILE).write_text(json.dumps(RUN_STATS))
    (root / "quality.json").write_text(json.dumps(QUALITY))
    return root


@pytest.fixture(scope="module")
def built(labeled):
    told = CardOptions(source_datasets=("extended|imagenet-1k",))  # synthetic classes: ImageNet only when told
    readme = build_card(str(labeled), BuildConfig(told, gallery_size=GALLERY, dataset=str(labeled)))
    return labeled, readme, (labeled / layout.CARD_FILE).read_text()


def test_card_yaml_loads_with_huggingface_hub(built):
    root, readme, _ = built
    assert readme == str(root / layout.CARD_FILE)
    data = DatasetCard.load(readme).data
    assert data.annotations_creators == ["machine-generated"]
    assert data.license == "other" and data.license_name and data.license_link
    assert data.size_categories == ["n<1K"]
    assert data.source_datasets == ["extended|imagenet-1k"]
    assert "image-segmentation" in data.task_categories and data.pretty_name
    assert [c["config_name"] for c in data.configs] == ["default", "errors"]


def test_load_dataset_gives_typed_rows_and_the_errors_config(built):
    root, _, _ = built
    ds = datasets.load_dataset(str(root), split="train")
    validate_features(ds.features)
    assert len(ds) == NUM_IMAGES
    errors = datasets.load_dataset(str(root), "errors", split="train")
    assert errors["image_id"] == ["many_shapes/broken"]
    assert errors.features["label"].int2str(errors[0]["label"]) == "many_shapes"


def test_no_errors_config_without_failures(tmp_path):
    write_synthetic_dataset(str(tmp_path), num_images=4, num_shards=2, size=(24, 32))
    data = DatasetCard.load(build_card(str(tmp_path), BuildConfig(gallery_size=1))).data
    assert [c["config_name"] for c in data.configs] == ["default"]
    assert len(datasets.load_dataset(str(tmp_path), split="train")) == 4


def test_body_states_provenance_statistics_quality_and_citations(built):
    root, _, text = built
    stats = read_summary(str(root)).stats
    assert stats.rows == NUM_IMAGES and stats.errors == 1
    for expected in [
        "sam_vit_h_4b8939.pth", "a7bf3b02" * 8, "`pred_iou_thresh` | 0.88", "`0123abc`", "2026-03-14T09:26:53",
        "1 h 30 min", "| GPU-hours in the models | 12.50 |", "| GPU-hours billed | 20.00 |", f"{stats.instances:,} instances",
        "| labeled | 12 | 92.3% |", "| failed | 1 | 7.7% |", "| `decode` | 1 |",
        "| images | " + " | ".join(map(str, stats.instances_per_image)) + " |",
        "| instances | " + " | ".join(map(str, stats.purity)) + " |",
        "| painted objects | " + " | ".join(f"{c:,}" for c in stats.painted_per_image) + " |",
        "| instance regions | " + " | ".join(f"{c:,}" for c in stats.regions_per_image) + " |",
        "painted objects (the ids in `instance_mask`", "every kept mask (objects, parts, stuff and dropped)",
        "| `instance_mask_ap` | 0.4123 |", "| `semantic.miou` | 0.55 |",
        "arXiv:2603.09955", "{Segment Anything}", "Masked-attention Mask Transformer", "Microsoft COCO",
        "ImageNet Large Scale Visual Recognition Challenge", "ImageNet terms of access",
        "https://huggingface.co/facebook/mask2former-swin-large-coco-panoptic",
    ]:
        assert expected in text, expected
    for column in ("image_id", "label", "image", "semantic_mask", "instance_mask", "instances", "category_purity"):
        assert f"| `{column}` |" in text
    # Semantic classes ranked by pixels as the shard statistics count them.
    background = stats.semantic_pixels["0"] / stats.pixels
    assert f"| background | 0 | stuff | {100 * background:.1f}% | 100.0% |" in text


def test_embedded_pictures_exist_and_the_gallery_has_a_row_per_sample(built):
    root, _, text = built
    links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", text)
    assert sorted(links) == sorted(f"assets/{n}" for n in
                                   ("gallery.png", "instances_per_image.png", "coverage.png", "purity.png",
                                    "semantic_classes.png", "masking_coverage.png"))
    sizes = {link: Image.open(root / link).size for link in links}
    width, height = sizes["assets/gallery.png"]
    assert width == 1200 and height == round(100 * (3.2 * GALLERY + 1.0))


def test_gallery_decodes_only_its_sample(labeled, tmp_path, monkeypatch):
    folder = shutil.copytree(labeled, tmp_path / "copy")
    calls = []
    original = codecs.decode_mask
    monkeypatch.setattr(codecs, "decode_mask", lambda data: calls.append(1) or original(data))
    build_card(str(folder), BuildConfig(gallery_size=2))
    assert len(calls) == 2 * 2  # semantic and instance map of each sampled row; statistics decode nothing


def test_sample_rows_is_seeded_spans_shards_and_matches_the_files(labeled):
    summary = read_summary(str(labeled))
    args = (OutputFolder.open(labeled), summary.data_files, summary.rows_per_file)
    rows = gallery.sample_rows(*args, num=6, seed=0)
    assert [r["image_id"] for r in rows] == [r["image_id"] for r in gallery.sample_rows(*args, num=6, seed=0)]
    assert [r["image_id"] for r in rows] != [r["image_id"] for r in gallery.sample_rows(*args, num=6, seed=1)]
    assert len({r["file"] for r in rows}) > 1 and len({r["image_id"] for r in rows}) == 6
    for r in rows:
        assert pq.read_table(labeled / r["file"], columns=["image_id"])["image_id"][r["row"]].as_py() == r["image_id"]
    assert len(gallery.sample_rows(*args, num=100, seed=0)) == NUM_IMAGES


def test_usage_snippets_run_against_the_folder(built):
    _, _, text = built
    namespace = {}
    for block in re.findall(r"```python\n(.*?)```", text, flags=re.S):
        exec(compile(block, "README.md", "exec"), namespace)
    assert namespace["mask"].shape == namespace["instance_map"].shape
    assert namespace["errors"][0]["error_type"] == "decode"


def test_overlays_tint_only_labeled_pixels():
    rgb = np.full((6, 8, 3), 100, np.uint8)
    semantic = np.full((6, 8), 255, np.int64)
    semantic[:3] = 1
    out = gallery.semantic_overlay(rgb, semantic, gallery.class_palette(4))
    assert (out[3:] == 100).all() and (out[:3] != 100).any(axis=-1).all()
    instances = np.zeros((6, 8), np.int64)
    instances[1:4, 1:4] = 1
    edges = gallery.instance_boundaries(instances)
    assert edges[3, 1] and edges[1, 3] and not edges[2, 2] and not edges[5, 7]
    out = gallery.instance_overlay(rgb, instances, np.random.default_rng(0))
    assert (out[~edges & (instances == 0)] == 100).all() and (out[edges] == 255).all()
    assert len({tuple(c) for c in gallery.class_palette(20)}) == 20 and gallery.class_palette(300).shape == (300, 3)


def test_size_category_and_bin_labels():
    assert [size_category(n) for n in (0, 999, 1000, 1_281_167, 10**7)] == [
        "n<1K", "n<1K", "1K<n<10K", "1M<n<10M", "10M<n<100M"]
    assert bin_labels(layout.INSTANCE_COUNT_EDGES)[:4] == ["0", "1", "2-4", "5-9"]
    assert bin_labels(layout.INSTANCE_COUNT_EDGES)[-1] == "≥200"
    assert bin_labels(layout.FRACTION_EDGES, percent=True)[0] == "0-10%"


def test_a_card_claims_no_dataset_or_licence_it_was_not_told(tmp_path):
    write_synthetic_dataset(str(tmp_path), num_images=4, num_shards=1, size=(24, 32))
    readme = build_card(str(tmp_path), BuildConfig(gallery_size=0))
    data, text = DatasetCard.load(readme).data, (tmp_path / layout.CARD_FILE).read_text()
    assert data.license == "unknown" and data.source_datasets is None and "license_name" not in data.to_dict()
    assert "imagenet" not in data.pretty_name.lower()
    for claim in ("ImageNet terms", "image-net.org", "ImageNet Large Scale", "imagenet-1k"):
        assert claim not in text, claim
    assert "was not told where the images come from" in text and "--license ID" in text
    assert not (tmp_path / layout.CARD_OPTIONS_FILE).exists()  # nothing told, nothing recorded


def test_imagenet_is_recognised_by_its_1000_synsets_or_when_told():
    from timm.data import ImageNetInfo

    synsets = ImageNetInfo().label_names()  # the class folders of ImageNet-1K's train and val splits
    assert len(synsets) == 1000 and synsets[0] == "n01440764"
    assert is_imagenet_1k(synsets) and is_imagenet_1k(list(reversed(synsets)))
    assert not is_imagenet_1k(synsets[:999]) and not is_imagenet_1k(synsets[:999] + ["n99999999"])
    assert card_config(synsets).source_datasets == ("extended|imagenet-1k",)
    assert card_config(synsets).license_name == "imagenet-terms-of-access"
    assert card_config(["cat", "dog"]) == card_config([])  # claims nothing
    told = card_config(["cat", "dog"], CardOptions(source_datasets=("extended|imagenet-1k",)))
    assert told == card_config(synsets)
    assert card_config(["cat"], CardOptions(source_datasets=("ILSVRC/imagenet-1k",))).license_name is not None
    other = card_config(synsets, CardOptions(source_datasets=("org/my-photos",)))  # told: not ImageNet after all
    assert (other.license, other.source_datasets) == ("unknown", ("org/my-photos",))
    mine = card_config(synsets, CardOptions(pretty_name="Mine", license="cc-by-4.0"))
    assert (mine.pretty_name, mine.license, mine.license_name, mine.license_link) == ("Mine", "cc-by-4.0", None, None)
    assert mine.source_datasets == ("extended|imagenet-1k",)


def test_a_tiny_random_card_says_its_labels_are_meaningless_first(labeled, tmp_path):
    folder = shutil.copytree(labeled, tmp_path / "copy")
    manifest = {**MANIFEST, "arguments": {**MANIFEST["arguments"], "models": "tiny-random"}}
    (folder / layout.MANIFEST_FILE).write_text(json.dumps(manifest))
    build_card(str(folder), BuildConfig(gallery_size=0))
    card = DatasetCard.load(folder / layout.CARD_FILE)
    assert card.data.pretty_name.endswith("[tiny-random models: meaningless labels]")
    title, warning = card.text.strip().split("\n\n")[:2]
    assert title.startswith("# ") and warning.startswith("> **These labels are meaningless.**")
    assert "--models tiny-random" in warning


def test_cli_build_and_user_errors(labeled, tmp_path, capsys):
    folder = shutil.copytree(labeled, tmp_path / "copy")
    (folder / layout.CARD_OPTIONS_FILE).unlink(missing_ok=True)
    assert main(["build", str(folder), "--gallery-size", "1", "--pretty-name", "Shapes", "--license", "cc-by-4.0",
                 "--source-dataset", "org/shapes"]) == 0
    assert Image.open(io.BytesIO((folder / "assets" / "gallery.png").read_bytes())).format == "PNG"
    assert main(["build", str(folder), "--gallery-size", "0"]) == 0  # what was told is kept (OUTPUT/card.json)
    data = DatasetCard.load(folder / layout.CARD_FILE).data
    assert (data.pretty_name, data.license, data.source_datasets) == ("Shapes", "cc-by-4.0", ["org/shapes"])
    assert "Licence: `cc-by-4.0`." in (folder / layout.CARD_FILE).read_text()
    assert main(["build", str(folder), "--gallery-size", "0", "--pretty-name", "Shapes 2"]) == 0
    assert json.loads((folder / layout.CARD_OPTIONS_FILE).read_text()) == {
        "pretty_name": "Shapes 2", "license": "cc-by-4.0", "source_datasets": ["org/shapes"]}
    capsys.readouterr()
    shutil.rmtree(folder / "assets")
    (folder / "assets").write_text("a file where the pictures go")
    assert main(["build", str(folder), "--gallery-size", "1"]) == 2
    assert capsys.readouterr().err == (f"error: cannot write {folder}/assets/gallery.png (File exists): a file "
                                       "stands where a folder must be: move it away\n")
    assert main(["build", str(tmp_path / "missing")]) == 2
    (folder / layout.METADATA_FILE).unlink()
    assert main(["build", str(folder)]) == 2
    err = capsys.readouterr().err
    assert "does not exist" in err and "Traceback" not in err


def test_the_card_lists_the_environments_that_made_the_labels():
    from dataset_card.card.provenance import environments_table
    from dataset_card.card.run_summary import environments

    a100 = {"python": "3.11.7", "torch": "2.3.0+cu121", "gpu": "NVIDIA A100", "compile": False}
    cpu = {"python": "3.11.9", "torch": "2.3.0+cpu", "gpu": None, "compile": False}
    found = environments([{"environments": [a100]}, {"environments": [cpu, a100]}, {}])  # {}: an older file
    assert found == ((a100, 2), (cpu, 1))
    text = environments_table(found)
    assert "|  | 2 data files | 1 data file |" in text
    assert "| `gpu` | `NVIDIA A100` | - |" in text and "| `compile` | off | off |" in text
    assert "| `torch` | `2.3.0+cu121` | `2.3.0+cpu` |" in text

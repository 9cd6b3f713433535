"""A release people can load and look at: a labels-only folder loads with `load_dataset` without its
images (and still trains), `publish` writes the shareable copy (no leftovers, no internal paths,
viewable maps) and its dry-run lists it, `show` draws one image's labels at the image's size."""

import hashlib
import io
import json
import shutil
from pathlib import Path

import datasets
import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from dataset_card.__main__ import main
from dataset_card.card import gallery
from dataset_card.contract import codecs, layout
from dataset_card.contract.schema import SCHEMA_METADATA_KEY
from dataset_card.synthetic.shapes import write_synthetic_dataset
from dataset_card.validate import validate
from pretraining.data.augment import AugmentConfig
from pretraining.data.loader import DataConfig, PretrainingLoader, SampleSpec, open_labeled_dataset
from pretraining.models.masking import MaskingConfig

SIZE = (48, 56)  # (H, W) of the synthetic images


@pytest.fixture(scope="module")
def labels_only(tmp_path_factory) -> tuple[Path, Path]:
    """(labels-only folder, the image folder it refers to)."""
    root = tmp_path_factory.mktemp("release")
    write_synthetic_dataset(str(root / "out"), num_images=6, num_shards=2, size=SIZE, seed=3,
                            image_root=str(root / "images"))
    return root / "out", root / "images"


def load(folder: Path) -> datasets.Dataset:
    return datasets.load_dataset(str(folder), split="train", download_mode="force_redownload")


def test_a_labels_only_folder_loads_without_its_images(labels_only, tmp_path):
    out, images = labels_only
    moved = tmp_path / "copy"
    shutil.copytree(out, moved)  # away from the images: nothing may try to open them
    row = load(moved)[0]
    assert row["image"]["bytes"] is None and row["image"]["path"] == f"{row['image_id']}.png"
    assert row["image_sha256"] == hashlib.sha256((images / row["image"]["path"]).read_bytes()).hexdigest()
    assert row["image_nbytes"] == (images / row["image"]["path"]).stat().st_size
    assert codecs.decode_mask(row["semantic_mask"]["bytes"]).shape == SIZE
    # The data files say so too, without the card (`load_dataset("parquet", ...)` reads only them).
    files = sorted(str(p) for p in (moved / "data").iterdir())
    bare = datasets.load_dataset("parquet", data_files=files, split="train")
    assert bare[0]["image"] == {"bytes": None, "path": row["image"]["path"]}


def _as_image_feature(folder: Path) -> None:
    """Rewrite `folder`'s data files declaring `image` a `datasets.Image` (how labels-only files were
    written before), keeping every value and the contract metadata."""
    for path in (folder / "data").iterdir():
        table = pq.read_table(path)
        features = datasets.Features.from_arrow_schema(table.schema)
        features["image"] = datasets.Image()
        meta = {**table.schema.metadata, b"huggingface": features.arrow_schema.metadata[b"huggingface"]}
        pq.write_table(table.replace_schema_metadata(meta), path)
        assert SCHEMA_METADATA_KEY in pq.read_schema(path).metadata


def _first_batch(folder: Path, images: Path | None) -> dict:
    spec = SampleSpec(img_size=32, patch_size=8, modalities=("semantic", "instance", "rgb"),
                      masking=MaskingConfig(num_visible=12, num_positions=16), augment=AugmentConfig(),
                      ignore_value=255, seed=3, epochs=1)
    loader = PretrainingLoader(open_labeled_dataset(str(folder), images=str(images) if images else None), spec,
                               DataConfig(batch_size=6, num_workers=0, shuffle_buffer=6), 0, 1, (0, 0))
    return next(iter(loader)).to(torch.device("cpu"))


def test_training_reads_a_labels_only_folder_in_either_image_feature(labels_only, tmp_path):
    out, images = labels_only
    write_synthetic_dataset(str(tmp_path / "inline"), num_images=6, num_shards=2, size=SIZE, seed=3)
    expected = _first_batch(tmp_path / "inline", None)
    older = tmp_path / "older"
    shutil.copytree(out, older)
    _as_image_feature(older)
    for folder in (out, older):
        batch = _first_batch(folder, images)
        assert set(batch) == set(expected)
        for key, value in expected.items():
            assert torch.equal(batch[key], value), key


@pytest.fixture
def with_leftovers(labels_only, tmp_path) -> Path:
    """The labels-only folder as a crashed run leaves it, its manifest naming internal places."""
    out = tmp_path / "out"
    shutil.copytree(labels_only[0], out)
    (out / layout.LEASE_FILE).write_text('{"host": "node-7"}')
    (out / layout.parts_dir(1)).mkdir(parents=True)
    (out / layout.parts_dir(1) / "part-0.parquet").write_bytes(b"half")
    (out / layout.temporary_path(layout.data_path(0, 2), "abc")).write_bytes(b"half")
    manifest = json.loads((out / layout.MANIFEST_FILE).read_text())
    manifest["execution"] = {"input": str(labels_only[1]), "output": str(out), "address": "10.0.0.5:6379",
                             "sam_checkpoint": "s3://models/sam_vit_h_4b8939.pth", "listing_workers": 32}
    (out / layout.MANIFEST_FILE).write_text(json.dumps(manifest))
    return out


def test_publish_dry_run_lists_the_release_without_leftovers_or_internal_paths(with_leftovers, tmp_path, capsys):
    dest = tmp_path / "release"
    assert main(["publish", str(with_leftovers), str(dest), "--dry-run"]) == 0
    listing = capsys.readouterr().out
    assert not dest.exists()  # a dry-run writes nothing
    written, _, left_out = listing.partition("left out")
    names = [line.split()[0] for line in written.splitlines()[1:]]
    assert "manifest.json" in names and "README.md" in names and len([n for n in names if n.startswith("data/")]) == 2
    assert not [n for n in names if n.startswith(".") or "/." in n or n.startswith("/")]
    assert ".lease.json" in left_out and ".parts/" in left_out and ".tmp" in left_out
    assert str(with_leftovers) not in listing  # (DEST, the user's own argument, heads the listing)


def test_publish_writes_a_release_that_loads_shows_its_maps_and_names_no_internal_place(with_leftovers, tmp_path,
                                                                                       capsys):
    dest = tmp_path / "release"
    assert main(["publish", str(with_leftovers), str(dest), "--workers", "2"]) == 0
    assert "left out 3" in capsys.readouterr().out
    files = [p for p in dest.rglob("*") if p.is_file()]
    assert not [p for p in files if any(part.startswith(".") for part in p.relative_to(dest).parts)]
    for path in files:
        if path.suffix in (".json", ".md"):
            text = path.read_text()
            assert str(tmp_path) not in text and "s3://" not in text and "10.0.0.5" not in text, path
    execution = json.loads((dest / layout.MANIFEST_FILE).read_text())["execution"]
    assert execution == {"input": "<redacted>/images", "output": "<redacted>/out", "address": "<redacted>",
                         "sam_checkpoint": "<redacted>/sam_vit_h_4b8939.pth", "listing_workers": 32}
    row = load(dest)[0]
    assert row["image"]["bytes"] is None  # still labels only
    semantic = codecs.decode_mask(row["semantic_mask"]["bytes"])
    preview = row["semantic_preview"]  # a PIL image: what the Hub's viewer draws
    assert preview.mode == "P" and np.array_equal(np.asarray(preview), semantic)
    assert np.array_equal(np.asarray(row["instance_preview"]), codecs.decode_mask(row["instance_mask"]["bytes"]))
    assert validate(str(dest), full=True).ok  # and the release is still a labeled folder the trainer reads


def test_publish_refuses_a_folder_that_is_not_empty_or_lies_inside_the_output(labels_only, tmp_path, capsys):
    (tmp_path / "dest").mkdir()
    (tmp_path / "dest" / "x").write_text("mine")
    assert main(["publish", str(labels_only[0]), str(tmp_path / "dest")]) == 2
    assert "is not empty: publish into a new or empty folder" in capsys.readouterr().err
    assert main(["publish", str(labels_only[0]), str(labels_only[0] / "release")]) == 2
    assert "lies inside" in capsys.readouterr().err and not (labels_only[0] / "release").exists()


def test_palette_pngs_keep_the_ids_below_256_and_the_colours_above():
    palette = gallery.class_palette(4)
    ids = np.array([[0, 1, 2], [3, 255, 1]])
    small = Image.open(io.BytesIO(gallery.palette_png(ids, palette)))
    assert small.mode == "P" and np.array_equal(np.asarray(small), ids)
    assert np.array_equal(np.asarray(small.convert("RGB"))[0, 1], palette[1])
    assert np.array_equal(np.asarray(small.convert("RGB"))[1, 1], [0, 0, 0])  # outside the palette: black
    many = gallery.instance_palette(300)
    large = Image.open(io.BytesIO(gallery.palette_png(np.array([[0, 299]]), many)))
    assert large.mode == "RGB" and np.array_equal(np.asarray(large)[0], many[[0, 299]])


@pytest.mark.parametrize("layer", ["semantic", "instances", "levels"])
def test_show_draws_a_layer_over_the_image_at_its_size(labels_only, tmp_path, capsys, layer):
    out, images = labels_only
    row = pq.read_table(out / layout.data_path(0, 2)).slice(0, 1).to_pylist()[0]
    png = tmp_path / "shown.png"
    assert main(["show", str(out), row["image_id"], "--layer", layer, "--out", str(png), "--images", str(images)]) == 0
    legend = capsys.readouterr().out
    shown = np.asarray(Image.open(png))
    plain = codecs.decode_image((images / row["image"]["path"]).read_bytes())
    assert shown.shape == plain.shape == (*SIZE, 3)
    differs = np.any(shown != plain, axis=2)
    assert differs.mean() > 0.01  # the labels are drawn ...
    if layer != "levels":  # ... and only where there is a label (or an outline beside one)
        labels = codecs.decode_mask(row["semantic_mask" if layer == "semantic" else "instance_mask"]["bytes"])
        unlabeled = (labels == (255 if layer == "semantic" else 0)) & ~gallery.instance_boundaries(labels)
        assert not differs[unlabeled].any()
    assert legend.startswith(f"wrote {png}") and {"semantic": "background", "instances": "painted instance",
                                                   "levels": "object"}[layer] in legend


def test_show_without_the_images_draws_on_grey_and_names_an_unknown_id(labels_only, tmp_path, capsys):
    out, _ = labels_only
    image_id = pq.read_table(out / layout.data_path(1, 2), columns=["image_id"]).column(0)[0].as_py()
    png = tmp_path / "grey.png"
    assert main(["show", str(out), image_id, "--out", str(png)]) == 0
    shown = np.asarray(Image.open(png))
    assert shown.shape == (*SIZE, 3) and (shown == 128).all(axis=2).mean() > 0.3  # unlabeled pixels stay grey
    assert not (shown == 128).all()
    assert main(["show", str(out), "few_shapes/nope", "--out", str(png)]) == 2
    assert "no row of" in capsys.readouterr().err


def test_show_reads_only_the_shard_an_image_id_hashes_to(labels_only, monkeypatch):
    from dataset_card import show
    from dataset_card.contract.output_folder import OutputFolder

    out, _ = labels_only
    image_id = pq.read_table(out / layout.data_path(1, 2), columns=["image_id"]).column(0)[0].as_py()
    assert layout.shard_of([image_id], 2) == [1]
    opened, parquet_file = [], show.pq.ParquetFile
    monkeypatch.setattr(show.pq, "ParquetFile", lambda f: opened.append(f) or parquet_file(f))
    assert show.find_row(OutputFolder.open(str(out)), image_id)["image_id"] == image_id
    assert len(opened) == 1  # a 1,000-shard release costs one shard's ids, not a scan


def test_redaction_keeps_a_paths_last_component_never_a_host_and_leaves_web_urls():
    from dataset_card.publish import redact_text, redact_value

    found: set[str] = set()
    value = {"a": ["/data/imagenet/train", "s3://bucket/labels/", "ray://head:10001", "10.0.0.5:6379"],
             "b": {"c": "C:\\models\\sam.pth", "d": "https://dl.example.org/sam_vit_h.pth", "e": "16:16", "f": 3}}
    assert redact_value(value, found) == {
        "a": ["<redacted>/train", "<redacted>/labels", "<redacted>", "<redacted>"],
        "b": {"c": "<redacted>/sam.pth", "d": "https://dl.example.org/sam_vit_h.pth", "e": "16:16", "f": 3}}
    assert redact_text("labeled from /data/imagenet/train on 10.0.0.5:6379", found) == \
        "labeled from <redacted>/train on <redacted>"

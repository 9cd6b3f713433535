"""Input listing: ImageFolder trees, file lists, Parquet and save_to_disk tables, and reading bytes."""

import io

import datasets
import numpy as np
import pytest
from PIL import Image

from labeling.inputs.folder import list_image_folder, read_file_list
from labeling.inputs.input_list import InputError
from labeling.inputs.kinds import detect_format, list_inputs
from labeling.pipeline import failures


def png_bytes(value: int, size=(5, 4)) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full((size[1], size[0], 3), value, np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture
def tree(tmp_path):
    root = tmp_path / "train"
    files = {
        "n02/b.png": png_bytes(1),
        "n02/a.JPEG": png_bytes(2),  # upper-case extension, PNG inside: listing trusts names only
        "n01/z.webp": png_bytes(3),
        "n01/sub/y.bmp": png_bytes(4),  # nested below a class folder
        "n01/notes.txt": b"not an image",
        "n01/.hidden.png": png_bytes(5),
        "n03/x.jpg": png_bytes(6),
        "n03/x.png": png_bytes(7),  # same image_id as n03/x.jpg
    }
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    (root / "n04_empty").mkdir()
    (root / ".cache").mkdir()
    (root / "stray.jpg").write_bytes(png_bytes(8))  # not in a class folder: ignored
    return root, files


def test_image_folder_is_sorted_by_class_then_file(tree):
    root, files = tree
    inputs = list_image_folder(str(root), workers=2)
    assert inputs.class_names == ("n01", "n02", "n03", "n04_empty")
    rows = inputs.table.to_pylist()
    assert [r["path"] for r in rows] == ["n01/sub/y.bmp", "n01/z.webp", "n02/a.JPEG", "n02/b.png", "n03/x.jpg",
                                         "n03/x.png"]
    assert [r["image_id"] for r in rows][:4] == ["n01/sub/y", "n01/z", "n02/a", "n02/b"]
    assert [r["label"] for r in rows] == [0, 0, 1, 1, 2, 2]
    assert inputs.skipped_files == 1
    assert [r["error_type"] for r in rows] == [""] * 5 + [failures.DUPLICATE_ID]
    assert "n03/x.jpg" in rows[5]["error_message"]
    read = inputs.source.read([r["path"] for r in rows] + ["n01/missing.png"])
    assert read[:6] == [files[r["path"]] for r in rows]
    assert isinstance(read[6], Exception)


def test_file_list_matches_the_folder_listing(tree, tmp_path):
    root, _ = tree
    listing = list_image_folder(str(root), workers=2)
    file_list = tmp_path / "files.txt"
    lines = ["# a comment", ""] + [f"./{p}" for p in reversed(listing.table.column("path").to_pylist())]
    file_list.write_text("\n".join(lines) + "\n")
    given = read_file_list(str(root), str(file_list))
    assert given.table.equals(listing.table)
    assert given.class_names == ("n01", "n02", "n03")  # empty folders cannot appear in a list
    assert given.sha256() == listing.sha256()
    assert given.head(2).table.num_rows == 2 and given.head(2).sha256() != given.sha256()


def test_user_errors_are_one_sentence(tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        list_inputs(str(tmp_path / "nope"))
    (tmp_path / "flat").mkdir()
    (tmp_path / "flat" / "a.jpg").write_bytes(png_bytes(0))
    with pytest.raises(InputError, match="no class folders"):
        list_inputs(str(tmp_path / "flat"))
    (tmp_path / "list.txt").write_text("a.jpg\n")
    with pytest.raises(InputError, match="line 1 .* has no class folder"):
        read_file_list(str(tmp_path / "flat"), str(tmp_path / "list.txt"))


def image_table(n: int) -> datasets.Dataset:
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=["cat", "dog"])})
    return datasets.Dataset.from_dict(
        {"image": [{"bytes": png_bytes(i), "path": f"img_{i}.JPEG" if i != 2 else None} for i in range(n)],
         "label": [i % 2 for i in range(n)]}, features=features)


def test_parquet_folder_lists_rows_and_reads_their_bytes(tmp_path):
    root = tmp_path / "export"
    (root / "data").mkdir(parents=True)
    ds = image_table(7)
    ds.select(range(4)).to_parquet(str(root / "data" / "train-00000-of-00002.parquet"), batch_size=3)
    ds.select(range(4, 7)).to_parquet(str(root / "data" / "train-00001-of-00002.parquet"))
    ds.select(range(2)).to_parquet(str(root / "data" / "validation-00000-of-00001.parquet"))
    assert detect_format(str(root)) == "parquet"
    inputs = list_inputs(str(root), workers=2)
    assert inputs.class_names == ("cat", "dog")
    rows = inputs.table.to_pylist()
    assert len(rows) == 7
    assert rows[0]["path"] == "data/train-00000-of-00002.parquet:0"
    assert rows[4]["path"] == "data/train-00001-of-00002.parquet:0"
    assert [r["image_id"] for r in rows[:3]] == ["img_0", "img_1", "data/train-00000-of-00002.parquet:2"]
    assert [r["label"] for r in rows] == [0, 1, 0, 1, 0, 1, 0]
    wanted = [5, 1, 3, 0, 6]
    got = inputs.source.read([rows[i]["path"] for i in wanted])
    assert got == [png_bytes(i) for i in wanted]


def test_save_to_disk_folder(tmp_path):
    root = tmp_path / "disk"
    datasets.DatasetDict({"train": image_table(5)}).save_to_disk(str(root))
    assert detect_format(str(root)) == "arrow"
    inputs = list_inputs(str(root))
    rows = inputs.table.to_pylist()
    assert [r["path"] for r in rows] == [f"train:{i}" for i in range(5)]
    assert inputs.source.read(["train:4", "train:1"]) == [png_bytes(4), png_bytes(1)]
    with pytest.raises(InputError, match="--split"):
        list_inputs(str(root), split="validation")
    with pytest.raises(InputError, match="--label-column"):
        list_inputs(str(root), label_column="class")


def test_listing_prints_its_progress_bar_only_when_asked(tree, capsys):
    root, _ = tree
    list_inputs(str(root), progress=False)
    assert capsys.readouterr().err == ""
    list_inputs(str(root))
    assert "listing class folders" in capsys.readouterr().err

"""Images of a labels-only release: found again by path under the folder they were labeled from,
and checked to be the same files.

A data file whose Parquet metadata says `"image_storage": "reference"` holds no image bytes: each
row's `image.path` is the file's path relative to the labeled input folder, `image_sha256` and
`image_nbytes` (`schema.REFERENCE_COLUMNS`) its content hash and length. Every reader resolves
them here, so a missing or changed file fails the same way everywhere, in one sentence.
"""

from __future__ import annotations

import hashlib
import posixpath
from collections.abc import Sequence
from dataclasses import dataclass

import pyarrow as pa

from dataset_card.contract.schema import REFERENCE_COLUMNS, read_file_metadata

INLINE, REFERENCE = "inline", "reference"


class ImageReferenceError(ValueError):
    """An image a labels-only release refers to is missing or is not the file that was labeled."""


def digest(data: bytes) -> str:
    """The content hash stored in `image_sha256`."""
    return hashlib.sha256(data).hexdigest()


def storage_of(schema: pa.Schema) -> str:
    """"inline" or "reference": how a data file (by its schema's metadata) holds its images."""
    return read_file_metadata(schema).get("image_storage", INLINE)


def check_image_root(schema: pa.Schema, images: str | None, source: str) -> None:
    """Raise ImageReferenceError when data file `source` holds references and no image root is given,
    or holds references without the columns that check them."""
    if storage_of(schema) != REFERENCE:
        return
    if images is None:
        raise ImageReferenceError(
            f"{source} stores no image bytes (a labels-only release): pass the folder the dataset was labeled "
            "from (for the trainer, --images ROOT; its files are found by each row's image.path)")
    absent = [c for c in REFERENCE_COLUMNS if schema.get_field_index(c) < 0]
    if absent:
        raise ImageReferenceError(f"{source} stores image references but lacks column(s) {', '.join(absent)} "
                                  "to check them against: relabel it")


@dataclass
class ImageSource:
    """The folder a labels-only release's images are read from (a local path or a URL)."""

    root: str

    def __post_init__(self):
        self._fs = None

    def __getstate__(self):  # filesystems are rebuilt in each worker process, not pickled
        return {"root": self.root}

    def __setstate__(self, state):
        self.__init__(state["root"])

    def read(self, path: str, sha256: str | None, nbytes: int | None) -> bytes:
        """The bytes of `path` (relative to the root), checked against the stored length and hash."""
        from dataset_card.contract.shards import filesystem

        if self._fs is None:
            self._fs = filesystem(self.root)
        fs, base = self._fs
        where = posixpath.join(self.root, path)
        try:
            with fs.open_input_stream(posixpath.join(base, path)) as stream:
                data = stream.read()
        except (FileNotFoundError, IsADirectoryError) as err:
            raise ImageReferenceError(f"image {where} is missing: point the image root (--images) at the folder "
                                      "the dataset was labeled from") from err
        except OSError as err:
            raise ImageReferenceError(f"image {where} cannot be read ({err}): check the image root (--images)") from err
        if nbytes is not None and len(data) != nbytes:
            raise ImageReferenceError(f"image {where} has {len(data)} bytes but the labeled file had {nbytes}: it "
                                      "changed since labeling; restore the original or relabel it")
        if sha256 is not None and digest(data) != sha256:
            raise ImageReferenceError(f"image {where} is not the file that was labeled (its sha256 differs): restore "
                                      "the original or relabel it")
        return data


def row_images(table: pa.Table, source: ImageSource | None) -> list[bytes]:
    """The original bytes of each row of `table`: its `image.bytes`, or for a row holding only a
    reference, the file read from `source` and checked against `REFERENCE_COLUMNS`."""
    image = table.column("image").combine_chunks()
    inline: Sequence[bytes | None] = image.field("bytes").to_pylist()
    if all(b is not None for b in inline):
        return list(inline)
    if source is None:
        raise ImageReferenceError("these rows store no image bytes (a labels-only release): pass the folder the "
                                  "dataset was labeled from (for the trainer, --images ROOT)")
    paths = image.field("path").to_pylist()
    present = [c for c in REFERENCE_COLUMNS if c in table.column_names]
    checks = {c: table.column(c).to_pylist() if c in present else [None] * table.num_rows for c in REFERENCE_COLUMNS}
    return [data if data is not None else source.read(path, sha, size)
            for data, path, sha, size in zip(inline, paths, checks["image_sha256"], checks["image_nbytes"])]

"""The CPU read stage: original bytes -> checked size -> canonical RGB decode -> pixels for the models.

Models never see full resolution: the decoded image is shrunk (area interpolation) so its longest
side is at most `max_side` (SAM's own input size), and only those pixels travel on to the model
actors. The original bytes travel along untouched; they become the output's `image` column.
A row that fails here keeps its place in the batch with its failure recorded (`labeling.pipeline.failures`).
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Sequence

import cv2
import numpy as np
import pyarrow as pa
from PIL import Image

from dataset_card import codecs
from labeling.pipeline import failures

# One in-flight row before reading: input index, its shard, and what the listing found.
WORK_SCHEMA = pa.schema([
    ("index", pa.int64()),
    ("shard", pa.int64()),
    ("path", pa.string()),
    ("image_id", pa.string()),
    ("label", pa.int64()),
    ("image_path", pa.string()),
    ("error_stage", pa.string()),
    ("error_type", pa.string()),
    ("error_message", pa.string()),
])

# After reading: + original bytes and size, + the models' pixels (raw (h, w, 3) uint8 bytes).
DECODED_SCHEMA = pa.schema(list(WORK_SCHEMA) + [
    ("image_bytes", pa.binary()),
    ("width", pa.int32()),
    ("height", pa.int32()),
    ("pixels", pa.binary()),
    ("pixels_h", pa.int32()),
    ("pixels_w", pa.int32()),
    ("time_read", pa.float64()),
    ("started_at", pa.float64()),  # wall clock when this row's read began (the run's labeling start is the min)
])


def model_size(height: int, width: int, max_side: int) -> tuple[int, int]:
    """(h, w) the models get: the image shrunk to a longest side of `max_side`, never enlarged."""
    longest = max(height, width)
    if longest <= max_side:
        return height, width
    scale = max_side / longest
    return max(1, round(height * scale)), max(1, round(width * scale))


def pixels_for_models(rgb: np.ndarray, max_side: int) -> np.ndarray:
    """(H, W, 3) uint8 -> (h, w, 3) uint8 with h, w from `model_size`."""
    h, w = model_size(rgb.shape[0], rgb.shape[1], max_side)
    if (h, w) == rgb.shape[:2]:
        return rgb
    return cv2.resize(rgb, (w, h), interpolation=cv2.INTER_AREA)


def decode(data: bytes, max_pixels: int, max_side: int) -> tuple[np.ndarray, int, int]:
    """Original bytes -> ((h, w, 3) model pixels, width, height) or raises DecodeError.

    The header is read first, so an image over `max_pixels` is refused before its pixels are.
    """
    width, height = codecs.image_size(data)
    if width * height > max_pixels:
        raise codecs.DecodeError(
            f"image too large: {width}x{height} = {width * height} pixels, more than --max-pixels {max_pixels}")
    rgb = codecs.decode_image(data)  # THE canonical decode: same pixels as training sees
    if rgb.shape[:2] != (height, width):
        raise codecs.DecodeError(f"header says {width}x{height} but pixels are {rgb.shape[1]}x{rgb.shape[0]}")
    return np.ascontiguousarray(pixels_for_models(rgb, max_side)), width, height


def _empty(row: dict) -> dict:
    row.update(image_bytes=b"", width=0, height=0, pixels=b"", pixels_h=0, pixels_w=0)
    return row


def read_stage(batch: pa.Table, source, max_pixels: int, max_side: int) -> pa.Table:
    """WORK_SCHEMA batch -> DECODED_SCHEMA batch; `source.read(paths)` fetches original bytes."""
    start, started_at = time.perf_counter(), time.time()
    cv2.setNumThreads(1)  # one thread per task: Ray runs as many tasks as there are CPUs
    Image.MAX_IMAGE_PIXELS = max_pixels  # our own limit, checked from the header, decides:
    warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # PIL only warns below 2x of it
    rows = batch.to_pylist()
    todo = [r for r in rows if not r["error_type"]]
    contents: Sequence = source.read([r["path"] for r in todo]) if todo else []
    for row in rows:
        _empty(row)
    for row, data in zip(todo, contents):
        if isinstance(data, BaseException):
            row.update(failures.from_exception(failures.READ, data).as_row())
            continue
        try:
            pixels, width, height = decode(data, max_pixels, max_side)
        except Exception as err:  # anything one file can do to the decoder fails that file only
            row.update(failures.from_exception(failures.DECODE, err).as_row())
            continue
        row.update(image_bytes=data, width=width, height=height, pixels=pixels.tobytes(),
                   pixels_h=pixels.shape[0], pixels_w=pixels.shape[1])
    per_row = (time.perf_counter() - start) / max(1, len(rows))
    for row in rows:
        row["time_read"], row["started_at"] = per_row, started_at
    return pa.Table.from_pylist(rows, schema=DECODED_SCHEMA)


def model_pixels(row: dict) -> np.ndarray:
    """The (h, w, 3) uint8 pixels of a decoded row, as a writable array (models may wrap it in a tensor)."""
    return np.frombuffer(bytearray(row["pixels"]), np.uint8).reshape(row["pixels_h"], row["pixels_w"], 3)

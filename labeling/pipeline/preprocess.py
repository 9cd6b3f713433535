"""The CPU read stage: original bytes -> the size from the header, checked against `--max-pixels`.

Only the original bytes travel on: the model actor decodes them itself, in threads beside its
device, and shrinks them for the models (`labeling.labelers.paired`), so no model-size pixels
cross the object store; the bytes also become the output's `image` column. An empty file, an
unreadable header or an image over the limit fails here, before any pixel is decoded. A row that
fails keeps its place in the batch with its failure recorded (`labeling.pipeline.failures`).
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Sequence

import pyarrow as pa
from PIL import Image

from labeling.labelers.model_input import check_size
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

# After reading: + original bytes and their size (from the header).
DECODED_SCHEMA = pa.schema(list(WORK_SCHEMA) + [
    ("image_bytes", pa.binary()),
    ("width", pa.int32()),
    ("height", pa.int32()),
    ("time_read", pa.float64()),
    ("started_at", pa.float64()),  # wall clock when this row's read began (the run's labeling start is the min)
])


def _empty(row: dict) -> dict:
    row.update(image_bytes=b"", width=0, height=0)
    return row


def read_stage(batch: pa.Table, source, max_pixels: int) -> pa.Table:
    """WORK_SCHEMA batch -> DECODED_SCHEMA batch; `source.read(paths)` fetches original bytes."""
    start, started_at = time.perf_counter(), time.time()
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
            width, height = check_size(data, max_pixels)
        except Exception as err:  # anything one file can do to the header reader fails that file only
            row.update(failures.from_exception(failures.DECODE, err).as_row())
            continue
        row.update(image_bytes=data, width=width, height=height)
    per_row = (time.perf_counter() - start) / max(1, len(rows))
    for row in rows:
        row["time_read"], row["started_at"] = per_row, started_at
    return pa.Table.from_pylist(rows, schema=DECODED_SCHEMA)

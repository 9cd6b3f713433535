"""The input list every kind of `--input` becomes: `Inputs`, its table's schema, and `InputError`.

Row i of `Inputs.table` is input index i: `path` (what the reader opens, also the identity that
`inputs_hash` covers), `image_id`, `label`, `image_path` (stored as the output image's `path`),
and a listing failure (`error_type`, `error_message`: "" when none).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, replace

import pyarrow as pa

# The listing's own failure reason (the errors table's `error_type`; the pipeline's reasons are in
# labeling/pipeline/failures.py, which takes this one from here).
DUPLICATE_ID = "duplicate_id"

INPUT_SCHEMA = pa.schema([
    ("path", pa.string()),
    ("image_id", pa.string()),
    ("label", pa.int64()),
    ("image_path", pa.string()),
    ("error_type", pa.string()),
    ("error_message", pa.string()),
])


class InputError(ValueError):
    """A problem with `--input` that the user has to fix (missing, empty, wrong layout)."""


@dataclass(frozen=True)
class Inputs:
    source: object  # folder.FolderSource | tables.TableSource: has read(paths) -> list[bytes | Exception]
    class_names: tuple[str, ...]
    table: pa.Table  # INPUT_SCHEMA, row i = input index i, in sorted order
    skipped_files: int = 0  # files listed but not images (other extensions)
    notes: tuple[str, ...] = ()  # what the listing skipped and why (links followed once), for the log
    sampled_from: int | None = None  # inputs listed before a sample kept these (`--sample`); None: all are here

    def __len__(self) -> int:
        return self.table.num_rows

    @property
    def planned(self) -> int:
        """The inputs a new folder's shards are sized for: every listed input, also under `--sample`
        (so a sample grows into the full run in the same shards), only the kept ones under `--limit`."""
        return len(self) if self.sampled_from is None else self.sampled_from

    def head(self, n: int) -> Inputs:
        """The first `n` inputs (`--limit`)."""
        return replace(self, table=self.table.slice(0, n))

    def subset(self, indices) -> Inputs:
        """The inputs at `indices` (ascending), remembering how many were listed (`--sample`)."""
        return replace(self, table=self.table.take(indices), sampled_from=self.planned)

    def sha256(self) -> str:
        """sha256 of the sorted input list (one `path` per line), for manifest.json."""
        digest = hashlib.sha256()
        for path in self.table.column("path").to_pylist():
            digest.update(path.encode())
            digest.update(b"\n")
        return digest.hexdigest()


def inputs_table(entries: Sequence[tuple[str, str, int, str]]) -> pa.Table:
    """[(path, image_id, label, image_path)] in input order -> INPUT_SCHEMA, later duplicates of an
    `image_id` marked as listing failures (the first, in sorted order, is labeled)."""
    seen: dict[str, str] = {}
    error_type, error_message = [], []
    for path, image_id, _, _ in entries:
        first = seen.setdefault(image_id, path)
        duplicate = first != path
        error_type.append(DUPLICATE_ID if duplicate else "")
        error_message.append(f"image_id {image_id!r} is also the id of {first}; rename one of them"
                             if duplicate else "")
    columns = list(zip(*entries)) if entries else [[], [], [], []]
    return pa.table([pa.array(c, t.type) for c, t in zip(columns, INPUT_SCHEMA)] +
                    [pa.array(error_type, pa.string()), pa.array(error_message, pa.string())], schema=INPUT_SCHEMA)

"""The pretraining data loader: the labeled dataset's Parquet row groups -> augmented, masked batches.

Reading. The labeled folder is read in place with pyarrow (no `datasets` cache copy): only the
columns training needs, validated against the contract first. The unit of reading is a
(file, row group); a dataset with fewer units than loader streams has its row groups split into
row ranges so every stream gets one.

Order. There are S = ranks x max(1, workers) *streams*; stream s = rank * W + worker. Each epoch a
permutation seeded by (seed, epoch) deals the U units over the streams, balancing their rows;
each stream passes its rows through a shuffle buffer seeded by (seed, epoch, s). Step k of a rank
takes a fixed-size chunk from each of its workers' streams, and every stream is cut to the steps
the shortest one can fill (the remainder is dropped), so every rank and worker runs the same
number of steps (DDP never waits on a rank that ran dry). The samples of a global step
depend only on (seed, epoch, S, per-stream chunk): 2 ranks x 0 workers x batch b see exactly
the samples of 1 rank x 2 workers x batch 2b.

Per sample, in the workers: decode with the contract's codecs, crop and flip the three maps
jointly, and draw the masking's random numbers. Per batch, on the device (`Batch.to`): map the
semantic ignore value to -1, compute the instance representation from the cropped id maps, the
patch-majority labels and the visible tokens. Augmentation and masking are seeded by (seed, epoch,
global sample index), so a sample looks the same whichever rank or worker draws it, and after a resume.

Resuming at (epoch, step) recomputes the epoch's order from the seed and skips the first `step`
chunks of each stream without reading or decoding them: the shuffle buffer runs over row positions
only, and a row group is read when its first remaining row is due. An epoch resumed on another
split of the same global batch (another world size, per-process batch or worker count) is finished
in the `Layout` it was dealt in: `sources` cuts each remaining optimizer step's samples out of that
layout's streams for the new ranks and workers, so every step takes the samples it would have.
"""

from __future__ import annotations

import bisect
import heapq
import posixpath
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from dataset_card.contract import codecs, layout, shards
from dataset_card.contract.images import ImageReferenceError, ImageSource, check_image_root, row_images
from dataset_card.contract.schema import REFERENCE_COLUMNS, TRAINING_COLUMNS, SchemaError, validate_schema
from pretraining.data.augment import AugmentConfig, joint_transform
from pretraining.data.batch import Batch
from pretraining.data.samples import (  # noqa: F401  (re-exported: the loader's public names)
    HOST_KEYS,
    DataError,
    SampleSpec,
    check_taxonomy,
    collate,
    make_sample,
)


@dataclass(frozen=True)
class WorkerFailure:
    """What a stream yields instead of a chunk when a row cannot be used: the loader raises it again
    in the training process as one sentence (a DataLoader worker's exception would arrive wrapped in
    its traceback)."""

    kind: str  # "data" (DataError) or "image" (ImageReferenceError)
    message: str

    def error(self) -> Exception:
        return DataError(self.message) if self.kind == "data" else ImageReferenceError(self.message)


@dataclass(frozen=True)
class DataConfig:
    batch_size: int = 64  # samples per rank per micro-step
    num_workers: int = 8  # DataLoader workers per rank; 0 = load in the training process
    shuffle_buffer: int = 1024  # rows held by each stream's shuffle buffer
    prefetch_factor: int = 2  # chunks each worker prepares ahead
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    # Images are decoded and cropped in the workers, always: the GPU decode path (`data.decode=device`) was
    # removed (docs/training.md, "Why the workers decode").


# ---------------------------------------------------------------------------------------------
# The dataset on disk


@dataclass(frozen=True)
class Unit:
    """Rows [start, stop) of one row group: what a stream reads at once."""

    file: int  # position in LabeledDataset.files
    row_group: int
    start: int
    stop: int
    first_index: int  # global sample index of row `start`

    @property
    def num_rows(self) -> int:
        return self.stop - self.start


@dataclass(frozen=True)
class LabeledDataset:
    """A labeled folder, validated: its data files, row groups and metadata."""

    root: str  # local path or URI (s3://...), as given
    files: tuple[str, ...]  # paths inside the filesystem of `root`
    units: tuple[Unit, ...]  # one per row group, in file order
    metadata: layout.DatasetMetadata
    images: str | None = None  # a labels-only release's image folder (`dataset_card.contract.images`)

    @property
    def num_rows(self) -> int:
        return sum(u.num_rows for u in self.units)


def open_labeled_dataset(root: str, images: str | None = None) -> LabeledDataset:
    """Find and validate the data files of a labeled folder (schema of every file, metadata.json).
    `images`: the folder a labels-only release was labeled from (its images are read from there)."""
    fs, base = shards.filesystem(root)
    if fs.get_file_info(base).type != pafs.FileType.Directory:
        raise DataError(f"--data {root} is not a folder: point it at the output folder of the labeling stage.")
    meta_path = posixpath.join(base, layout.METADATA_FILE)
    if not shards.exists(fs, meta_path):
        if fs.get_file_info(posixpath.join(base, layout.DATA_DIR)).type == pafs.FileType.Directory:
            raise DataError(f"{root} has {layout.DATA_DIR}/ but its {layout.METADATA_FILE} is missing: rerun the "
                            "labeling command that wrote it (same input and --output), which restores it without "
                            "relabeling committed shards.")
        raise DataError(f"{root} has no {layout.METADATA_FILE}: it is not a labeled dataset folder "
                        "(run the labeling stage, or point --data at its output folder).")
    try:
        metadata = layout.DatasetMetadata.from_json(shards.read_bytes(fs, meta_path).decode(), source=meta_path,
                                                    output=root)  # a v1 folder: names both versions and the fix
    except SchemaError as err:
        raise DataError(str(err)) from err
    selector = pafs.FileSelector(posixpath.join(base, layout.DATA_DIR), allow_not_found=True)
    files = sorted(info.path for info in fs.get_file_info(selector)
                   if posixpath.basename(info.path).startswith("train-") and info.path.endswith(".parquet"))
    if not files:
        raise DataError(f"{root} has no data files ({layout.DATA_GLOB}): the labeling run wrote no shard yet.")
    units, first_index = [], 0
    for f, path in enumerate(files):
        try:  # every footer is read here, so a damaged file stops the run now, by name
            parquet = pq.ParquetFile(path, filesystem=fs)
        except (pa.ArrowException, OSError) as err:
            raise DataError(_unreadable(path, err)) from err
        try:
            validate_schema(parquet.schema_arrow, columns=TRAINING_COLUMNS, source=path)
            check_image_root(parquet.schema_arrow, images, path)
        except (SchemaError, ImageReferenceError) as err:
            raise DataError(str(err)) from err
        for g in range(parquet.metadata.num_row_groups):
            rows = parquet.metadata.row_group(g).num_rows
            units.append(Unit(f, g, 0, rows, first_index))
            first_index += rows
    if first_index == 0:
        raise DataError(f"{root} has data files but no rows: every shard of the labeling run failed.")
    return LabeledDataset(root, tuple(files), tuple(units), metadata, images)


def _unreadable(path: str, err: Exception) -> str:
    detail = (str(err).strip().splitlines() or [err.__class__.__name__])[0]
    return (f"{path} cannot be read as Parquet ({detail}); if the file is damaged, rerun the labeling command on "
            "this folder (it verifies and relabels damaged shards), or move the file aside to train without it.")


def split_rows(units: Sequence[Unit], parts: int) -> list[Unit]:
    """Split every unit into `parts` row ranges of near-equal size (empty ranges dropped)."""
    out = []
    for u in units:
        bounds = np.linspace(u.start, u.stop, parts + 1).round().astype(int)
        out += [Unit(u.file, u.row_group, int(a), int(b), u.first_index + int(a) - u.start)
                for a, b in zip(bounds[:-1], bounds[1:]) if b > a]
    return out


# ---------------------------------------------------------------------------------------------
# The order of an epoch (pure functions of seeds and counts)


def chunk_sizes(batch_size: int, workers: int) -> list[int]:
    """Samples each of a rank's `workers` streams contributes to one step: near-equal, summing to batch_size."""
    return [batch_size // workers + (w < batch_size % workers) for w in range(workers)]


def deal_units(units: Sequence[Unit], num_streams: int, seed: int, epoch: int) -> list[list[Unit]]:
    """Deal a seeded permutation of the units over streams, each to the stream with fewest rows so far.

    Rows per stream then differ by less than one unit, whatever the unit sizes (the last row group
    of a file is short), so little is dropped when every stream is cut to the shortest one.
    """
    if len(units) < num_streams:
        units = split_rows(units, -(-num_streams // len(units)))
    if len(units) < num_streams:
        raise DataError(f"the dataset has {len(units)} rows but the loader has {num_streams} streams "
                        "(ranks x workers): use fewer workers or more data.")
    perm = np.random.default_rng([seed, epoch]).permutation(len(units))
    streams: list[list[Unit]] = [[] for _ in range(num_streams)]
    load = [(0, s) for s in range(num_streams)]  # (rows so far, stream): a heap, ties to the lower stream
    for i in perm:
        rows, s = heapq.heappop(load)
        streams[s].append(units[i])
        heapq.heappush(load, (rows + units[i].num_rows, s))
    return streams


def shuffle_buffer_order(num_rows: int, buffer_size: int, rng: np.random.Generator) -> np.ndarray:
    """The order a streaming shuffle buffer emits rows 0..num_rows-1 that arrive in order.

    Once the buffer holds `buffer_size` rows, each arriving row replaces a uniformly chosen
    buffered one, which is emitted; the rest leave in random order at the end. (num_rows,) int64.
    """
    if buffer_size <= 1:
        return np.arange(num_rows)
    size = min(buffer_size, num_rows)
    buffer = list(range(size))
    slots = rng.integers(0, size, num_rows - size).tolist()
    out = []
    for row, slot in zip(range(size, num_rows), slots):
        out.append(buffer[slot])
        buffer[slot] = row
    out += rng.permutation(buffer).tolist()
    return np.asarray(out, dtype=np.int64)


@dataclass(frozen=True)
class EpochPlan:
    streams: list[list[Unit]]  # units of each stream, in reading order
    steps: int  # steps every rank runs this epoch


def plan_epoch(units: Sequence[Unit], seed: int, epoch: int, world_size: int, workers: int, batch_size: int,
               step_multiple: int = 1) -> EpochPlan:
    """Deal the units over world_size * workers streams and count the steps all of them can fill.

    `steps` is rounded down to a multiple of `step_multiple` (gradient accumulation), so an epoch
    never ends inside an optimizer step.
    """
    streams = deal_units(units, world_size * workers, seed, epoch)
    chunks = chunk_sizes(batch_size, workers)
    steps = min(sum(u.num_rows for u in stream) // chunks[s % workers] for s, stream in enumerate(streams))
    steps -= steps % step_multiple
    if steps == 0:
        total = sum(u.num_rows for u in units)
        raise DataError(f"{total} rows cannot fill one step of {batch_size} samples x {world_size} ranks "
                        f"x {step_multiple} accumulation steps: use more data, or lower the global batch "
                        "(global_batch, or data.batch_size where the config has none).")
    return EpochPlan(streams, steps)


@dataclass(frozen=True)
class Layout:
    """How an epoch's samples are dealt: `world_size` x `workers` streams (stream rank * workers + worker);
    each rank computes micro-batches of `batch_size` (its workers' chunks, `chunk_sizes`), `accum` of them per
    optimizer step. An epoch is planned with the layout it starts in (`plan_epoch`)."""

    world_size: int
    workers: int  # streams per rank: max(1, DataLoader workers)
    batch_size: int  # samples per rank per micro-step
    accum: int = 1  # micro-steps per optimizer step

    @property
    def global_batch(self) -> int:
        return self.world_size * self.batch_size * self.accum

    def chunk(self, stream: int) -> int:
        """Samples `stream` gives each micro-step."""
        return chunk_sizes(self.batch_size, self.workers)[stream % self.workers]

    def pieces(self) -> list[tuple[int, int, int]]:
        """One optimizer step's samples in their canonical order (by rank, then micro-step, then worker):
        (stream, offset within the stream's share of the step, count). Stream s's share of optimizer step j
        is its positions [j, j + 1) x accum x chunk(s)."""
        return [(r * self.workers + w, a * self.chunk(w), self.chunk(w))
                for r in range(self.world_size) for a in range(self.accum) for w in range(self.workers)]


def sources(epoch_layout: Layout, layout: Layout, rank: int, worker: int, micro: int) -> list[tuple[int, int, int]]:
    """Where worker `worker` of `rank` finds its chunk of micro-step `micro` of an optimizer step under `layout`,
    in an epoch dealt by `epoch_layout` (the same global batch): (stream of `epoch_layout`, offset within the
    stream's share of the step, count) pieces. Both layouts order a step's samples canonically
    (`Layout.pieces`) and `layout` cuts that order into its own chunks, so an optimizer step takes the same
    samples under any layout; with `layout == epoch_layout` the piece is the worker's own stream."""
    if epoch_layout.global_batch != layout.global_batch:
        raise ValueError(f"layouts of global batch {epoch_layout.global_batch} and {layout.global_batch} cannot "
                         "share an epoch")
    chunks = chunk_sizes(layout.batch_size, layout.workers)
    start = (rank * layout.accum + micro) * layout.batch_size + sum(chunks[:worker])
    stop, out, at = start + chunks[worker], [], 0
    for stream, offset, count in epoch_layout.pieces():
        lo, hi = max(start, at), min(stop, at + count)
        if lo < hi:
            out.append((stream, offset + lo - at, hi - lo))
        at += count
    return out


# ---------------------------------------------------------------------------------------------
# ---------------------------------------------------------------------------------------------
# Streams and the loader


class _RowReader:
    """Reads row groups on demand and keeps only the rows still to be emitted (memory ~ one shuffle buffer)."""

    def __init__(self, dataset: LabeledDataset, columns: Sequence[str]):
        self.dataset, self.columns = dataset, list(columns)
        self.fs = shards.filesystem(dataset.root)[0]
        self.files: OrderedDict[int, pq.ParquetFile] = OrderedDict()
        self.images = ImageSource(dataset.images) if dataset.images else None  # --images: referenced files

    def read(self, unit: Unit) -> list[dict]:
        path = self.dataset.files[unit.file]
        try:
            if unit.file not in self.files:
                self.files[unit.file] = pq.ParquetFile(path, filesystem=self.fs)
                if len(self.files) > 4:
                    self.files.popitem(last=False)
            parquet = self.files[unit.file]
            checks = [c for c in REFERENCE_COLUMNS if self.images and parquet.schema_arrow.get_field_index(c) >= 0]
            table = parquet.read_row_group(unit.row_group, columns=self.columns + checks)
        except (pa.ArrowException, OSError) as err:
            raise DataError(_unreadable(path, err)) from err
        table = table.slice(unit.start, unit.num_rows)
        columns = {}
        for name in self.columns:
            column = table.column(name).combine_chunks()
            columns[name] = column.field("bytes").to_pylist() if name != "label" else column.to_pylist()
        if "image" in columns and self.images:  # a labels-only release: the files, checked
            columns["image"] = row_images(table, self.images)
        return [{name: values[i] for name, values in columns.items()} for i in range(unit.num_rows)]

    def where(self, unit: Unit, offset: int) -> str:
        """'FILE row R (image_id ID)' for row `offset` of `unit` (read only when a row fails)."""
        path = self.dataset.files[unit.file]
        file_start = next(u.first_index for u in self.dataset.units if u.file == unit.file)
        row = unit.first_index + offset - file_start
        try:
            ids = pq.ParquetFile(path, filesystem=self.fs).read_row_group(unit.row_group, columns=["image_id"])
            image_id = ids.column(0)[unit.start + offset].as_py()
        except (pa.ArrowException, OSError, KeyError):
            image_id = "unknown"
        return f"{path} row {row} (image_id {image_id})"


class _StreamRows:
    """The rows stream `stream` of an epoch's plan emits at `positions` (increasing), read on demand: a unit
    is read when its first row still due is asked for, and only its rows due at later `positions` are kept
    (memory about one shuffle buffer)."""

    def __init__(self, plan: EpochPlan, stream: int, chunk: int, rng: np.random.Generator, shuffle_buffer: int,
                 positions: np.ndarray, reader: _RowReader):
        self.units, self.reader = plan.streams[stream], reader
        self.starts = np.cumsum([0] + [u.num_rows for u in self.units])  # first flat row of each unit
        self.order = shuffle_buffer_order(int(self.starts[-1]), shuffle_buffer, rng)[: plan.steps * chunk]
        wanted = np.zeros(len(self.order), dtype=bool)
        wanted[positions] = True
        self.due = np.full(int(self.starts[-1]), -1)  # flat row -> its position, if this reader emits it
        self.due[self.order[wanted]] = np.flatnonzero(wanted)
        self.pending: dict[int, dict] = {}

    def take(self, position: int) -> tuple[int, dict, Unit, int]:
        """(global sample index, row, its unit, its offset in the unit) at `position` of the stream."""
        flat = int(self.order[position])
        u = bisect.bisect_right(self.starts, flat) - 1
        first = int(self.starts[u])
        if flat not in self.pending:  # first row of this unit still due: read the unit
            for offset, row in enumerate(self.reader.read(self.units[u])):
                if self.due[first + offset] >= position:
                    self.pending[first + offset] = row
        return self.units[u].first_index + flat - first, self.pending.pop(flat), self.units[u], flat - first


class PretrainingStream(IterableDataset):
    """Yields (epoch, step, chunk) for this rank's worker streams from `start` to the last epoch.

    Each DataLoader worker serves one stream and yields one chunk per step, so the DataLoader's
    round robin over workers hands the training loop the W chunks of a step in a row. `epoch_layout`:
    the layout the start epoch began in, when a resume changed it (another world size, per-process batch
    or worker count at the same global batch); the rest of that epoch is taken from its streams
    (`sources`), so every optimizer step takes the samples it would have taken.
    """

    def __init__(self, dataset: LabeledDataset, spec: SampleSpec, batch_size: int, shuffle_buffer: int,
                 rank: int, world_size: int, num_workers: int, start: tuple[int, int] = (0, 0),
                 step_multiple: int = 1, epoch_layout: Layout | None = None):
        self.dataset, self.spec = dataset, spec
        self.batch_size, self.shuffle_buffer = batch_size, shuffle_buffer
        self.rank, self.world_size, self.workers = rank, world_size, max(1, num_workers)
        self.start, self.step_multiple = start, step_multiple
        self.layout = Layout(world_size, self.workers, batch_size, step_multiple)
        self.start_layout = epoch_layout if epoch_layout is not None and start[1] > 0 else self.layout

    def layout_of(self, epoch: int) -> Layout:
        """The layout `epoch` is dealt by: the start epoch's own, else this stream's."""
        return self.start_layout if epoch == self.start[0] else self.layout

    def plan(self, epoch: int) -> EpochPlan:
        layout = self.layout_of(epoch)
        return plan_epoch(self.dataset.units, self.spec.seed, epoch, layout.world_size, layout.workers,
                          layout.batch_size, layout.accum)

    def steps(self, epoch: int) -> int:
        """Micro-steps of `epoch` in this stream's layout."""
        layout = self.layout_of(epoch)
        return self.plan(epoch).steps // layout.accum * self.step_multiple

    def __iter__(self) -> Iterator[tuple[int, int, dict[str, torch.Tensor]]]:
        info = get_worker_info()
        worker = info.id if info is not None else 0
        reader = _RowReader(self.dataset, self.spec.columns)
        transform = joint_transform(self.spec.img_size, self.spec.augment)
        start_epoch, start_step = self.start
        try:
            for epoch in range(start_epoch, self.spec.epochs):
                first = start_step // self.step_multiple if epoch == start_epoch else 0
                yield from self._epoch(epoch, worker, first, reader, transform)
        except DataError as err:
            yield WorkerFailure("data", str(err))
        except ImageReferenceError as err:
            yield WorkerFailure("image", str(err))

    def _epoch(self, epoch: int, worker: int, first: int, reader: _RowReader, transform):
        """This worker's chunks of `epoch` from optimizer step `first` on."""
        plan, dealt, layout = self.plan(epoch), self.layout_of(epoch), self.layout
        steps = plan.steps // dealt.accum  # optimizer steps
        pieces = [sources(dealt, layout, self.rank, worker, micro) for micro in range(layout.accum)]
        share = {s: dealt.accum * dealt.chunk(s) for s in {s for micro in pieces for s, _, _ in micro}}
        rows = {}
        for s in share:  # the positions this worker reads from stream s, in the order it reads them
            positions = [j * share[s] + offset + i for j in range(first, steps) for micro in pieces
                         for stream, offset, count in micro if stream == s for i in range(count)]
            rows[s] = _StreamRows(plan, s, dealt.chunk(s), np.random.default_rng([self.spec.seed, epoch, s]),
                                  self.shuffle_buffer, np.asarray(positions, dtype=np.int64), reader)
        for j in range(first, steps):
            for micro, micro_pieces in enumerate(pieces):
                samples = []
                for s, offset, count in micro_pieces:
                    for position in range(j * share[s] + offset, j * share[s] + offset + count):
                        index, row, unit, offset_in_unit = rows[s].take(position)
                        try:
                            samples.append(make_sample(row, index, epoch, self.spec, transform))
                        except (DataError, codecs.DecodeError) as err:  # name the row, not a worker's sample index
                            raise DataError(f"{reader.where(unit, offset_in_unit)}: {err}") from err
                yield epoch, j * layout.accum + micro, collate(samples)


class PretrainingLoader:
    """Batches of one rank: joins the W worker chunks of each step. Iterate once for the whole run."""

    def __init__(self, dataset: LabeledDataset, spec: SampleSpec, cfg: DataConfig, rank: int = 0,
                 world_size: int = 1, start: tuple[int, int] = (0, 0), step_multiple: int = 1,
                 pin_memory: bool = False, epoch_layout: Layout | None = None):
        self.stream = PretrainingStream(dataset, spec, cfg.batch_size, cfg.shuffle_buffer, rank, world_size,
                                        cfg.num_workers, start, step_multiple, epoch_layout)
        # Checked here, in the main process, so errors are clear; micro-steps of epoch 0 in this layout.
        self.steps_per_epoch = plan_epoch(dataset.units, spec.seed, 0, world_size, self.stream.workers,
                                          cfg.batch_size, step_multiple).steps
        self.stream.steps(start[0])  # the start epoch's plan too (another layout's, after a resume)
        self.workers = self.stream.workers
        extra = {"prefetch_factor": cfg.prefetch_factor} if cfg.num_workers > 0 else {}
        # A private generator: creating the iterator must not draw from the global RNG (exact resumes).
        self.loader = DataLoader(self.stream, batch_size=None, num_workers=cfg.num_workers,
                                 pin_memory=pin_memory, generator=torch.Generator(), **extra)

    def __iter__(self) -> Iterator[Batch]:
        items = iter(self.loader)
        while True:
            chunks = []
            for _ in range(self.workers):
                try:
                    chunks.append(next(items))
                except StopIteration:
                    return
                if isinstance(chunks[-1], WorkerFailure):
                    raise chunks[-1].error()
            epoch, step = chunks[0][0], chunks[0][1]
            if any((e, s) != (epoch, step) for e, s, _ in chunks):
                raise RuntimeError(f"loader workers fell out of step at epoch {epoch} step {step}")
            chunks = [c for _, _, c in chunks]
            instance_max = max(int(c["instance_max"].max()) for c in chunks) if "instance_max" in chunks[0] else None
            yield Batch(epoch, step, chunks, self.stream.spec, instance_max)

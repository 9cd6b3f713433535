"""Loading speed: our pretraining loader against an RGB-only loader over the same Parquet image column.

    python benchmarks/data_loading.py [--data LABELED_FOLDER] [--workers 2] [--batch-size 32] [--device cuda]

Both loaders read the same row groups with the same workers and batch size, decode the image with
the contract's decoder and take the same random resized crop and flip at the same size. The
RGB-only loader is what an MAE recipe uses: decode, crop, flip, normalise, all in the workers.
Ours also decodes both masks, crops them with the image and draws each sample's masking numbers
in the workers; what is derived from the cropped maps in a batch (the instance representation,
patch-majority labels, visible tokens) and the RGB normalisation run in `Batch.to` on the training
device, batched.

Rows: `rgb_only` and `c2fmae` time what each loader hands the training loop (samples/s); the
median over `--rounds` rounds (the arms' order rotating, so none always runs first on a busy
machine) of their ratio is the last line, `loader_over_rgb_only=<ratio>`. `c2fmae+to` also runs
`Batch.to(--device)` on every batch in the main process, as training does: on a GPU that work runs
there, but on a CPU-only machine it takes cores from the workers, so this row is the worst case
and is printed beside the others. Each loader sees every sample at most once (no sample timed
twice); the first batches (worker start-up) are not timed. Without --data, a synthetic labeled folder is
written to a temporary directory first, with its images re-encoded as JPEG at an ImageNet-like
size (375 x 500), since the relative cost of the masks depends on how costly the image decode is.
"""

from __future__ import annotations

import argparse
import io
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from torchvision.transforms import v2

from dataset_card import codecs, shards
from dataset_card.synthetic import write_synthetic_dataset
from pretraining.data.augment import AugmentConfig
from pretraining.data.loader import (
    DataConfig,
    LabeledDataset,
    PretrainingLoader,
    SampleSpec,
    open_labeled_dataset,
)
from pretraining.models.masking import MODALITIES, MaskingConfig


class RgbOnly(IterableDataset):
    """An MAE-style loader: the image column only, decode -> crop -> flip -> normalise, batched in workers."""

    def __init__(self, dataset: LabeledDataset, img_size: int, batch_size: int, scale=(0.2, 1.0)):
        self.dataset, self.batch_size = dataset, batch_size
        self.transform = v2.Compose([
            v2.RandomResizedCrop(img_size, scale=scale, antialias=True), v2.RandomHorizontalFlip(),
            v2.ToDtype(torch.float32, scale=True), v2.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])])

    def __iter__(self):
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        fs = shards.filesystem(self.dataset.root)[0]
        batch = []
        for unit in self.dataset.units[worker::workers]:
            table = pq.ParquetFile(self.dataset.files[unit.file], filesystem=fs).read_row_group(
                unit.row_group, columns=["image", "label"])
            images = table.column("image").combine_chunks().field("bytes").to_pylist()
            for data, label in zip(images, table.column("label").to_pylist()):
                rgb = torch.from_numpy(np.require(codecs.decode_image(data), requirements="W")).permute(2, 0, 1)
                batch.append((self.transform(v2.functional.to_image(rgb)), label))
                if len(batch) == self.batch_size:
                    yield torch.stack([b[0] for b in batch]), torch.tensor([b[1] for b in batch])
                    batch = []


def write_jpeg_dataset(root: str, num_images: int, size: tuple[int, int]) -> None:
    """The synthetic labeled folder with each shard's image column re-encoded as JPEG (quality 90)."""
    write_synthetic_dataset(root, num_images=num_images, num_shards=max(2, num_images // 64), size=size, seed=0)
    for path in sorted(Path(root, "data").glob("train-*.parquet")):
        table = pq.read_table(path)
        images = []
        for cell in table.column("image").to_pylist():
            buf = io.BytesIO()
            Image.open(io.BytesIO(cell["bytes"])).save(buf, format="JPEG", quality=90)
            images.append({"bytes": buf.getvalue(), "path": cell["path"].replace(".png", ".jpg")})
        table = table.set_column(table.schema.get_field_index("image"), table.schema.field("image"),
                                 pa.array(images, type=table.schema.field("image").type))
        shards.write_parquet(table, str(path))


def time_loader(batches, batch_size: int, warmup: int, limit: int) -> tuple[int, float]:
    """(samples timed, seconds) over at most `limit` batches after `warmup` untimed ones."""
    count, start = 0, None
    for i, _ in enumerate(batches):
        if i == warmup - 1:
            start = time.perf_counter()
        elif i >= warmup:
            count += batch_size
        if i + 1 >= warmup + limit:
            break
    return count, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", help="a labeled folder (default: write a synthetic one)")
    parser.add_argument("--num-images", type=int, default=1536, help="synthetic images to write without --data")
    parser.add_argument("--image-size", type=int, nargs=2, default=(375, 500), help="synthetic image H W")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--img-size", type=int, default=224, help="crop size")
    parser.add_argument("--warmup", type=int, default=2, help="untimed batches at the start")
    parser.add_argument("--rounds", type=int, default=3,
                        help="times each loader is timed, in rotating order; the ratio is the median over rounds")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="where Batch.to runs for the c2fmae+to row (default: cuda when there is one)")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        root = args.data
        if root is None:
            root = str(Path(tmp) / "labeled")
            write_jpeg_dataset(root, args.num_images, tuple(args.image_size))
        dataset = open_labeled_dataset(root)
        for path in dataset.files:  # both loaders start from a warm page cache
            Path(path).read_bytes() if Path(path).exists() else None
        per_worker = dataset.num_rows // max(1, args.workers) // args.batch_size
        limit = per_worker * max(1, args.workers) - args.warmup  # batches each loader can time without repeats
        if limit < 2:
            raise SystemExit(f"{dataset.num_rows} rows are too few for batch {args.batch_size} x {args.workers} "
                             "workers; use --num-images or a bigger --data.")

        grid = args.img_size // 16
        spec = SampleSpec(img_size=args.img_size, patch_size=16, modalities=MODALITIES,
                          masking=MaskingConfig(num_visible=round(len(MODALITIES) * grid**2 / 6), num_positions=grid**2),
                          augment=AugmentConfig(), ignore_value=dataset.metadata.ignore_value, seed=0, epochs=1)
        limit = min(limit, PretrainingLoader(dataset, spec, DataConfig(
            batch_size=args.batch_size, num_workers=args.workers)).steps_per_epoch - args.warmup)
        rgb = DataLoader(RgbOnly(dataset, args.img_size, args.batch_size), batch_size=None,
                         num_workers=args.workers, prefetch_factor=2 if args.workers else None)
        torch.set_num_threads(1)
        device = torch.device(args.device)

        def on_device(batches):  # as the training loop does it, synchronised so its time counts
            for b in batches:
                out = b.to(device)
                if device.type == "cuda":
                    torch.cuda.synchronize()
                yield out

        def c2fmae_loader():
            return PretrainingLoader(dataset, spec, DataConfig(batch_size=args.batch_size, num_workers=args.workers,
                                                                shuffle_buffer=256))

        arms = {"rgb_only": lambda: rgb,
                "c2fmae": c2fmae_loader,
                "c2fmae+to": lambda: on_device(c2fmae_loader())}
        rounds = []  # one {arm: (samples, seconds)} per round; the arms' order rotates between rounds
        for r in range(args.rounds):
            names = list(arms)[r % len(arms):] + list(arms)[:r % len(arms)]
            rounds.append({name: time_loader(arms[name](), args.batch_size, args.warmup, limit) for name in names})

    print(f"{'round':>5} {'loader':<10} {'workers':>7} {'batch':>5} {'crop':>4} {'samples':>7} {'seconds':>8} "
          f"{'samples/s':>9} {'ratio':>6}")
    ratios = []
    for r, results in enumerate(rounds):
        rates = {name: samples / seconds for name, (samples, seconds) in results.items()}
        for name in arms:
            samples, seconds = results[name]
            print(f"{r:>5} {name:<10} {args.workers:>7} {args.batch_size:>5} {args.img_size:>4} {samples:>7} "
                  f"{seconds:>8.2f} {rates[name]:>9.1f} {rates[name] / rates['rgb_only']:>6.3f}")
        ratios.append({name: rates[name] / rates["rgb_only"] for name in arms})
    print(f"c2fmae+to runs Batch.to on {device} in the main process (median ratio "
          f"{statistics.median(r['c2fmae+to'] for r in ratios):.3f}); the ratio below leaves it to the device. "
          f"Median over {len(ratios)} rounds:")
    print(f"loader_over_rgb_only={statistics.median(r['c2fmae'] for r in ratios):.3f}")


if __name__ == "__main__":
    main()

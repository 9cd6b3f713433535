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

from dataset_card.contract import codecs, shards
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
            # MAE's crop: bicubic (interpolation=3), as our loader's default
            v2.RandomResizedCrop(img_size, scale=scale, interpolation=v2.InterpolationMode.BICUBIC, antialias=True),
            v2.RandomHorizontalFlip(),
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


SCENE_CLASSES = 24  # semantic classes of the scenes: the first 12 are things (their regions hold instances)


def realistic_scene(photo: np.ndarray, rng: np.random.Generator, size: tuple[int, int]):
    """A random crop of a natural photo at `size` (H, W) and label maps with realistic boundaries:
    SLIC superpixels (~100 per image) as instances inside coarse SLIC regions (~10 per image), each
    region a semantic class. Returns RGB (H, W, 3) uint8, semantic (H, W) uint8, instance masks (bool)."""
    from skimage.segmentation import slic
    from skimage.transform import resize

    h, w = size
    scale = max(h / photo.shape[0], w / photo.shape[1]) * rng.uniform(1.0, 1.6)
    big = resize(photo, (round(photo.shape[0] * scale) + 1, round(photo.shape[1] * scale) + 1), anti_aliasing=True)
    y, x = rng.integers(0, big.shape[0] - h + 1), rng.integers(0, big.shape[1] - w + 1)
    crop = big[y:y + h, x:x + w]
    if rng.random() < 0.5:
        crop = crop[:, ::-1]
    rgb = (crop * 255).clip(0, 255).astype(np.uint8)
    coarse = slic(crop, n_segments=int(rng.integers(6, 16)), compactness=8, start_label=0)
    fine = slic(crop, n_segments=int(rng.integers(60, 140)), compactness=12, start_label=0)
    classes = rng.integers(0, SCENE_CLASSES, coarse.max() + 1)
    semantic = classes[coarse].astype(np.uint8)
    things = semantic < SCENE_CLASSES // 2
    masks = [m for k in range(fine.max() + 1) if (m := (fine == k) & things).sum() >= 64]
    return rgb, semantic, masks


def write_realistic_dataset(root: str, num_images: int, size: tuple[int, int], unique: int = 64,
                            seed: int = 0) -> None:
    """A labeled folder written through the contract: `unique` scenes from skimage's photos (JPEG,
    quality 90, as ImageNet's files) with SLIC label maps painted by the default rule, repeated to
    `num_images` rows (a row's cost does not depend on having been seen: nothing is cached)."""
    from skimage import data as photos

    from dataset_card.contract import layout
    from dataset_card.contract.output_folder import OutputFolder
    from dataset_card.contract.schema import build_features, rows_to_table
    from dataset_card.synthetic.shapes import synthetic_row

    sources = [photos.astronaut(), photos.chelsea(), photos.coffee(), photos.rocket(), photos.cat(),
               np.stack([photos.camera()] * 3, -1)]
    rng = np.random.default_rng(seed)
    classes = tuple(layout.SemanticClass(i, f"class{i}", i < SCENE_CLASSES // 2) for i in range(SCENE_CLASSES))
    metadata = layout.DatasetMetadata(("scene",), classes, semantic_source="SLIC scenes")
    features = build_features(metadata.class_names, metadata.semantic_class_names)
    scenes = []
    for i in range(unique):
        rgb, semantic, masks = realistic_scene(sources[i % len(sources)], rng, size)
        row, _ = synthetic_row(f"scene/{i:06d}", 0, rgb, semantic, masks, metadata.thing_ids, metadata.painting)
        buf = io.BytesIO()
        Image.fromarray(rgb).save(buf, format="JPEG", quality=90)
        row["image"] = {"bytes": buf.getvalue(), "path": f"scene/{i:06d}.jpg"}
        scenes.append(row)
    folder = OutputFolder.open(root)
    num_shards = max(2, num_images // 256)
    bounds = np.linspace(0, num_images, num_shards + 1).astype(int)
    for s in range(num_shards):
        rows = [{**scenes[i % unique], "image_id": f"scene/{i:06d}"} for i in range(bounds[s], bounds[s + 1])]
        shards.commit_shard(folder, s, num_shards, rows_to_table(rows, features, metadata.painting.to_dict()),
                            pa.Table.from_pylist([], schema=layout.ERRORS_SCHEMA), layout.ShardStats(shard=s),
                            row_group_size=64)
    folder.write_bytes(layout.METADATA_FILE, metadata.to_json().encode())


def per_core(dataset: LabeledDataset, spec: SampleSpec, img_size: int, samples: int, rounds: int) -> dict[str, list[float]]:
    """Samples per CPU-second of one loader core (the per-sample work of a worker, timed with
    `time.process_time` in this process on one thread, so other jobs on the machine do not count):
    `rgb_only` (decode, crop, flip, normalise), `c2fmae` (`make_sample`: decode image and both maps,
    joint crop, masking draws) and `c2fmae_v2_png` (the same rows with their maps stored as schema v2
    stored them, PNG: the format this one replaced). Rounds rotate."""
    from pretraining.data.augment import joint_transform
    from pretraining.data.loader import _RowReader, make_sample

    reader, rows = _RowReader(dataset, spec.columns), []
    for unit in dataset.units:
        rows += reader.read(unit)
        if len(rows) >= samples:
            break
    rows = rows[:samples]
    png_rows = [dict(row, semantic_mask=v2_png(row["semantic_mask"]), instance_mask=v2_png(row["instance_mask"]))
                for row in rows]
    rgb_only = RgbOnly(dataset, img_size, 1).transform
    transform = joint_transform(img_size, spec.augment)

    def rgb(row, i):
        image = torch.from_numpy(np.require(codecs.decode_image(row["image"]), requirements="W")).permute(2, 0, 1)
        return rgb_only(v2.functional.to_image(image))

    arms = {"rgb_only": (rows, rgb), "c2fmae": (rows, lambda row, i: make_sample(row, i, 0, spec, transform)),
            "c2fmae_v2_png": (png_rows, lambda row, i: make_sample(row, i, 0, spec, transform))}
    rates: dict[str, list[float]] = {name: [] for name in arms}
    for r in range(rounds):
        for name in list(arms)[r % len(arms):] + list(arms)[:r % len(arms)]:
            arm_rows, work = arms[name]
            start = time.process_time()
            for i, row in enumerate(arm_rows):
                work(row, i)
            rates[name].append(len(arm_rows) / (time.process_time() - start))
    return rates


def v2_png(data: bytes) -> bytes:
    """A label map as dataset schema v2 stored it: a single-channel PNG at compression level 1."""
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(codecs.decode_mask(data, dtype=None))).save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


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


def figures(median: dict[str, float]) -> str:
    """The per-core key=value figures of the last line."""
    return (f"loader_over_rgb_only={median['c2fmae'] / median['rgb_only']:.3f} "
            f"v2_png_over_rgb_only={median['c2fmae_v2_png'] / median['rgb_only']:.3f} "
            f"c2fmae_samples_per_s_per_core={median['c2fmae']:.0f} rgb_only_samples_per_s_per_core={median['rgb_only']:.0f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", help="a labeled folder (default: write a synthetic one)")
    parser.add_argument("--num-images", type=int, default=1536, help="synthetic images to write without --data")
    parser.add_argument("--image-size", type=int, nargs=2, default=(375, 500), help="synthetic image H W")
    parser.add_argument("--unique", type=int, default=64, help="distinct scenes in the synthetic folder (rows repeat them)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--img-size", type=int, default=224, help="crop size")
    parser.add_argument("--warmup", type=int, default=2, help="untimed batches at the start")
    parser.add_argument("--rounds", type=int, default=3,
                        help="times each loader is timed, in rotating order; the ratio is the median over rounds")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="where Batch.to runs for the c2fmae+to row (default: cuda when there is one)")
    parser.add_argument("--per-core-samples", type=int, default=256, help="samples per round of the per-core timing")
    parser.add_argument("--no-wall", dest="wall", action="store_false",
                        help="only the per-core CPU-time figures (the wall-clock rounds need idle cores to mean anything)")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        root = args.data
        if root is None:
            root = str(Path(tmp) / "labeled")
            write_realistic_dataset(root, args.num_images, tuple(args.image_size), args.unique)
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
        for r in range(args.rounds if args.wall else 0):
            names = list(arms)[r % len(arms):] + list(arms)[:r % len(arms)]
            rounds.append({name: time_loader(arms[name](), args.batch_size, args.warmup, limit) for name in names})
        cores = per_core(dataset, spec, args.img_size, args.per_core_samples, args.rounds)

    print(f"Per loader core (CPU time of one worker's per-sample work, one thread; median of {args.rounds} rounds):")
    print(f"{'loader':<22} {'samples/s/core':>14} {'ms/sample':>9} {'ratio':>6}")
    median = {name: statistics.median(v) for name, v in cores.items()}
    for name, rate in median.items():
        print(f"{name:<22} {rate:>14.1f} {1e3 / rate:>9.2f} {rate / median['rgb_only']:>6.3f}")
    if not rounds:
        print(figures(median))
        return
    print("\nWall clock, whole loaders (DataLoader workers, IPC, batching):")

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
          f"{statistics.median(r['c2fmae+to'] for r in ratios):.3f}); wall_loader_over_rgb_only below leaves it to the "
          f"device (median over {len(ratios)} rounds). loader_over_rgb_only is the per-core ratio:")
    print(f"{figures(median)} wall_loader_over_rgb_only={statistics.median(r['c2fmae'] for r in ratios):.3f}")


if __name__ == "__main__":
    main()

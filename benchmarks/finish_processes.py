"""Benchmark: SAM's CPU half (`instance_finish.finish_image`) in the model actor's threads against its own
processes (`labelers.child_pool.FinishPool`), on this CPU.

Inputs are real `DeviceResult`s: the tiny random SAM twin's device pass over photos with a
`--side` px long side (the pipeline's model size is 1024), the pipeline's cleanup settings
(`min_mask_region_area` 100, `max_mask_fraction` 0.95). Measured in one run, side by side:

- per image, one at a time, taking turns (each image's best of `--repeats`): `finish_image` in
  this thread; the same through one child process (pickling the DeviceResult and the records, both
  pipe transfers, the child's work); a child round trip that carries the DeviceResult and does no
  work; pickling both ways alone. The pool's overhead per image is the round trip plus the reply's
  pickling;
- a stand-in for the thread that launches GPU kernels: a Python thread calling a small torch op
  in a loop (a kernel launch is a few microseconds of Python and C++ under the GIL), its calls/s
  alone, then while `--workers` threads finish images, then while `--workers` child processes do.
  On this machine the processes also compete with it for cores (2 cores, shared), so the figure
  bounds the GPU-side gain from below at best; that gain on a GPU node (16 cores, no GPU here) is
  an estimate, not a measurement.

    PYTHONPATH=. python benchmarks/finish_processes.py [--side 1024 --images 4 --workers 2]

Prints a table; the last line is `key=value` pairs.
"""

from __future__ import annotations

import argparse
import operator
import os
import pickle
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import cv2
import numpy as np
import torch

from labeling.labelers.child_pool import ChildPool, FinishPool
from labeling.labelers.instance import InstanceLabeler, InstanceLabelerConfig
from labeling.labelers.instance_finish import finish_image
from labeling.labelers.tiny_models import build_tiny_sam_random

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.instance_labeler import bench_images  # noqa: E402  (the SAM benchmark's photos)


def interleaved_ms(fns, items, repeats: int) -> list[float]:
    """Mean ms per item of each of `fns`, each item's time the best of `repeats`; the functions take
    turns on every item, so a change in the machine's load hits them alike."""
    best = [[float("inf")] * len(items) for _ in fns]
    for _ in range(repeats):
        for i, item in enumerate(items):
            for k, fn in enumerate(fns):
                start = time.perf_counter()
                fn(item)
                best[k][i] = min(best[k][i], time.perf_counter() - start)
    return [1000 * float(np.mean(b)) for b in best]


def pickled_both_ways(pair) -> None:
    """What the pool adds to one image besides the pipes: its DeviceResult and its records pickled and read back."""
    result, records = pair
    pickle.loads(pickle.dumps(result, protocol=pickle.HIGHEST_PROTOCOL))
    pickle.loads(pickle.dumps(("ok", records), protocol=pickle.HIGHEST_PROTOCOL))


def launcher_rate(seconds: float, stop_after: threading.Event | None = None) -> float:
    """Calls/s of a small torch op in a loop on this thread, for `seconds` (the kernel-launch stand-in)."""
    x, calls = torch.zeros(16), 0
    start = time.perf_counter()
    while time.perf_counter() - start < seconds:
        for _ in range(100):
            x.add_(1.0)
        calls += 100
    return calls / (time.perf_counter() - start)


def rate_beside(finish, results, workers: int, seconds: float) -> tuple[float, float]:
    """(launcher calls/s, images finished/s) while `workers` threads call `finish` on images in a loop."""
    stop, done = threading.Event(), [0]
    lock = threading.Lock()

    def loop(k: int):
        i = k
        while not stop.is_set():
            finish(results[i % len(results)])
            i += workers
            with lock:
                done[0] += 1

    with ThreadPoolExecutor(workers) as threads:
        running = [threads.submit(loop, k) for k in range(workers)]
        time.sleep(0.5)  # every worker busy before the window opens
        before = done[0]
        start = time.perf_counter()
        rate = launcher_rate(seconds)
        images = (done[0] - before) / (time.perf_counter() - start)
        stop.set()
        for future in running:
            future.result()
    return rate, images


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--side", type=int, default=1024, help="long side of the images the models see")
    p.add_argument("--images", type=int, default=4)
    p.add_argument("--points-per-side", type=int, default=16)
    p.add_argument("--workers", type=int, default=2, help="finishing threads, then processes (the actor's cpu_threads)")
    p.add_argument("--repeats", type=int, default=3, help="per-image timings: best of this many")
    p.add_argument("--seconds", type=float, default=3.0, help="length of each launcher window")
    p.add_argument("--rounds", type=int, default=3, help="launcher windows per setting, taking turns")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    cv2.setNumThreads(1)

    torch.manual_seed(0)
    cfg = InstanceLabelerConfig(points_per_side=args.points_per_side, pred_iou_thresh=0.65, stability_score_thresh=0.8,
                                min_mask_region_area=100, max_mask_fraction=0.95)
    labeler = InstanceLabeler(build_tiny_sam_random(), cfg)
    results = list(labeler.device_pass(labeler.prepare(im) for im in bench_images(args.images, args.side)))
    masks = sum(len(finish_image(cfg, r)) for r in results) / len(results)
    sent_kb = np.mean([len(pickle.dumps(r, protocol=pickle.HIGHEST_PROTOCOL)) for r in results]) / 1e3
    back_kb = np.mean([len(pickle.dumps(finish_image(cfg, r), protocol=pickle.HIGHEST_PROTOCOL))
                       for r in results]) / 1e3

    one = FinishPool(1, cfg)
    assert [one(r) for r in results] == [finish_image(cfg, r) for r in results], "the child's records differ"
    empty = ChildPool(1, operator.attrgetter("count"))  # the DeviceResult there, a number back: no work
    empty(results[0])
    thread_ms, process_ms, empty_ms = interleaved_ms([lambda r: finish_image(cfg, r), one, empty], results,
                                                     args.repeats)
    pickle_ms, = interleaved_ms([pickled_both_ways], [(r, finish_image(cfg, r)) for r in results], args.repeats)
    one.close()
    empty.close()

    pool = FinishPool(args.workers, cfg)
    for result in results[: args.workers]:  # its children started before the windows open
        pool(result)
    rounds = {"alone": [], "threads": [], "processes": []}
    for _ in range(args.rounds):  # taking turns, as above
        rounds["alone"].append((launcher_rate(args.seconds), 0.0))
        rounds["threads"].append(rate_beside(lambda r: finish_image(cfg, r), results, args.workers, args.seconds))
        rounds["processes"].append(rate_beside(pool, results, args.workers, args.seconds))
    pool.close()
    (alone, _), (by_threads, images_threads), (by_processes, images_processes) = (
        np.median(np.array(v), axis=0).tolist() for v in rounds.values())

    print(f"{args.images} images, long side {args.side} px, {masks:.0f} masks an image; DeviceResult "
          f"{sent_kb:.0f} KB pickled, records {back_kb:.0f} KB")
    print(f"{'one image at a time':<36} {'ms / image':>10} {'vs thread':>10}")
    print(f"{'finish_image in this thread':<36} {thread_ms:>10.1f} {1.0:>10.2f}")
    print(f"{'through one child process':<36} {process_ms:>10.1f} {process_ms / thread_ms:>10.2f}")
    print(f"{'child round trip, no work':<36} {empty_ms:>10.1f} {empty_ms / thread_ms:>10.2f}")
    print(f"{'pickling both ways (in the above)':<36} {pickle_ms:>10.1f} {pickle_ms / thread_ms:>10.2f}")
    print(f"{'kernel-launch stand-in beside':<36} {'calls / s':>10} {'vs alone':>10} {'images / s':>11}")
    print(f"{'nothing':<36} {alone:>10.0f} {1.0:>10.2f} {'':>11}")
    print(f"{f'{args.workers} finishing threads':<36} {by_threads:>10.0f} {by_threads / alone:>10.2f} "
          f"{images_threads:>11.2f}")
    print(f"{f'{args.workers} finishing processes':<36} {by_processes:>10.0f} {by_processes / alone:>10.2f} "
          f"{images_processes:>11.2f}")
    print(f"{args.rounds} rounds of {args.seconds:g} s windows, medians; load average {os.getloadavg()[0]:.1f} "
          f"on {os.cpu_count()} cores")
    print(f"thread_ms={thread_ms:.1f} process_ms={process_ms:.1f} round_trip_ms={empty_ms:.2f} "
          f"overhead_ratio={process_ms / thread_ms:.3f} launcher_threads={by_threads / alone:.3f} "
          f"launcher_processes={by_processes / alone:.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

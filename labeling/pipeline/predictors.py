"""The model stage's Ray actor: both labelers on one device, mapping Arrow batches (the predictor interface).

`ModelPredictor` is constructed from a `ModelChoice` and the device the run planned ("cuda": the
actor's own GPU, or "cpu", asked for) and called on Arrow batches. An actor that was given a GPU
and sees no CUDA device fails at start (`GPUUnavailable`, one sentence naming the driver and torch's
CUDA build) instead of labeling on its CPU. It holds SAM and the semantic model together, so every
GPU runs both and none waits for another's model. What it reads per row: `image_id`, the original file bytes
(`image_bytes`) and the size the read stage found in the header (`width`, `height`); rows whose
`error_type` is set are passed through untouched. It decodes the bytes itself, while the device
works (`labeling.labelers.paired`): its CPU threads hand each file to a child process of the
actor's own (`labeling.labelers.child_pool.DecodePool`, up to `cpu_threads` of them on a GPU, one
on a CPU), so a decoder that crashes on a file (a codec's segfault, an abort, the out-of-memory
killer) costs that file, an `undecodable` row saying the decoder crashed, and the actor goes on
with its models loaded. On a GPU, SAM's CPU half of each image (RLE strings, cross-crop NMS, the
small-region cleanup) runs in processes of the actor's own too (`child_pool.FinishPool`, up to
`cpu_threads`), so it does not hold the GIL the thread launching the GPU's kernels needs; a crash
there costs that image (a `model_failed` row saying the process died and how) and the actor goes
on. A CPU actor runs it in its threads (`finish_processes` chooses): with one core there is no GIL
contention to win back. Model-size pixels never cross the object store. Ray Data calls an actor
with two batches at once (`cluster.Layout.pool`): their device passes take turns, so one batch's
decoding and CPU half run while the other's models do.
What it adds per row:

- `instances_json`: a JSON list of masks in the labelers' format ({"rle": {"size": [h, w],
  "counts"}, "bbox", "area", "predicted_iou", "stability_score"}) at model resolution
  (`pixels_h`, `pixels_w`), already COCO-RLE encoded and filtered;
- `semantic`: the class map at the image's original size (`semantic_h`, `semantic_w` = `height`,
  `width`) as raw bytes in the contract's dtype (uint8 below 255 classes, else uint16);
- `count_semantic_fillers`: the filler images the semantic model computed to complete its passes
  (`labelers.semantic`), on the first labeled row of each labeler call (0 elsewhere); stats.json sums it;
- `environment`: what made the labels (this actor's libraries, CUDA, driver, GPU, compile flag:
  `labeling.pipeline.environment`), collected once at start; the shard's footer lists them.

A failure is recorded in the row's `error_*` columns instead of raised (an undecodable file at
stage "decode", anything else, a failed or crashed CPU half included, at "model"). The batch runs under the failure policy
(`failures.run_each`): a batch that fails is retried one image at a time, so one bad image cannot
take the others with it; out-of-memory is retried in smaller batches, never recorded; a fatal
accelerator error is no image's fault: the actor's process ends and Ray restarts it and retries
the batch. Upsampling, alignment, painting and the label
maps' encoding happen later on CPUs (`labeling.pipeline.postprocess`).
"""

from __future__ import annotations

import json
import warnings

import numpy as np
import pyarrow as pa

from dataset_card.contract.codecs import DecodeError
from labeling.pipeline import environment, failures
from labeling.pipeline.failures import run_each
from labeling.pipeline.preprocess import DECODED_SCHEMA

MODELS_SCHEMA = pa.schema(
    [f for f in DECODED_SCHEMA if f.name not in ("time_read", "started_at")]
    + [("pixels_h", pa.int32()), ("pixels_w", pa.int32()), ("time_read", pa.float64()), ("started_at", pa.float64()),
       ("instances_json", pa.string()), ("time_instance", pa.float64()),
       ("semantic", pa.large_binary()), ("semantic_h", pa.int32()), ("semantic_w", pa.int32()),
       ("time_semantic", pa.float64()), ("count_semantic_fillers", pa.int64()), ("environment", pa.string())]
)


class GPUUnavailable(RuntimeError):
    """A model actor was given a GPU but torch sees no CUDA device; the message says what to do."""


def _device(requested: str) -> str:
    """`requested` ("cuda" or "cpu") if this process can use it; never a silent fall back to the CPU."""
    import torch

    if requested == "cpu" or torch.cuda.is_available():
        return requested
    raise GPUUnavailable(environment.no_cuda_sentence())


def _quiet_loading(threads: int | None) -> None:
    """Torch threads for this actor, and no per-actor download/loading progress bars in the logs."""
    import transformers

    transformers.utils.logging.disable_progress_bar()
    if threads:
        import torch

        torch.set_num_threads(threads)


def _masks_json(masks: list[dict]) -> str:
    return json.dumps([
        {"rle": {"size": [int(s) for s in m["rle"]["size"]], "counts": _text(m["rle"]["counts"])},
         "bbox": [float(v) for v in m["bbox"]], "area": int(m["area"]),
         "predicted_iou": float(m["predicted_iou"]), "stability_score": float(m["stability_score"])}
        for m in masks
    ])


def _text(counts) -> str:
    return counts.decode("ascii") if isinstance(counts, bytes) else counts


_EMPTY = {"instances_json": "[]", "semantic": b"", "semantic_h": 0, "semantic_w": 0, "pixels_h": 0, "pixels_w": 0,
          "time_instance": 0.0, "time_semantic": 0.0, "count_semantic_fillers": 0}


class ModelPredictor:
    """SAM and the semantic model for DECODED_SCHEMA batches -> MODELS_SCHEMA batches."""

    def __init__(self, choice, device: str = "cpu", threads: int | None = None, max_side: int = 1024,
                 max_pixels: int = 100_000_000, cpu_threads: int = 4, decode=None,
                 finish_processes: bool | None = None, finish=None):
        """`decode`: what the decoding processes run (`model_input.decode` unless given);
        `finish_processes`: SAM's CPU half in processes of the actor's own (None: on a GPU only);
        `finish`: what they run (`instance_finish.finish_image` unless given)."""
        device = _device(device)  # before any library loads: an actor without its GPU stops at once
        from PIL import Image

        from labeling.labelers.child_pool import DecodePool, FinishPool
        from labeling.labelers.paired import PairedLabeler

        _quiet_loading(threads)
        Image.MAX_IMAGE_PIXELS = max_pixels  # our own limit, checked from the header, decides:
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # PIL only warns below 2x of it
        # A CPU actor has half a CPU or one: one decoding process is all it can use.
        decoder = DecodePool(cpu_threads if device == "cuda" else 1, max_pixels, max_side, decode)
        instance = choice.instance_labeler(device)
        in_processes = device == "cuda" if finish_processes is None else finish_processes
        finisher = FinishPool(cpu_threads if device == "cuda" else 1, instance.cfg, finish) if in_processes else None
        self.labeler = PairedLabeler(instance, choice.semantic_labeler(device), max_side, max_pixels, cpu_threads,
                                     decoder=decoder, finisher=finisher)
        self.environment = environment.encode(environment.collect(device, self.labeler.instance.compiled))

    def __call__(self, batch: pa.Table) -> pa.Table:
        rows = batch.to_pylist()
        todo = [r for r in rows if not r["error_type"]]
        results = run_each(self.labeler, [r["image_bytes"] for r in todo])
        for row in rows:
            row.update(_EMPTY, environment=self.environment)
        for row, result in zip(todo, results):
            if isinstance(result, DecodeError):
                row.update(failures.from_exception(failures.DECODE, result).as_row())
            elif isinstance(result, BaseException):
                row.update(failures.from_exception(failures.MODEL, result).as_row())
            else:
                class_map: np.ndarray = np.ascontiguousarray(result.semantic)
                row.update(instances_json=_masks_json(result.masks), semantic=class_map.tobytes(),
                           semantic_h=class_map.shape[0], semantic_w=class_map.shape[1],
                           pixels_h=result.model_size[0], pixels_w=result.model_size[1],
                           time_read=row["time_read"] + result.seconds["decode"],
                           time_instance=result.seconds["instance"], time_semantic=result.seconds["semantic"],
                           count_semantic_fillers=result.semantic_fillers)
        return pa.Table.from_pylist(rows, schema=MODELS_SCHEMA)

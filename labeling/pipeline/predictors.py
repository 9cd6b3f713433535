"""The model stage's Ray actor: both labelers on one device, mapping Arrow batches (the predictor interface).

`ModelPredictor` is constructed from a `ModelChoice` (on the actor's own GPU, or the CPU) and called
on Arrow batches. It holds SAM and the semantic model together, so every GPU runs both and none
waits for another's model. What it reads per row: `image_id`, the original file bytes
(`image_bytes`) and the size the read stage found in the header (`width`, `height`); rows whose
`error_type` is set are passed through untouched. It decodes the bytes itself, in a thread pool,
while the device works (`labeling.labelers.paired`): model-size pixels never cross the object store.
What it adds per row:

- `instances_json`: a JSON list of masks in the labelers' format ({"rle": {"size": [h, w],
  "counts"}, "bbox", "area", "predicted_iou", "stability_score"}) at model resolution
  (`pixels_h`, `pixels_w`), already COCO-RLE encoded and filtered;
- `semantic`: the class map at the image's original size (`semantic_h`, `semantic_w` = `height`,
  `width`) as raw bytes in the contract's dtype (uint8 below 255 classes, else uint16);
- `environment`: what made the labels (this actor's libraries, CUDA, driver, GPU, compile flag:
  `labeling.pipeline.environment`), collected once at start; the shard's footer lists them.

A failure is recorded in the row's `error_*` columns instead of raised (an undecodable file at
stage "decode", anything else at "model"). When a whole batch fails, it is retried one image at a
time, so one bad image cannot take the others with it. A fatal accelerator error (not
out-of-memory) is no image's fault: the actor's process ends and Ray restarts it and retries the
batch (`failures.restart_on_fatal_device_error`). Upsampling, alignment, painting and the label
maps' encoding happen later on CPUs (`labeling.pipeline.postprocess`).
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Callable, Sequence

import numpy as np
import pyarrow as pa

from dataset_card.contract.codecs import DecodeError
from labeling.pipeline import environment, failures
from labeling.pipeline.preprocess import DECODED_SCHEMA

MODELS_SCHEMA = pa.schema(
    [f for f in DECODED_SCHEMA if f.name not in ("time_read", "started_at")]
    + [("pixels_h", pa.int32()), ("pixels_w", pa.int32()), ("time_read", pa.float64()), ("started_at", pa.float64()),
       ("instances_json", pa.string()), ("time_instance", pa.float64()),
       ("semantic", pa.large_binary()), ("semantic_h", pa.int32()), ("semantic_w", pa.int32()),
       ("time_semantic", pa.float64()), ("environment", pa.string())]
)


def run_each(fn: Callable[[list], list], items: Sequence) -> list:
    """fn(items), or when that raises, fn([item]) for each item: a result or the exception it raised.

    A fatal device error (`failures.is_fatal_device_error`) is raised, never recorded."""
    if not items:
        return []
    try:
        results = fn(list(items))
        if len(results) != len(items):
            raise RuntimeError(f"the model returned {len(results)} results for {len(items)} images")
        return list(results)
    except Exception as err:  # find the culprit: retry alone, so the others still get labels
        failures.restart_on_fatal_device_error(err)  # a poisoned CUDA context: a new actor, not a failure
        _free_accelerator_memory()
    out = []
    for item in items:
        try:
            out.append(fn([item])[0])
        except Exception as err:
            failures.restart_on_fatal_device_error(err)
            _free_accelerator_memory()
            out.append(err)
    return out


def _free_accelerator_memory() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _device(num_gpus: float) -> str:
    import torch

    return "cuda" if num_gpus > 0 and torch.cuda.is_available() else "cpu"


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
          "time_instance": 0.0, "time_semantic": 0.0}


class ModelPredictor:
    """SAM and the semantic model for DECODED_SCHEMA batches -> MODELS_SCHEMA batches."""

    def __init__(self, choice, num_gpus: float = 0.0, threads: int | None = None, max_side: int = 1024,
                 max_pixels: int = 100_000_000, cpu_threads: int = 4):
        from PIL import Image

        from labeling.labelers.paired import PairedLabeler

        _quiet_loading(threads)
        Image.MAX_IMAGE_PIXELS = max_pixels  # our own limit, checked from the header, decides:
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # PIL only warns below 2x of it
        device = _device(num_gpus)
        self.labeler = PairedLabeler(choice.instance_labeler(device), choice.semantic_labeler(device), max_side,
                                     max_pixels, cpu_threads)
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
                           time_instance=result.seconds["instance"], time_semantic=result.seconds["semantic"])
        return pa.Table.from_pylist(rows, schema=MODELS_SCHEMA)

"""Predictors: Ray actor classes that load a model once and map batches (the predictor interface).

A predictor is constructed from a `ModelChoice` (on the actor's own GPU, or the CPU) and called on
Arrow batches. What it reads per row: `image_id`, the decoded pixels at model resolution
(`pixels`, `pixels_h`, `pixels_w`: raw (h, w, 3) uint8) and the original size (`width`,
`height`); rows whose `error_type` is set are passed through untouched. What it adds per row:

- `InstancePredictor`: `instances_json`, a JSON list of masks in the labelers' format
  ({"rle": {"size": [h, w], "counts"}, "bbox", "area", "predicted_iou", "stability_score"}) at
  model resolution, already COCO-RLE encoded and filtered;
- `SemanticPredictor`: `semantic`, the class map at the image's original size (`semantic_h`,
  `semantic_w` = `height`, `width`) as raw bytes in the contract's dtype (uint8 below 255
  classes, else uint16): the labeler upsamples its class scores on the device, where the argmax
  is taken; it drops `pixels`, which nothing after it needs.

A failure is recorded in the row's `error_*` columns instead of raised. When a whole batch
fails, it is retried one image at a time, so one bad image cannot take the others with it. A
fatal accelerator error (not out-of-memory) is no image's fault: the actor's process ends and Ray
restarts it and retries the batch (`failures.restart_on_fatal_device_error`).
The instance masks' upsampling, alignment, painting and PNG encoding happen later on CPUs
(`labeling.pipeline.postprocess`).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence

import numpy as np
import pyarrow as pa

from labeling.pipeline import failures
from labeling.pipeline.preprocess import DECODED_SCHEMA, model_pixels

INSTANCE_SCHEMA = pa.schema(list(DECODED_SCHEMA) + [("instances_json", pa.string()), ("time_instance", pa.float64())])
MODELS_SCHEMA = pa.schema(
    [f for f in INSTANCE_SCHEMA if f.name != "pixels"]
    + [("semantic", pa.large_binary()), ("semantic_h", pa.int32()), ("semantic_w", pa.int32()),
       ("time_semantic", pa.float64())]
)


def run_each(fn: Callable[[list], list], items: Sequence) -> list:
    """fn(items), or when that raises, fn([item]) for each item: a result or the exception it raised."""
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


def _map_rows(batch: pa.Table, model: Callable[[list], list], fill: Callable[[dict, object], None],
              empty: Callable[[dict], None], schema: pa.Schema, time_column: str,
              item: Callable[[dict], object] = model_pixels) -> pa.Table:
    """`model` on `item(row)` of every row that has not failed; `fill` / `empty` write the results."""
    start = time.perf_counter()
    rows = batch.to_pylist()
    todo = [r for r in rows if not r["error_type"]]
    results = run_each(model, [item(r) for r in todo])
    for row in rows:
        empty(row)
    for row, result in zip(todo, results):
        if isinstance(result, BaseException):
            row.update(failures.from_exception(failures.MODEL, result).as_row())
        else:
            fill(row, result)
    per_row = (time.perf_counter() - start) / max(1, len(rows))
    for row in rows:
        row[time_column] = per_row
    return pa.Table.from_pylist(rows, schema=schema)


def _masks_json(masks: list[dict]) -> str:
    return json.dumps([
        {"rle": {"size": [int(s) for s in m["rle"]["size"]], "counts": _text(m["rle"]["counts"])},
         "bbox": [float(v) for v in m["bbox"]], "area": int(m["area"]),
         "predicted_iou": float(m["predicted_iou"]), "stability_score": float(m["stability_score"])}
        for m in masks
    ])


def _text(counts) -> str:
    return counts.decode("ascii") if isinstance(counts, bytes) else counts


class InstancePredictor:
    """Automatic instance masks (SAM) for DECODED_SCHEMA batches -> INSTANCE_SCHEMA batches."""

    def __init__(self, choice, num_gpus: float = 0.0, threads: int | None = None):
        _quiet_loading(threads)
        self.labeler = choice.instance_labeler(_device(num_gpus))

    def __call__(self, batch: pa.Table) -> pa.Table:
        def fill(row, masks):
            row["instances_json"] = _masks_json(masks)

        def empty(row):
            row["instances_json"] = "[]"

        return _map_rows(batch, self.labeler, fill, empty, INSTANCE_SCHEMA, "time_instance")


class SemanticPredictor:
    """Full-size semantic class maps for INSTANCE_SCHEMA batches -> MODELS_SCHEMA batches."""

    def __init__(self, choice, num_gpus: float = 0.0, threads: int | None = None):
        _quiet_loading(threads)
        self.labeler = choice.semantic_labeler(_device(num_gpus))

    def _label(self, items: list) -> list:
        return self.labeler([pixels for pixels, _ in items], [size for _, size in items])

    def __call__(self, batch: pa.Table) -> pa.Table:
        def fill(row, class_map: np.ndarray):
            row.update(semantic=np.ascontiguousarray(class_map).tobytes(),
                       semantic_h=class_map.shape[0], semantic_w=class_map.shape[1])

        def empty(row):
            row.update(semantic=b"", semantic_h=0, semantic_w=0)

        def item(row):  # the models' pixels and the original size the map is wanted at
            return model_pixels(row), (int(row["height"]), int(row["width"]))

        return _map_rows(batch, self._label, fill, empty, MODELS_SCHEMA, "time_semantic", item)

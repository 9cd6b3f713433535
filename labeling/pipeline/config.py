"""One labeling run's configuration (`LabelingConfig`), and what it implies: the models a `--models`
preset and its overrides name (`model_choice`), the painting rule, the models' input size.

Fields made with `label_shaping` shape the labels: the manifest records them and a resume compares
them (`manifest`); every other field may change between a run and its resume.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from dataset_card.card.source import CardOptions
from dataset_card.contract import shards
from dataset_card.contract.painting import DEFAULT_RULE, PaintingRule, rule_named
from labeling.inputs.input_list import InputError
from labeling.labelers.model_choice import ModelChoice

# Stop when more than this share of the most recent images failed (--max-failure-rate): ImageNet
# has a handful of odd files in 1.28M, so a tenth failing is a systematic fault, not bad luck.
DEFAULT_MAX_FAILURE_RATE = 0.1


def label_shaping(default):
    """A `LabelingConfig` field that shapes the labels: recorded in the manifest's "arguments",
    compared on resume and part of every shard's footer hash (`manifest.labels_hash`). Any other
    field may change between a run and its resume."""
    return field(default=default, metadata={"labels": True})


@dataclass(frozen=True)
class LabelingConfig:
    """One labeling run. Fields made with `label_shaping` shape the output and are compared on resume;
    the models are compared by identity (`ModelChoice.describe`), not by the arguments that name them."""

    input: str
    output: str
    models: str = label_shaping("default")
    shard_size: int = label_shaping(1000)
    limit: int | None = None  # picks inputs; shards are keyed by image id, so it may change
    # --sample N: a class-stratified sample (labeling.inputs.sample) in shards planned for every input,
    # so a larger sample or the full run resumes the folder and labels only what is new.
    sample: int | None = None
    sample_seed: int = 0
    max_pixels: int = label_shaping(100_000_000)
    # What a row is: its image and its label.
    input_format: str = label_shaping("auto")
    file_list: str | None = None
    image_column: str = label_shaping("image")
    label_column: str = label_shaping("label")
    split: str = label_shaping("train")
    # The models, compared by what they are: SAM's weights by sha256, the semantic model by repo and
    # commit (resolved once, then reused on every resume) or a local folder's content hash.
    sam_type: str | None = None
    sam_checkpoint: str | None = None
    semantic_model: str | None = None
    semantic_revision: str | None = None
    staged_models: str | None = None  # a folder from `python -m labeling.stage_models`: actors load from it
    semantic_shortest_edge: int | None = label_shaping(None)
    model_max_side: int | None = label_shaping(None)
    points_per_side: int | None = label_shaping(None)
    pred_iou_thresh: float | None = label_shaping(None)
    stability_score_thresh: float | None = label_shaping(None)
    compile: bool | None = label_shaping(None)  # torch.compile SAM; None: on a GPU (float rounding may differ)
    min_instance_area: int = label_shaping(16)
    painting_rule: str = label_shaping(DEFAULT_RULE)
    min_purity: float | None = label_shaping(None)
    image_storage: str = label_shaping("inline")  # or "reference": a labels-only release (no image bytes)
    # Execution: may change between a run and its resume (batch sizes give the same labels:
    # tests/test_label_determinism.py).
    read_batch_size: int = 16
    model_batch_size: int = 8
    # SAM's prompts per decoder call, crops per encoder call and the semantic model's images per pass
    # (None: the labelers' defaults); every call is padded to them, so they change speed and memory, and
    # labels by float rounding at most (manifest.SPEED_PARAMS: recorded, not compared).
    sam_points_per_batch: int | None = None
    sam_encoder_batch_size: int | None = None
    semantic_batch_size: int | None = None  # images per semantic forward pass (bucket fillers included)
    postprocess_batch_size: int = 8
    device: str = "auto"  # model actors on "cuda", or "cpu" when asked (auto: CPUs only for the tiny twins)
    wait_for_gpus: float | None = None  # seconds to wait for a first GPU (None: 30 min with an autoscaler)
    model_actors: int | None = None  # a fixed pool; None: see cluster.plan_layout
    min_model_actors: int | None = None
    max_model_actors: int | None = None  # None: as many as the cluster fits, as it grows
    gpus_per_actor: float | None = None
    actor_cpus: float | None = None
    task_cpus: float | None = None
    listing_workers: int = 32
    address: str | None = None  # Ray cluster to join (default: $RAY_ADDRESS, else a local Ray)
    num_cpus: int | None = None  # of a local Ray
    object_store_memory: int | None = None  # of a local Ray
    overwrite: bool = False
    strict_environment: bool = False  # refuse, instead of warning, to resume under another environment
    retry_errors: bool = False
    no_repair: bool = False  # refuse, instead of repairing, committed shards that fail verification
    max_failure_rate: float = DEFAULT_MAX_FAILURE_RATE
    storage_retry_s: float = shards.RETRY_S  # writes retry a transient error this long (a storage outage)
    failure_window: int = 2000  # images of the most recent committed shards the rate is judged over
    driver_restarts: int = 0  # restarts of the driver before this one (`labeling/run.py --max-restarts`)
    progress: bool = True
    # What the dataset card says of the images (name, licence, source): OUTPUT/card.json keeps it.
    card: CardOptions = CardOptions()

    def arguments(self) -> dict:
        """What shapes the labels (manifest "arguments"): the `label_shaping` fields. Where inputs and
        output live is not in it: a moved dataset resumes, and each shard's footer pins its inputs."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.metadata.get("labels")}

    def execution(self) -> dict:
        """Everything else but the card (manifest "execution", recorded only)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                if not f.metadata.get("labels") and f.name != "card"}


# What `--models` implies where the user did not say: real models at SAM's size, twins at theirs.
PRESET_DEFAULTS = {
    # SA-1B's own mask filters (Kirillov et al. 2023): holes and islands under 100 px are cleaned,
    # and masks covering 95% of the image or more (the image itself, not an object) are dropped.
    "default": {"model_max_side": 1024, "instance": {"min_mask_region_area": 100, "max_mask_fraction": 0.95},
                "semantic": {}},
    # The twins' random scores are low: keep what their structure gives (tens of masks per image);
    # their images are small (256 px), so is their semantic input.
    "tiny-random": {"model_max_side": 256,
                    "instance": {"points_per_side": 8, "pred_iou_thresh": 0.65, "stability_score_thresh": 0.8},
                    "semantic": {"shortest_edge": 128}},
}


def model_choice(cfg: LabelingConfig) -> ModelChoice:
    preset = PRESET_DEFAULTS[cfg.models]
    instance = dict(preset["instance"])
    for name in ("points_per_side", "pred_iou_thresh", "stability_score_thresh"):
        if getattr(cfg, name) is not None:
            instance[name] = getattr(cfg, name)
    if cfg.compile is not None:
        instance["compile"] = cfg.compile
    for name in ("points_per_batch", "encoder_batch_size"):
        if getattr(cfg, f"sam_{name}") is not None:
            instance[name] = getattr(cfg, f"sam_{name}")
    semantic = dict(preset["semantic"])
    if cfg.semantic_shortest_edge is not None:
        semantic["shortest_edge"] = cfg.semantic_shortest_edge
    if cfg.semantic_batch_size is not None:
        semantic["batch_size"] = cfg.semantic_batch_size
    base = ModelChoice(preset=cfg.models)
    return dataclasses.replace(
        base,
        sam_type=cfg.sam_type or base.sam_type,
        sam_checkpoint=cfg.sam_checkpoint,
        semantic_model=cfg.semantic_model or base.semantic_model,
        semantic_revision=cfg.semantic_revision,
        staged=cfg.staged_models,
        instance_params=instance,
        semantic_params=semantic,
    )


def painting_rule(cfg: LabelingConfig) -> PaintingRule:
    try:
        return rule_named(cfg.painting_rule, min_purity=cfg.min_purity)
    except ValueError as err:
        raise InputError(f"{err}") from err


def model_max_side(cfg: LabelingConfig) -> int:
    return cfg.model_max_side or PRESET_DEFAULTS[cfg.models]["model_max_side"]

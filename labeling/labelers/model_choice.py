"""`--models`: which instance and semantic models label, how they are loaded, and how the manifest names them.

- "default": SAM vit_h (the official checkpoint by name, or `--sam-checkpoint PATH`) and
  "facebook/mask2former-swin-large-coco-panoptic" (a hub id or a local folder).
- "tiny-random": small randomly initialised twins (`labeling.labelers.tiny_models`), saved to a temporary
  folder and loaded back by path through the same loading code real checkpoints use. Their labels
  are meaningless; they exist for offline smoke runs, tests and benchmarks. With
  `--semantic-model` ADE20K_SEMANTIC_MODEL the semantic twin is the ADE20K one (150 classes).

The semantic alternative with a broader taxonomy: ADE20K_SEMANTIC_MODEL
("facebook/mask2former-swin-large-ade-semantic", `--semantic-model`), Mask2Former Swin-L trained on
ADE20K's 150 scene-parsing classes, which name kinds COCO's 80 things lack (animal, food, plaything,
apparel, flower, basket, vase, ...), but coarsely (one "animal" for every animal) and with 50 stuff
classes of scenes. ADE20K has no thing/stuff split of its own; `semantic.class_taxonomy` takes the
ADE20K panoptic benchmark's (100 things). The default stays COCO panoptic (docs/DESIGN.md says why).

A `ModelChoice` is small and picklable: Ray sends it to every model actor, which builds its
labeler from it once (`instance_labeler` / `semantic_labeler`).

`staged`: a folder `python -m labeling.stage_models` filled (`staged.json` names its files); the
actors load both models from it (no download), and the manifest names them as it would without it:
SAM by the SHA-256 recorded at staging (the head neither downloads nor hashes the checkpoint), the
semantic model by hub repository and commit.
"""

from __future__ import annotations

import atexit
import dataclasses
import hashlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from dataset_card.contract.layout import SemanticClass

DEFAULT_SAM_TYPE = "vit_h"
DEFAULT_SEMANTIC_MODEL = "facebook/mask2former-swin-large-coco-panoptic"
ADE20K_SEMANTIC_MODEL = "facebook/mask2former-swin-large-ade-semantic"  # the broader-taxonomy alternative
PRESETS = ("default", "tiny-random")
TINY_RANDOM_WARNING = (
    "--models tiny-random: randomly initialised tiny models; the labels are MEANINGLESS "
    "(for offline smoke runs and tests only)")


_TINY_BUILT: dict = {}  # seed -> TinyModels built in this process
STAGED_FILE = "staged.json"  # in a folder of staged models (`labeling.stage_models`)


class ModelLoadError(RuntimeError):
    """A model or checkpoint cannot be found or loaded; the message says what to do."""


@dataclass(frozen=True)
class ModelChoice:
    preset: str = "default"
    sam_type: str = DEFAULT_SAM_TYPE
    sam_checkpoint: str | None = None  # None: the official file for `sam_type`, downloaded once
    semantic_model: str = DEFAULT_SEMANTIC_MODEL  # hub id or local folder
    semantic_revision: str | None = None  # hub branch, tag or commit (None: the default branch)
    instance_params: dict = field(default_factory=dict)  # InstanceLabelerConfig overrides
    semantic_params: dict = field(default_factory=dict)  # SemanticLabelerConfig overrides
    seed: int = 0  # tiny-random only
    staged: str | None = None  # a folder of staged models to load from (`labeling.stage_models`)

    def __post_init__(self):
        if self.preset not in PRESETS:
            raise ModelLoadError(f"unknown --models {self.preset!r}; use one of {', '.join(PRESETS)}")

    def staged_models(self) -> dict:
        """`staged.json` of the `staged` folder; one sentence when this node cannot read it."""
        path = os.path.join(self.staged, STAGED_FILE)
        try:
            with open(path) as f:
                return json.load(f)
        except (OSError, ValueError) as err:
            raise ModelLoadError(f"no staged models at {self.staged} ({type(err).__name__}: cannot read {path}): run "
                                 f"python -m labeling.stage_models --out {self.staged} (on every node, or on a path "
                                 "they share)") from err

    def materialize(self) -> ModelChoice:
        """Where the weights are read from: the staged folder's files; for tiny-random, twins built in a
        temporary folder (removed at exit)."""
        if self.staged:
            staged = self.staged_models()
            return dataclasses.replace(self, sam_type=staged["instance"]["type"],
                                       sam_checkpoint=os.path.join(self.staged, staged["instance"]["file"]),
                                       semantic_model=os.path.join(self.staged, staged["semantic"]["folder"]))
        if self.preset != "tiny-random" or self.sam_checkpoint:
            return self
        if self.seed not in _TINY_BUILT:  # once per process (and seed)
            import transformers

            from labeling.labelers.tiny_models import build_tiny_random_models

            transformers.utils.logging.disable_progress_bar()

            folder = tempfile.mkdtemp(prefix="tiny-random-models-")
            atexit.register(shutil.rmtree, folder, ignore_errors=True)
            _TINY_BUILT[self.seed] = build_tiny_random_models(folder, seed=self.seed)
        tiny = _TINY_BUILT[self.seed]
        semantic = tiny.semantic_model
        if self.semantic_model == ADE20K_SEMANTIC_MODEL:  # the ADE20K twin, built beside the others once
            from labeling.labelers.tiny_models import TINY_ADE_SEMANTIC_DIR, build_tiny_ade_semantic

            semantic = os.path.join(os.path.dirname(tiny.sam_checkpoint), TINY_ADE_SEMANTIC_DIR)
            if not os.path.isdir(semantic):
                build_tiny_ade_semantic(semantic, seed=self.seed)
        return dataclasses.replace(self, sam_type=tiny.sam_model_type, sam_checkpoint=tiny.sam_checkpoint,
                                   semantic_model=semantic)

    def instance_config(self):
        from labeling.labelers.instance import InstanceLabelerConfig

        return InstanceLabelerConfig(**self.instance_params)

    def semantic_config(self):
        from labeling.labelers.semantic import SemanticLabelerConfig

        return SemanticLabelerConfig(**self.semantic_params)

    def instance_labeler(self, device: str):
        """The loaded instance labeler (call on the actor that runs it)."""
        from labeling.labelers.checkpoints import CheckpointError, load_sam
        from labeling.labelers.instance import InstanceLabeler

        choice = self.materialize()
        try:
            sam = load_sam(choice.sam_type, choice.sam_checkpoint)
        except CheckpointError as err:
            raise ModelLoadError(str(err)) from err
        return InstanceLabeler(sam, self.instance_config(), device)

    def semantic_labeler(self, device: str):
        from labeling.labelers.semantic import SemanticLabeler

        choice = self.materialize()
        try:
            return SemanticLabeler(choice.semantic_model, self.semantic_config(), device, choice.hub_revision)
        except RuntimeError as err:
            raise ModelLoadError(str(err)) from err

    @property
    def hub_revision(self) -> str | None:
        """The revision to load the semantic model at: None for a local folder (it has none)."""
        return None if os.path.isdir(self.semantic_model) else self.semantic_revision

    def pinned(self, recorded: Mapping | None = None) -> ModelChoice:
        """This choice with the semantic model's hub revision resolved to its commit hash, so every
        actor loads the same weights even if the repository changes during the run (and the
        manifest can name them). A local folder is returned as is (its content hash names it).
        A named SAM checkpoint is fetched first, so a missing one is the first error a user sees.

        recorded: the models an earlier run of the output recorded (its manifest's "models"). When
        they name this hub repository and no revision is given, their commit is reused rather than
        the default branch resolved again: a new upstream commit does not stop a resume."""
        from labeling.labelers.checkpoints import CheckpointError, official_checkpoint

        if self.staged:
            return self._pinned_staged()
        choice = self.materialize()
        if choice.sam_checkpoint is None:
            try:
                official_checkpoint(choice.sam_type, flag="--sam-checkpoint")
            except CheckpointError as err:
                raise ModelLoadError(str(err)) from err
        if os.path.isdir(choice.semantic_model):
            if self.semantic_revision:
                raise ModelLoadError(f"--semantic-revision {self.semantic_revision} was given, but "
                                     f"{choice.semantic_model} is a local folder, which has no revisions: drop it")
            return self
        revision = self.semantic_revision
        earlier = (recorded or {}).get("semantic") or {}
        if revision is None and earlier.get("repo") == choice.semantic_model and earlier.get("revision"):
            revision = earlier["revision"]
        return dataclasses.replace(self, semantic_revision=resolve_hub_revision(choice.semantic_model, revision))

    def _pinned_staged(self) -> ModelChoice:
        """A staged choice at the staged commit, after checking the folder holds the models asked for."""
        staged = self.staged_models()
        if self.sam_checkpoint:
            raise ModelLoadError(f"--sam-checkpoint and --staged-models {self.staged} were both given: pass one")
        if self.preset == "default":
            asked = {"SAM type": (self.sam_type, staged["instance"]["type"]),
                     "semantic model": (self.semantic_model, staged["semantic"]["repo"] or self.semantic_model)}
            if self.semantic_revision:
                asked["semantic revision"] = (self.semantic_revision, staged["semantic"]["revision"])
            wrong = [f"{name} {want!r} (staged: {have!r})" for name, (want, have) in asked.items() if want != have]
            if wrong:
                raise ModelLoadError(f"{self.staged} holds other models than this run asks for: {'; '.join(wrong)}: "
                                     "stage them again with the same flags, or drop the flags to use what is staged")
        return dataclasses.replace(self, semantic_revision=staged["semantic"]["revision"])

    def semantic_classes(self) -> tuple[SemanticClass, ...]:
        """The semantic taxonomy, from the model's config alone (no weights are loaded)."""
        from transformers import AutoConfig

        from labeling.labelers.semantic import class_taxonomy

        choice = self.materialize()
        try:
            config = AutoConfig.from_pretrained(choice.semantic_model, **({"revision": choice.hub_revision}
                                                                          if choice.hub_revision else {}))
        except (OSError, ValueError) as err:
            raise ModelLoadError(
                f"Could not load the semantic model {choice.semantic_model!r} ({type(err).__name__}); pass a "
                "local folder with config.json, weights and preprocessor_config.json as --semantic-model, "
                "or a hub id while online.") from err
        return class_taxonomy(config)

    def describe(self) -> dict:
        """manifest.json's "models": names, checkpoints, content hashes, the semantic model's hub
        repository and revision (call on a `pinned` choice to record the commit), and labeler
        parameters. What identifies a model (`manifest.MODEL_IDENTITY`): SAM's type and weights'
        sha256, the semantic model's hub repository and commit or local folder's sha256, their
        parameters; the checkpoint's path is recorded only (the same file elsewhere is the same model).

        Resolves (and, for named SAM checkpoints while online, downloads) the weights, so a missing
        checkpoint fails here, before any work starts.
        """
        from labeling.labelers.checkpoints import (
            OFFICIAL_CHECKPOINTS,
            CheckpointError,
            file_sha256,
            official_checkpoint,
        )

        choice = self.materialize()
        tiny = self.preset == "tiny-random"
        staged = self.staged_models() if self.staged else None
        if staged:  # checked once, when staged: the head reads the hash instead of the 2.5 GB file
            checkpoint, sam_sha = choice.sam_checkpoint, staged["instance"]["sha256"]
        elif choice.sam_checkpoint is None:
            try:
                checkpoint = official_checkpoint(choice.sam_type, flag="--sam-checkpoint")
            except CheckpointError as err:
                raise ModelLoadError(str(err)) from err
            sam_sha = OFFICIAL_CHECKPOINTS[choice.sam_type][1]  # verified when it was downloaded
        else:
            if not os.path.isfile(choice.sam_checkpoint):
                raise ModelLoadError(f"SAM checkpoint {choice.sam_checkpoint} does not exist; check --sam-checkpoint")
            checkpoint, sam_sha = choice.sam_checkpoint, file_sha256(choice.sam_checkpoint)
        if staged and staged["semantic"]["repo"]:  # named by its hub identity, not by the staged copy's hash
            repo, revision, semantic_sha = staged["semantic"]["repo"], staged["semantic"]["revision"], None
        else:
            semantic_sha = _folder_sha256(choice.semantic_model) if os.path.isdir(choice.semantic_model) else None
            repo, revision = (None if semantic_sha else choice.semantic_model), choice.hub_revision
        return {
            "instance": {
                "name": f"sam_{choice.sam_type}" + (f" (tiny-random, seed {self.seed})" if tiny else ""),
                "type": choice.sam_type,
                "checkpoint": "tiny-random" if tiny else checkpoint,
                "sha256": sam_sha,
                "params": dataclasses.asdict(self.instance_config()),
            },
            "semantic": {
                "name": tiny_semantic_name(choice.semantic_model) if tiny else (repo or choice.semantic_model),
                "checkpoint": "tiny-random" if tiny else choice.semantic_model,
                "repo": repo,  # the hub id; None for a local folder
                "revision": revision,  # the commit, once pinned; None for a local folder
                "sha256": semantic_sha,
                "params": dataclasses.asdict(self.semantic_config()),
            },
        }


def tiny_semantic_name(folder: str) -> str:
    """The manifest's name of a tiny semantic twin built in `folder` (`materialize`)."""
    from labeling.labelers.tiny_models import TINY_ADE_SEMANTIC_DIR

    return "tiny-random mask2former" + (" (ade20k)" if os.path.basename(folder) == TINY_ADE_SEMANTIC_DIR else "")


def resolve_hub_revision(repo_id: str, revision: str | None = None) -> str:
    """The commit hash that `revision` (a branch, tag or commit; None: the default branch) of the
    hub model `repo_id` is at now, read from where its config.json resolves (the Hub, or the local
    cache when offline). Fails with one sentence when neither has it."""
    from huggingface_hub import hf_hub_download

    try:
        path = hf_hub_download(repo_id, "config.json", revision=revision)
    except Exception as err:  # offline and not cached, unknown repo or revision, gated: all one answer
        at = f" at revision {revision}" if revision else ""
        raise ModelLoadError(
            f"Could not resolve the semantic model {repo_id!r}{at} on the Hub ({type(err).__name__}); pass a hub id "
            "and --semantic-revision that exist while online (or cached), or a local folder as --semantic-model."
        ) from err
    found = re.search(r"/snapshots/([0-9a-f]{40})/", Path(path).as_posix())
    if found is None:
        raise ModelLoadError(f"The Hub cache gave {path} for {repo_id!r}, which names no commit; clear that cache entry.")
    return found.group(1)


def _folder_sha256(folder: str) -> str:
    """sha256 over a local model folder's files (names and contents), e.g. config + safetensors."""
    digest = hashlib.sha256()
    for name in sorted(os.listdir(folder)):
        path = os.path.join(folder, name)
        if os.path.isfile(path) and not name.startswith("."):
            digest.update(name.encode() + b"\n")
            with open(path, "rb") as f:
                while block := f.read(1 << 22):
                    digest.update(block)
    return digest.hexdigest()

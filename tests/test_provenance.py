"""Provenance and the label fingerprint: a hub semantic model is pinned to the commit its revision
resolves to (here from a Hub cache laid out as huggingface_hub writes it, offline) and a resume
reuses that commit; models are named by content, not path; a resume goes on, with one warning,
under another environment and is refused after a label-shaping change; the labels version covers
the label-shaping code's syntax."""

import dataclasses
import importlib.metadata
import platform
import shutil

import huggingface_hub
import numpy as np
import pytest
import torch

from dataset_card.contract.output_folder import OutputFolder
from labeling.labelers.model_choice import ModelChoice, ModelLoadError, resolve_hub_revision
from labeling.labelers.semantic import SemanticLabeler, SemanticLabelerConfig
from labeling.labelers.tiny_models import build_tiny_random_models
from labeling.pipeline import environment, labels_version, manifest
from labeling.pipeline.config import LabelingConfig

REPO = "test-org/tiny-mask2former"
COMMIT = "0123456789abcdef0123456789abcdef01234567"
NEWER = "89abcdef0123456789abcdef0123456789abcdef"
CONFIG = LabelingConfig(input="in", output="out", models="tiny-random")

# Small tensors: one torch thread is faster than two fighting on a busy 2-core machine.
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return build_tiny_random_models(str(tmp_path_factory.mktemp("tiny")))


@pytest.fixture
def hub_cache(tmp_path, tiny, monkeypatch):
    """The tiny twin as the Hub cache holds a downloaded repo: snapshots/<commit>/ and refs/main."""
    repo = tmp_path / "hub" / f"models--{REPO.replace('/', '--')}"
    shutil.copytree(tiny.semantic_model, repo / "snapshots" / COMMIT)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    return repo


def test_a_hub_model_is_pinned_to_its_commit_and_recorded(hub_cache, tiny):
    assert resolve_hub_revision(REPO) == COMMIT  # the default branch, from refs/main
    assert resolve_hub_revision(REPO, "main") == resolve_hub_revision(REPO, COMMIT) == COMMIT
    choice = ModelChoice(sam_type="tiny", sam_checkpoint=tiny.sam_checkpoint, semantic_model=REPO).pinned()
    assert choice.semantic_revision == COMMIT
    models = choice.describe()
    assert models["semantic"]["revision"] == COMMIT and models["semantic"]["sha256"] is None
    labeler = SemanticLabeler(REPO, SemanticLabelerConfig(shortest_edge=64), revision=COMMIT)
    assert labeler([np.zeros((30, 40, 3), np.uint8)])[0].shape == (30, 40)
    assert [c.name for c in choice.semantic_classes()][:2] == ["person", "car"]


def test_unknown_revisions_and_revisions_of_folders_are_one_sentence(hub_cache, tiny):
    with pytest.raises(ModelLoadError) as err:
        resolve_hub_revision(REPO, "v9")
    assert "at revision v9" in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(ModelLoadError, match="is a local folder, which has no revisions"):
        ModelChoice(sam_type="tiny", sam_checkpoint=tiny.sam_checkpoint, semantic_model=tiny.semantic_model,
                    semantic_revision="main").pinned()


def test_a_resume_reuses_the_hub_commit_its_folder_recorded(hub_cache, tiny):
    choice = ModelChoice(sam_type="tiny", sam_checkpoint=tiny.sam_checkpoint, semantic_model=REPO)
    recorded = choice.pinned().describe()
    assert (recorded["semantic"]["repo"], recorded["semantic"]["revision"]) == (REPO, COMMIT)
    shutil.copytree(hub_cache / "snapshots" / COMMIT, hub_cache / "snapshots" / NEWER)
    (hub_cache / "refs" / "main").write_text(NEWER)  # upstream moved on
    assert choice.pinned().semantic_revision == NEWER  # a new folder takes the newest commit
    assert choice.pinned(recorded).semantic_revision == COMMIT  # a resume keeps its folder's
    asked = dataclasses.replace(choice, semantic_revision="main")  # unless another revision is asked for
    assert asked.pinned(recorded).semantic_revision == NEWER


def prepared(tmp_path, models=None, arguments=None) -> OutputFolder:
    """An output folder whose manifest says it was labeled with `models` and `arguments`."""
    folder = OutputFolder.open(tmp_path / "out")
    first = manifest.build(10, "h", 5, arguments or CONFIG.arguments(), models or {}, CONFIG.execution(), ("a",))
    assert manifest.prepare(folder, first, overwrite=False)[0] is False
    return folder


def resume(folder: OutputFolder, models=None, arguments=None, strict=False) -> list[str]:
    """The lines a resume of `folder` logs (it must resume)."""
    lines = []
    again = manifest.build(10, "h", 5, arguments or CONFIG.arguments(), models or {}, CONFIG.execution(), ("a",))
    resumed, used = manifest.prepare(folder, again, False, strict, log=lines.append)
    assert resumed and manifest.labels_hash(used) == manifest.labels_hash(again)  # its shards stay trusted
    return lines


def fake_versions(monkeypatch, python=None, **versions):
    """Make this process report other Python or distribution versions (e.g. torch="2.3.0+cu124")."""
    real = importlib.metadata.version
    if python:
        monkeypatch.setattr(platform, "python_version", lambda: python)
    monkeypatch.setattr(importlib.metadata, "version", lambda name: versions.get(name) or real(name))


@pytest.mark.parametrize("before, after, changed", [
    ({"python": "3.11.7"}, {"python": "3.11.9"}, "software.python: '3.11.7' -> '3.11.9'"),
    ({"torch": "2.3.0+cu121"}, {"torch": "2.3.0+cu124"}, "software.torch: '2.3.0+cu121' -> '2.3.0+cu124'"),
    ({"c2fmae": "0.1.0"}, {"c2fmae": "0.2.0"}, "code_version: '0.1.0+"),
], ids=["python-patch", "torch-build", "package-version"])
def test_a_resume_under_another_environment_goes_on_with_one_warning(tmp_path, monkeypatch, before, after, changed):
    with monkeypatch.context() as m:
        fake_versions(m, **before)
        folder = prepared(tmp_path)
    first = manifest.read(folder)
    with monkeypatch.context() as m:
        fake_versions(m, **after)
        lines = resume(folder)
        assert len(lines) == 1 and lines[0].startswith("warning: ") and changed in lines[0], lines
        assert "--strict-environment refuses" in lines[0]
        with pytest.raises(manifest.ResumeRefused, match="--strict-environment was given") as err:
            resume(folder, strict=True)
        assert changed in str(err.value) and "\n" not in str(err.value)
    kept = manifest.read(folder)  # the folder keeps the record of the environment it was made in
    assert (kept["software"], kept["code_version"]) == (first["software"], first["code_version"])


def test_models_are_named_by_their_weights_not_their_paths(tmp_path, tiny):
    elsewhere = tmp_path / "other-home"  # the same files, cached under another home directory
    shutil.copytree(tiny.semantic_model, elsewhere / "semantic")
    shutil.copy(tiny.sam_checkpoint, elsewhere / "sam.pth")

    def models(sam: str, semantic: str) -> dict:
        return ModelChoice(sam_type="tiny", sam_checkpoint=sam, semantic_model=semantic).describe()

    folder = prepared(tmp_path, models(tiny.sam_checkpoint, tiny.semantic_model))
    lines = resume(folder, models(str(elsewhere / "sam.pth"), str(elsewhere / "semantic")))
    assert len(lines) == 1 and "models.instance.checkpoint" in lines[0] and "models.semantic.checkpoint" in lines[0]
    state = torch.load(tiny.sam_checkpoint, weights_only=True)
    name = next(iter(state))
    state[name] = state[name] + 1  # other weights, same file name and shapes
    torch.save(state, elsewhere / "sam.pth")
    with pytest.raises(manifest.ResumeRefused, match="models.instance.sha256") as err:
        resume(folder, models(str(elsewhere / "sam.pth"), tiny.semantic_model))
    assert "--overwrite" in str(err.value) and "\n" not in str(err.value)


def test_label_shaping_fields_are_declared_and_only_they_are_compared(tmp_path):
    arguments = CONFIG.arguments()
    assert {"shard_size", "min_instance_area", "points_per_side", "painting_rule", "compile"} <= set(arguments)
    assert not {"sam_checkpoint", "semantic_model", "semantic_revision", "limit", "model_batch_size",
                "read_batch_size", "model_actors", "input", "output", "strict_environment"} & set(arguments)
    assert not set(arguments) & set(CONFIG.execution())
    folder = prepared(tmp_path)
    faster = dataclasses.replace(CONFIG, model_batch_size=1, read_batch_size=2, postprocess_batch_size=3,
                                 model_actors=4, limit=5, sam_checkpoint="/elsewhere/sam.pth")
    assert resume(folder, arguments=faster.arguments()) == []  # neither compared nor warned about
    models = {"instance": {"type": "tiny", "sha256": "a", "params": {"points_per_batch": 64, "pred_iou_thresh": 0.8}}}
    folder = prepared(tmp_path / "2", models)
    speed = {"instance": {**models["instance"], "params": {"points_per_batch": 16, "pred_iou_thresh": 0.8}}}
    assert resume(folder, speed) == []
    for changed, difference in [
        ({"arguments": dataclasses.replace(CONFIG, min_instance_area=32).arguments()},
         "arguments.min_instance_area: 16 -> 32"),
        ({"models": {"instance": {**models["instance"], "params": {"pred_iou_thresh": 0.9}}}},
         "models.instance.params.pred_iou_thresh: 0.8 -> 0.9"),
    ]:
        with pytest.raises(manifest.ResumeRefused, match=difference.replace(".", r"\.")):
            resume(folder if "models" in changed else prepared(tmp_path / "3"), **changed)


def test_a_folder_from_before_label_fingerprints_or_another_labels_version_is_refused(tmp_path, monkeypatch):
    folder = prepared(tmp_path)
    old = manifest.read(folder)
    manifest.write(folder, {k: v for k, v in old.items() if k != "labels_version"})
    with pytest.raises(manifest.ResumeRefused) as err:
        resume(folder)
    assert "labeled before label fingerprints" in str(err.value) and "--overwrite" in str(err.value)
    manifest.write(folder, old)
    monkeypatch.setattr(manifest, "LABELS_VERSION", labels_version.LABELS_VERSION + 1)
    with pytest.raises(manifest.ResumeRefused, match=f"labels_version: {labels_version.LABELS_VERSION} ->"):
        resume(folder)


def test_the_model_actor_records_its_environment():
    found = environment.collect("cpu", compiled=True)
    assert found["python"] == platform.python_version() and found["torch"] == importlib.metadata.version("torch")
    assert found["c2fmae"] == manifest.code_version() and found["compile"] is True
    assert (found["device"], found["gpu"], found["driver"]) == ("cpu", None, None)
    assert {"torchvision", "transformers", "segment-anything", "pycocotools", "numpy", "pillow", "cuda"} <= set(found)
    encoded = environment.encode(found)
    assert environment.decode_all([encoded, "", encoded]) == [found]


LABEL_CODE_CHANGED = (
    "label-shaping code changed: if labels can change, bump LABELS_VERSION and record the new digest "
    f"(`{labels_version.DIGEST_COMMAND}` prints it) as LABEL_CODE_DIGEST in labeling/pipeline/labels_version.py; "
    "if not (a refactor), record the new digest only")


def test_the_label_code_is_recorded_for_this_labels_version():
    if labels_version.label_code_digest() != labels_version.LABEL_CODE_DIGEST:
        pytest.fail(LABEL_CODE_CHANGED, pytrace=False)


def test_docstrings_and_comments_leave_the_label_code_digest_and_code_changes_it(tmp_path):
    for path in labels_version.label_code_files():
        copy = tmp_path / path.relative_to(labels_version.REPO)
        copy.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(path, copy)
    recorded = labels_version.label_code_digest(tmp_path)
    assert recorded == labels_version.label_code_digest()
    predictors = tmp_path / "labeling" / "pipeline" / "predictors.py"
    source = predictors.read_text()
    assert source.startswith('"""') and "    def __call__(self, batch: pa.Table) -> pa.Table:\n" in source
    reworded = ('"""A stale docstring, fixed. ' + source[3:]).replace(
        "    def __call__(self, batch: pa.Table) -> pa.Table:\n",
        '    def __call__(self, batch: pa.Table) -> pa.Table:  # a comment\n        """Label a batch."""\n')
    predictors.write_text(reworded + "\n# a trailing comment\n")
    assert labels_version.label_code_digest(tmp_path) == recorded
    predictors.write_text(source + "\nMAX_MASKS = 100\n")
    assert labels_version.label_code_digest(tmp_path) != recorded

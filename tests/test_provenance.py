"""Provenance: a hub semantic model is pinned to the commit its revision resolves to (here from a
Hub cache laid out as huggingface_hub writes it, offline), and the manifest names it and the
library versions."""

import shutil

import huggingface_hub
import numpy as np
import pytest

from labeling.labelers.model_choice import ModelChoice, ModelLoadError, resolve_hub_revision
from labeling.labelers.semantic import SemanticLabeler, SemanticLabelerConfig
from labeling.labelers.tiny_models import build_tiny_random_models
from labeling.pipeline import manifest

REPO = "test-org/tiny-mask2former"
COMMIT = "0123456789abcdef0123456789abcdef01234567"

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


def test_the_manifest_records_library_versions():
    versions = manifest.software_versions()
    for name in ("python", "torch", "transformers", "segment-anything", "pycocotools"):
        assert versions[name], name
    built = manifest.build(1, "h", 1, {}, {}, {})
    assert built["software"] == versions and "software" in manifest.COMPARED

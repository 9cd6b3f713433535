"""Models staged once (`python -m labeling.stage_models`), loaded everywhere from the staged folder:
the tiny models saved to a folder stand in for SAM and the hub model."""

import json
import os

import pytest

from labeling import stage_models
from labeling.labelers import checkpoints
from labeling.labelers.model_choice import STAGED_FILE, ModelChoice, ModelLoadError
from labeling.labelers.tiny_models import TINY_SAM_TYPE

pytestmark = pytest.mark.usefixtures("one_thread")

HUB_REPO, COMMIT = "facebook/mask2former-swin-large-coco-panoptic", "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture(scope="module")
def staged(tmp_path_factory):
    out = tmp_path_factory.mktemp("staged")
    assert stage_models.main(["--out", str(out), "--models", "tiny-random"]) == 0
    return str(out)


def test_staging_writes_both_models_and_names_them(staged):
    record = json.loads(open(os.path.join(staged, STAGED_FILE)).read())
    sam_file = os.path.join(staged, record["instance"]["file"])
    assert record["instance"]["type"] == TINY_SAM_TYPE and os.path.isfile(sam_file)
    assert record["instance"]["sha256"] == checkpoints.file_sha256(sam_file)
    assert os.path.isfile(os.path.join(staged, "semantic", "config.json"))
    assert not [name for name in os.listdir(staged) if name.endswith(".partial") or name == "tiny-build"]
    umask = os.umask(0)
    os.umask(umask)
    for root, _, files in os.walk(staged):  # readable to colleagues on a shared folder, whatever the source's mode
        for name in files:
            assert os.stat(os.path.join(root, name)).st_mode & 0o777 == 0o666 & ~umask, name


def test_actors_load_from_the_staged_folder_and_the_manifest_names_the_same_models(staged, tmp_path, monkeypatch):
    # The staged folder stands for a hub model at one commit: rewrite its record as staging one would.
    folder = tmp_path / "hub-staged"
    import shutil

    shutil.copytree(staged, folder)
    record = json.loads((folder / STAGED_FILE).read_text())
    record["semantic"].update(repo=HUB_REPO, revision=COMMIT)
    (folder / STAGED_FILE).write_text(json.dumps(record))

    def no_download(*args, **kwargs):
        raise AssertionError("a staged run must not download or hash the SAM checkpoint on the head")

    monkeypatch.setattr(checkpoints, "official_checkpoint", no_download)
    monkeypatch.setattr(checkpoints, "file_sha256", no_download)
    choice = ModelChoice(preset="default", sam_type=TINY_SAM_TYPE, staged=str(folder)).pinned()
    assert choice.semantic_revision == COMMIT
    described = choice.materialize().describe()
    assert described["instance"]["sha256"] == record["instance"]["sha256"]
    assert described["instance"]["checkpoint"] == str(folder / record["instance"]["file"])
    assert (described["semantic"]["repo"], described["semantic"]["revision"]) == (HUB_REPO, COMMIT)
    assert described["semantic"]["sha256"] is None  # named by its hub identity, as an unstaged run names it
    monkeypatch.undo()
    instance = choice.instance_labeler("cpu")  # what an actor does: both models from the staged files
    semantic = choice.semantic_labeler("cpu")
    assert instance is not None and semantic is not None
    assert len(choice.materialize().semantic_classes()) > 0


def test_a_staged_folder_with_other_models_or_none_is_one_sentence(staged, tmp_path):
    with pytest.raises(ModelLoadError, match=r"holds other models than this run asks for: SAM type 'vit_h'"):
        ModelChoice(preset="default", staged=staged).pinned()
    with pytest.raises(ModelLoadError, match=r"were both given: pass one"):
        ModelChoice(preset="default", sam_checkpoint="/x.pth", staged=staged).pinned()
    missing = str(tmp_path / "not-staged")
    with pytest.raises(ModelLoadError, match=rf"no staged models at {missing} .*python -m labeling.stage_models --out"):
        ModelChoice(preset="tiny-random", staged=missing).instance_labeler("cpu")

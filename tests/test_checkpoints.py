"""load_sam: by path, by name (download, hash check, cache), and one clear sentence for every failure."""

import hashlib
import os
import shutil
import subprocess
import sys
import textwrap
import urllib.error

import pytest
import torch

from labeling.labelers import checkpoints
from labeling.labelers.checkpoints import CheckpointError, load_sam, official_checkpoint
from labeling.labelers.tiny_models import TINY_SAM_TYPE, build_tiny_sam, build_tiny_sam_random


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("ckpt") / "tiny.pth")
    torch.save(build_tiny_sam_random(seed=3).state_dict(), path)
    return path


def _one_sentence(err):
    message = str(err.value)
    assert "\n" not in message and message.endswith(".")
    return message


def test_load_by_path_gives_the_saved_weights(tiny_checkpoint):
    sam = load_sam(TINY_SAM_TYPE, tiny_checkpoint)
    saved = torch.load(tiny_checkpoint, weights_only=True)
    assert sam.state_dict().keys() == saved.keys()
    assert all(torch.equal(sam.state_dict()[k], v) for k, v in saved.items())


def test_unknown_type_and_missing_path(tmp_path, tiny_checkpoint):
    with pytest.raises(CheckpointError) as err:
        load_sam("vit_x", tiny_checkpoint)
    assert "vit_h" in _one_sentence(err)
    with pytest.raises(CheckpointError) as err:
        load_sam(TINY_SAM_TYPE, str(tmp_path / "nope.pth"))
    assert "nope.pth" in _one_sentence(err)
    with pytest.raises(CheckpointError) as err:
        load_sam(TINY_SAM_TYPE, None)
    assert "path" in _one_sentence(err)


def test_weights_only_refuses_pickled_objects(tmp_path):
    path = str(tmp_path / "evil.pth")
    torch.save({"model": torch.nn.Linear(2, 2)}, path)  # a module object, not a tensor dict
    with pytest.raises(CheckpointError) as err:
        load_sam(TINY_SAM_TYPE, path)
    assert "evil.pth" in _one_sentence(err)
    (tmp_path / "garbage.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError):
        load_sam(TINY_SAM_TYPE, str(tmp_path / "garbage.pth"))


def test_wrong_model_type_is_one_sentence(tmp_path, tiny_checkpoint):
    state = torch.load(tiny_checkpoint, weights_only=True)
    state.pop(next(iter(state)))
    path = str(tmp_path / "partial.pth")
    torch.save(state, path)
    with pytest.raises(CheckpointError) as err:
        load_sam(TINY_SAM_TYPE, path)
    assert "model type" in _one_sentence(err)


def test_offline_error_says_where_to_put_the_file(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(CheckpointError) as err:
        official_checkpoint("vit_h", str(tmp_path))
    message = _one_sentence(err)
    assert str(tmp_path / "sam_vit_h_4b8939.pth") in message
    assert "https://dl.fbaipublicfiles.com/segment_anything/sam_vit_h_4b8939.pth" in message
    assert not os.listdir(tmp_path)


def test_network_error_is_the_same_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")

    def no_network(url, dst, progress=True):
        raise urllib.error.URLError("Name or service not known")

    monkeypatch.setattr(torch.hub, "download_url_to_file", no_network)
    with pytest.raises(CheckpointError) as err:
        load_sam("vit_b", None, str(tmp_path))
    assert "sam_vit_b_01ec64.pth" in _one_sentence(err)


def _fake_download(source, calls):
    def download(url, dst, progress=True):
        calls.append(url)
        shutil.copyfile(source, dst)

    return download


def test_hash_mismatch_deletes_the_download(tmp_path, monkeypatch, tiny_checkpoint):
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr(torch.hub, "download_url_to_file", _fake_download(tiny_checkpoint, []))
    with pytest.raises(CheckpointError) as err:
        official_checkpoint("vit_b", str(tmp_path))
    assert "SHA-256" in _one_sentence(err)
    assert [name for name in os.listdir(tmp_path) if not name.endswith(".lock")] == []  # nor a temporary file


def test_named_download_is_verified_loaded_and_cached(tmp_path, monkeypatch, tiny_checkpoint):
    """The name path end to end, with the tiny model standing in for vit_b (no network here)."""
    digest = hashlib.sha256(open(tiny_checkpoint, "rb").read()).hexdigest()
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setitem(checkpoints.OFFICIAL_CHECKPOINTS, "vit_b", ("sam_vit_b_01ec64.pth", digest))
    monkeypatch.setitem(checkpoints.SAM_BUILDERS, "vit_b", build_tiny_sam)
    calls = []
    monkeypatch.setattr(torch.hub, "download_url_to_file", _fake_download(tiny_checkpoint, calls))
    sam = load_sam("vit_b", None, str(tmp_path))
    assert calls == ["https://dl.fbaipublicfiles.com/segment_anything/sam_vit_b_01ec64.pth"]
    assert torch.equal(sam.image_encoder.pos_embed, build_tiny_sam_random(seed=3).image_encoder.pos_embed)
    load_sam("vit_b", None, str(tmp_path))
    assert len(calls) == 1  # served from the cache
    assert checkpoints.file_sha256(str(tmp_path / "sam_vit_b_01ec64.pth")) == digest


_FETCH = textwrap.dedent("""
    import hashlib, os, shutil, sys, time, torch
    from labeling.labelers import checkpoints
    source, cache, calls = sys.argv[1:4]
    digest = hashlib.sha256(open(source, "rb").read()).hexdigest()
    checkpoints.OFFICIAL_CHECKPOINTS["vit_b"] = ("sam_vit_b_01ec64.pth", digest)

    def slow_download(url, dst, progress=True):  # a download long enough for the other process to ask
        with open(calls, "a") as f:
            f.write(f"{os.getpid()} {dst}\\n")
        assert not os.path.exists(os.path.join(cache, "sam_vit_b_01ec64.pth")), "a file is in place too early"
        time.sleep(2)
        shutil.copyfile(source, dst)

    torch.hub.download_url_to_file = slow_download
    print(checkpoints.official_checkpoint("vit_b", cache))
""")


def test_concurrent_actors_fetch_the_checkpoint_once(tmp_path, tiny_checkpoint):
    """Two processes (actors on one node) ask for the same named checkpoint at once: one downloads,
    the other waits on the lock and finds the verified file; nothing is half-written at the final path."""
    env = dict(os.environ, PYTHONPATH=os.getcwd(), HF_HUB_OFFLINE="0")
    cache, calls = tmp_path / "cache", tmp_path / "calls.txt"
    args = [sys.executable, "-c", _FETCH, tiny_checkpoint, str(cache), str(calls)]
    procs = [subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    outputs = [proc.communicate(timeout=120) for proc in procs]
    assert all(proc.returncode == 0 for proc in procs), [err[-2000:] for _, err in outputs]
    assert {out.strip() for out, _ in outputs} == {str(cache / "sam_vit_b_01ec64.pth")}
    assert len(calls.read_text().splitlines()) == 1  # one download for both
    assert checkpoints.file_sha256(str(cache / "sam_vit_b_01ec64.pth")) == checkpoints.file_sha256(tiny_checkpoint)
    assert sorted(os.listdir(cache)) == ["sam_vit_b_01ec64.pth", "sam_vit_b_01ec64.pth.lock"]

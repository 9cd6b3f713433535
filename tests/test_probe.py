"""Probes: MAE's linear probe, the cached-feature k-NN / linear probes, the evaluation data sources, the CLI."""

import dataclasses
import importlib.util
import json
import types

import datasets
import numpy as np
import pyarrow.parquet as pq
import pytest
import timm
import torch
from PIL import Image
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.models import save_for_hf

from dataset_card.synthetic.shapes import write_colour_task, write_synthetic_dataset
from pretraining.evaluate import main
from pretraining.evaluation import linear_probe, probe
from pretraining.evaluation.backbones import load_timm_model
from pretraining.evaluation.folders import EvalDataError, hash_split, load_eval_data, probe_loaders
from pretraining.evaluation.transforms import linear_probe_transform


def blobs(n_per_class: int, num_classes: int, dim: int, spread: float, noise_seed: int):
    """Gaussian clusters around fixed random unit centres: (features (N, D), labels (N,))."""
    centres = torch.nn.functional.normalize(torch.randn(num_classes, dim, generator=torch.Generator().manual_seed(0)),
                                            dim=1)
    labels = torch.arange(num_classes).repeat_interleave(n_per_class)
    noise = torch.randn(len(labels), dim, generator=torch.Generator().manual_seed(noise_seed))
    return centres[labels] + spread * noise, labels


# --- k-NN ---------------------------------------------------------------------------------------------


def test_knn_votes_by_cosine_similarity():
    train = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0]])
    labels = torch.tensor([0, 0, 1])
    val = torch.tensor([[10.0, 1.0], [0.1, 5.0]])  # scale must not matter: cosine similarity
    scores = probe.knn_scores(train, labels, val, num_classes=2, k=1)
    assert scores.argmax(1).tolist() == [0, 1]
    assert probe.knn_accuracy(train, labels, val, torch.tensor([0, 1]), k=1) == 100.0
    assert probe.knn_accuracy(train, labels, val, torch.tensor([1, 0]), k=1) == 0.0


def test_knn_weights_near_neighbours_above_far_ones():
    # Two far neighbours of class 1 against one very close neighbour of class 0.
    train = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-0.2, 1.0]])
    labels = torch.tensor([0, 1, 1])
    val = torch.tensor([[1.0, 0.05]])
    assert probe.knn_scores(train, labels, val, 2, k=3).argmax().item() == 0


def test_knn_accuracy_on_clusters_is_high_and_pure():
    train_x, train_y = blobs(30, 5, 16, 0.1, noise_seed=1)
    val_x, val_y = blobs(10, 5, 16, 0.1, noise_seed=2)
    before = train_x.clone()
    assert probe.knn_accuracy(train_x, train_y, val_x, val_y) == 100.0
    assert torch.equal(train_x, before)
    shuffled = train_y[torch.randperm(len(train_y), generator=torch.Generator().manual_seed(1))]
    assert probe.knn_accuracy(train_x, shuffled, val_x, val_y) < 60.0


def test_topk_accuracy_counts_hits_in_the_first_k():
    scores = torch.tensor([[0.1, 0.5, 0.4], [0.7, 0.2, 0.1], [0.2, 0.3, 0.5]])
    assert probe.topk_accuracy(scores, torch.tensor([2, 0, 0]), ks=(1, 2)) == pytest.approx([100 / 3, 200 / 3])
    assert probe.topk_accuracy(scores, torch.tensor([2, 0, 0]), ks=(1, 5))[1] == 100.0  # k capped at C


# --- linear probe -------------------------------------------------------------------------------------


def test_linear_probe_learns_separable_classes_deterministically():
    train_x, train_y = blobs(40, 4, 16, 0.2, noise_seed=1)
    val_x, val_y = blobs(20, 4, 16, 0.2, noise_seed=2)
    acc = probe.linear_probe_accuracy(train_x, train_y, val_x, val_y)
    assert acc > 95.0
    shuffled = train_y[torch.randperm(len(train_y), generator=torch.Generator().manual_seed(1))]
    assert probe.linear_probe_accuracy(train_x, shuffled, val_x, val_y) < 60.0
    assert probe.linear_probe_accuracy(train_x, train_y, val_x, val_y) == acc
    head = probe.train_linear_probe(train_x, train_y, 4, probe.linear_probe_tiny(), torch.device("cpu"))
    assert not head[0].affine  # MAE's BatchNorm without affine before the linear layer


def test_gather_is_the_identity_on_one_process():
    x = torch.arange(6).reshape(3, 2)
    assert torch.equal(probe.gather_strided(x, 3, torch.device("cpu")), x)


# --- evaluation data ----------------------------------------------------------------------------------


def test_hash_split_is_order_free_disjoint_and_near_the_fraction():
    keys = [f"n{i // 50:04d}/{i:06d}" for i in range(2000)]
    train, val = hash_split(keys, 0.1)
    assert len(set(train) | set(val)) == 2000 and not set(train) & set(val)
    assert 150 < len(val) < 250
    reordered = keys[::-1]
    _, val_reordered = hash_split(reordered, 0.1)
    assert {reordered[i] for i in val_reordered} == {keys[i] for i in val}


def test_labeled_folder_gives_labels_masks_and_a_held_out_split(tmp_path):
    write_synthetic_dataset(str(tmp_path), num_images=20, num_shards=3, size=(24, 32), seed=0)
    data = load_eval_data(str(tmp_path), val_fraction=0.3)
    assert data.layout == "labeled" and data.class_names == ("few_shapes", "many_shapes")
    assert data.num_semantic_classes == 4 and len(data.train) + len(data.val) == 20
    table = datasets.load_dataset(str(tmp_path), split="train")
    by_id = {row["image_id"]: row["label"] for row in table.select_columns(["image_id", "label"])}
    sample = data.val.load(0)
    assert sample.image.shape == (24, 32, 3) and sample.mask.shape == (24, 32)
    assert set(np.unique(sample.mask)) <= {0, 1, 2, 3}
    assert sorted(by_id.values()).count(sample.label) > 0


def test_labeled_folder_reads_each_row_group_once_in_a_shuffled_pass(tmp_path, monkeypatch):
    write_synthetic_dataset(str(tmp_path), num_images=20, num_shards=3, size=(16, 16), seed=0)
    data = load_eval_data(str(tmp_path), val_fraction=0.3)
    expected = [data.train.load(i).label for i in range(len(data.train))]
    reads = []
    real = pq.ParquetFile.read_row_group
    monkeypatch.setattr(pq.ParquetFile, "read_row_group", lambda self, *a, **k: reads.append(a) or real(self, *a, **k))
    fresh = load_eval_data(str(tmp_path), val_fraction=0.3).train
    order = np.random.default_rng(0).permutation(len(fresh))
    assert [fresh.load(int(i)).label for i in order] == [expected[i] for i in order]
    assert len(reads) == 3  # three shards of one row group each: every row group read once


def _write_images(folder, classes, per_class, colour_of):
    for c in classes:
        (folder / c).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            Image.fromarray(np.full((8, 8, 3), colour_of(c), np.uint8)).save(folder / c / f"{i}.png")


def test_imagefolder_with_and_without_a_val_folder(tmp_path):
    _write_images(tmp_path / "flat", ["cat", "dog"], 10, lambda c: 10 if c == "cat" else 240)
    data = load_eval_data(str(tmp_path / "flat"), val_fraction=0.3)
    assert data.layout == "imagefolder" and data.class_names == ("cat", "dog")
    assert len(data.train) + len(data.val) == 20
    for split in (data.train, data.val):
        for i in range(len(split)):
            s = split.load(i)
            assert (s.image.mean() < 128) == (s.label == 0)  # label follows the folder
    _write_images(tmp_path / "inet" / "train", ["a", "b"], 3, lambda c: 0)
    _write_images(tmp_path / "inet" / "val", ["a", "b"], 2, lambda c: 0)
    data = load_eval_data(str(tmp_path / "inet"))
    assert (len(data.train), len(data.val)) == (6, 4)


def test_datasets_folder_with_its_own_validation_split(tmp_path):
    def split(n, seed):
        rng = np.random.default_rng(seed)
        return datasets.Dataset.from_dict(
            {"img": [Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)) for _ in range(n)],
             "label": [i % 3 for i in range(n)]},
            features=datasets.Features({"img": datasets.Image(), "label": datasets.ClassLabel(names=["x", "y", "z"])}))

    datasets.DatasetDict({"train": split(6, 0), "validation": split(3, 1)}).save_to_disk(str(tmp_path / "ds"))
    data = load_eval_data(str(tmp_path / "ds"))
    assert data.layout == "datasets" and data.class_names == ("x", "y", "z")
    assert (len(data.train), len(data.val)) == (6, 3)
    assert data.val.load(2).label == 2 and data.val.load(2).image.shape == (8, 8, 3)


def test_unreadable_data_paths_fail_with_a_sentence(tmp_path):
    with pytest.raises(EvalDataError, match="not a folder"):
        load_eval_data(str(tmp_path / "missing"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(EvalDataError, match="not a labeled folder, ImageFolder"):
        load_eval_data(str(tmp_path / "empty"))


# --- the CLI --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def colours(tmp_path_factory):
    """An ImageFolder whose class is the dominant colour, and a tiny random encoder folder."""
    root = tmp_path_factory.mktemp("colours")
    rng = np.random.default_rng(0)
    base = {"red": (200, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 200)}
    for name, colour in base.items():
        (root / "data" / name).mkdir(parents=True)
        for i in range(12):
            pixels = np.clip(np.array(colour) + rng.normal(0, 40, (32, 32, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(root / "data" / name / f"{i}.png")
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", num_classes=0, img_size=32, depth=2, embed_dim=32,
                              num_heads=2)
    model.pretrained_cfg = {**model.pretrained_cfg, "mean": IMAGENET_DEFAULT_MEAN, "std": IMAGENET_DEFAULT_STD}
    save_for_hf(model, str(root / "encoder"), safe_serialization=True)
    return root


@pytest.mark.parametrize("command, config", [("knn", "tiny"), ("linear-probe", "tiny"),
                                             ("linear-probe", "cached_tiny")])
def test_probe_cli_prints_top1_and_writes_metrics(colours, tmp_path, capsys, command, config):
    metrics = main([command, "--model", f"local-dir:{colours / 'encoder'}", "--data", str(colours / "data"),
                    "--config", config, "--val-fraction", "0.3", "--output", str(tmp_path)])
    out = capsys.readouterr().out
    assert f"{command}: top-1" in out and "3 classes" in out
    assert metrics["train_samples"] + metrics["val_samples"] == 36
    assert metrics["top1"] > 60.0  # colour is visible even to a random encoder
    written = json.loads((tmp_path / f"{'knn' if command == 'knn' else 'linear'}.json").read_text())
    assert written["metrics"]["top1"] == metrics["top1"]


# --- MAE's linear-probe protocol --------------------------------------------------------------------


def test_linear_probe_augmentation_crops_and_flips_without_touching_colours():
    transform = linear_probe_transform(16, IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD)
    plain = Image.fromarray(np.full((40, 40, 3), (200, 30, 30), np.uint8))
    colour = (torch.tensor([200, 30, 30]) / 255 - torch.tensor(IMAGENET_DEFAULT_MEAN)) / torch.tensor(IMAGENET_DEFAULT_STD)
    torch.manual_seed(0)
    out = transform(plain)
    assert out.shape == (3, 16, 16)
    torch.testing.assert_close(out, colour[:, None, None].expand(3, 16, 16).float(), atol=1e-2, rtol=0)  # no jitter
    halves = Image.fromarray(np.concatenate([np.zeros((40, 20, 3), np.uint8), np.full((40, 20, 3), 255, np.uint8)], 1))
    views = {tuple((transform(halves)[0] > 0).float().mean(0).round().tolist()) for _ in range(10)}
    assert len(views) > 1  # a new crop / flip at every draw


def mae_probe(colours, cfg):
    torch.manual_seed(cfg.seed)
    encoder = load_timm_model(f"local-dir:{colours / 'encoder'}", num_classes=0, global_pool="token")
    return linear_probe.FrozenEncoderProbe(encoder, 3)


def test_mae_probe_trains_only_its_head_and_beats_an_untrained_one(colours, one_thread):
    data = load_eval_data(str(colours / "data"), val_fraction=0.3)
    cfg = linear_probe.tiny()
    untrained = linear_probe.train_frozen_probe(mae_probe(colours, cfg), data, dataclasses.replace(cfg, epochs=0),
                                                None, torch.device("cpu"), progress=False)
    model = mae_probe(colours, cfg)
    encoder_before = {k: v.clone() for k, v in model.encoder.state_dict().items()}
    head_before = model.head[1].weight.clone()
    trained = linear_probe.train_frozen_probe(model, data, cfg, None, torch.device("cpu"), progress=False)
    assert trained["top1"] >= untrained["top1"] + 30.0, (trained, untrained)
    assert all(torch.equal(v, encoder_before[k]) for k, v in model.encoder.state_dict().items())
    assert not torch.equal(model.head[1].weight, head_before)
    assert not model.head[0].affine and not model.encoder.training  # MAE's head; the encoder stays in eval mode


def test_mae_probe_resumes_to_the_same_head(colours, tmp_path, monkeypatch, one_thread):
    data = load_eval_data(str(colours / "data"), val_fraction=0.3)
    cfg = dataclasses.replace(linear_probe.tiny(), epochs=4)
    straight = linear_probe.train_frozen_probe(mae_probe(colours, cfg), data, cfg, str(tmp_path / "straight"),
                                               torch.device("cpu"), progress=False)
    real_save, saves = linear_probe.save_checkpoint, []

    def save_then_stop(path, state):
        real_save(path, state)
        saves.append(state["epoch"])
        if len(saves) == 2:
            raise KeyboardInterrupt  # killed after the 2nd epoch's checkpoint

    monkeypatch.setattr(linear_probe, "save_checkpoint", save_then_stop)
    with pytest.raises(KeyboardInterrupt):
        linear_probe.train_frozen_probe(mae_probe(colours, cfg), data, cfg, str(tmp_path / "resumed"),
                                        torch.device("cpu"), progress=False)
    monkeypatch.setattr(linear_probe, "save_checkpoint", real_save)
    resumed = linear_probe.train_frozen_probe(mae_probe(colours, cfg), data, cfg, str(tmp_path / "resumed"),
                                              torch.device("cpu"), progress=False)
    a = torch.load(tmp_path / "straight" / "checkpoint.pt", weights_only=True)
    b = torch.load(tmp_path / "resumed" / "checkpoint.pt", weights_only=True)
    assert a["epoch"] == b["epoch"] == 4
    assert all(torch.equal(a["head"][k], b["head"][k]) for k in a["head"])
    assert resumed == straight


def test_probe_cli_errors_are_one_line(colours, tmp_path):
    for argv, hint in [(["--model", "vit_tiny_patch16_224", "--data", str(colours / "data")], "--random-init"),
                       (["--model", f"local-dir:{colours / 'encoder'}", "--data", str(tmp_path)], "not a labeled"),
                       (["--model", f"local-dir:{colours / 'encoder'}", "--data", str(colours / "data"),
                         "--set", "k=many"], "k must be an integer")]:
        with pytest.raises(SystemExit) as exit_info:
            main(["knn", *argv])
        message = str(exit_info.value.code)
        assert message.startswith("error: ") and "\n" not in message and hint in message


def test_periodic_probe_hook_for_the_pretraining_loop(colours):
    train, val = probe_loaders(str(colours / "data"), 32, IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, batch_size=8,
                               val_fraction=0.3, max_train=20)
    assert len(train.dataset) == 20 and {y for _, y in train.dataset} == {0, 1, 2}  # spread over classes
    model = timm.create_model(f"local-dir:{colours / 'encoder'}", pretrained=True).eval()
    encode = lambda x: model.forward_features(x)[:, 0]  # noqa: E731 (the class token, as encode_rgb gives it)
    knn = probe.periodic_probe(encode, train, val, torch.device("cpu"), kind="knn", k=5)
    linear = probe.periodic_probe(encode, train, val, torch.device("cpu"), kind="linear")
    assert knn > 60.0 and linear > 60.0


def test_probe_hook_logs_every_n_epochs_on_rank_0(colours):
    class Encoder(torch.nn.Module):  # what the pretraining model offers: encode_rgb -> (B, 1 + N, D)
        def __init__(self):
            super().__init__()
            self.vit = timm.create_model(f"local-dir:{colours / 'encoder'}", pretrained=True)

        def encode_rgb(self, images):
            return self.vit.forward_features(images)

    logged = []
    monitor = types.SimpleNamespace(scalars=lambda step, values: logged.append((step, values)))
    model = Encoder().train()
    hook = probe.probe_hook(str(colours / "data"), 32, probe.PeriodicProbeConfig(every=2, k=5, val_fraction=0.3))
    for epoch, rank in [(0, 0), (1, 1), (1, 0), (2, 0)]:
        dist = types.SimpleNamespace(rank=rank, device=torch.device("cpu"))
        hook(types.SimpleNamespace(epoch=epoch, global_step=10 * (epoch + 1), model=model, monitor=monitor, dist=dist))
    assert [step for step, _ in logged] == [20]  # after the 2nd epoch, on rank 0 only
    assert 60.0 < logged[0][1]["probe/knn_top1"] <= 100.0
    assert model.training  # handed back in training mode


# --- pretrained beats random ----------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("pretraining.train") is None
                    or importlib.util.find_spec("pretraining.export") is None,
                    reason="needs the pretraining loop and export (pretraining.train, pretraining.export)")
def test_pretrained_tiny_encoder_beats_random_init_by_5_points(tmp_path, one_thread):
    from pretraining import export, train

    write_colour_task(tmp_path / "pretrain", 256, seed=0)
    write_colour_task(tmp_path / "probe", 600, seed=1)
    # ~300 optimizer steps of a 4-block, 64-wide C2FMAE at 64 px: seconds of CPU per epoch.
    small = ["model.embed_dim=64", "model.depth=4", "model.num_heads=4", "model.decoder_dim=64",
             "model.decoder_heads=4", "epochs=19", "figure_every=0", "checkpoint_every=1000"]
    assert train.main(["--data", str(tmp_path / "pretrain"), "--config", "tiny", "--output", str(tmp_path / "run"),
                       "--no-progress", *[a for kv in small for a in ("--set", kv)]]) == 0
    assert export.main([str(tmp_path / "run"), "--to", "timm", "--output", str(tmp_path / "timm")]) == 0

    # The cached-feature probe: deterministic, and on 64 px images not blurred by random crops.
    probe_args = ["linear-probe", "--model", f"local-dir:{tmp_path / 'timm'}", "--data", str(tmp_path / "probe"),
                  "--config", "cached_tiny", "--val-fraction", "0.3"]
    pretrained = main(probe_args)
    random_init = main([*probe_args, "--random-init"])
    assert pretrained["val_samples"] > 150  # a held-out split large enough for 5 points to mean something
    assert pretrained["top1"] >= random_init["top1"] + 5.0, (pretrained["top1"], random_init["top1"])

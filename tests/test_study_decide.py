"""The study that decides (pretraining/study/decide.py): its subset, its arms, its statistics and reading,
its GPU-hours arithmetic, and its tiny twin end to end on the bundled photos."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest

from pretraining.study import decide
from pretraining.study.decision import Study, last_line, replicate_accuracy, table
from pretraining.study.decision import decide as read_study
from pretraining.study.subset import SubsetError, choose_classes, choose_subset, class_folders, image_id


def _folder(root: Path, classes: int, per_class: int) -> Path:
    for c in range(classes):
        (root / f"n{c:03d}").mkdir(parents=True)
        for i in range(per_class):
            (root / f"n{c:03d}" / f"img{i:02d}.JPEG").write_bytes(b"x")
        (root / f"n{c:03d}" / "notes.txt").write_text("not an image")
    return root


def test_subset_is_seeded_stratified_and_holds_out_disjoint_images(tmp_path):
    root = _folder(tmp_path / "train", classes=6, per_class=8)
    available = class_folders(root)
    chosen = choose_classes(available, 3, seed=0)
    assert chosen == choose_classes(list(reversed(available)), 3, seed=0) == sorted(chosen)  # not the listing's order
    assert len(chosen) == 3 and {tuple(choose_classes(available, 3, seed=s)) for s in range(6)} != {tuple(chosen)}
    subset = choose_subset(root, chosen, val_per_class=2, seed=0)
    assert not set(subset.candidates) & set(subset.held_out)
    every = {f"{c}/img{i:02d}.JPEG" for c in chosen for i in range(8)}
    assert set(subset.candidates) | set(subset.held_out) == every  # notes.txt is no candidate
    assert sorted(rel.split("/")[0] for rel in subset.held_out) == sorted(chosen * 2)  # 2 per class
    assert choose_subset(root, chosen, 2, seed=0) == subset and choose_subset(root, chosen, 2, seed=1) != subset
    assert image_id("n000/img01.JPEG") == "n000/img01"
    assert choose_classes(available, None, 0, listed=["n005", "n001"]) == ["n001", "n005"]


def test_subset_errors_say_what_to_do(tmp_path):
    root = _folder(tmp_path / "train", classes=2, per_class=3)
    with pytest.raises(SubsetError, match="--classes 2 or fewer"):
        choose_classes(class_folders(root), 5, seed=0)
    with pytest.raises(SubsetError, match="lower --val-per-class"):
        choose_subset(root, ["n000"], val_per_class=3, seed=0)
    with pytest.raises(SubsetError, match="lacks"):
        choose_classes(class_folders(root), None, 0, listed=["n000", "n999"])
    with pytest.raises(SubsetError, match="not a folder"):
        class_folders(tmp_path / "missing")


def test_the_command_fails_in_one_sentence(tmp_path, capsys):
    root = _folder(tmp_path / "train", classes=2, per_class=3)
    assert decide.main(["--images", str(tmp_path / "nowhere"), "--output", str(tmp_path / "out")]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        f"error: {tmp_path / 'nowhere'} is not a folder; pass an ImageFolder (ROOT/CLASS/IMAGE), e.g. ImageNet's train/"]
    assert decide.main(["--images", str(root), "--output", str(tmp_path / "out"), "--classes", "5"]) == 2
    assert "--classes 2 or fewer" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        decide.main(["--output", str(tmp_path / "out")])  # no --images and not --tiny: argparse's usage error
    assert "--images is required" in capsys.readouterr().err


def _scores(rng, accuracies: dict[str, dict[str, float]], n: int = 2000) -> dict:
    return {arm: {p: (rng.random((1, n)) < acc)[:, :] for p, acc in probes.items()}
            for arm, probes in accuracies.items()}


def test_bootstrap_is_paired_and_brackets_the_estimate():
    rng = np.random.default_rng(0)
    correct = rng.random((1, 500)) < 0.6
    study = Study({"mae": {"linear": correct}, "c2fmae": {"linear": correct.copy()}}, replicates=500)
    assert study.difference("c2fmae", "mae", "linear") == (0.0, 0.0, 0.0)  # same images, same draws: nothing left
    point, low, high = study.accuracy("mae", "linear")
    assert low < point < high and high - low < 10  # ~ +-4.3 points at n = 500, p = 0.6
    # Two seeds: a replicate averages its drawn seeds over its drawn images.
    two = np.array([[1, 1, 0, 0], [1, 0, 0, 0]], bool)
    assert replicate_accuracy(two, np.array([[0, 1, 2, 3]]), np.array([[0, 1]]))[0] == pytest.approx(37.5)
    with pytest.raises(ValueError, match="same held-out images"):
        Study({"mae": {"linear": correct}, "c2fmae": {"linear": correct[:, :10]}})


@pytest.mark.parametrize("c2fmae, expected", [(0.75, "go"), (0.45, "no-go"), (0.60, "no-go (open)")])
def test_reading_follows_the_interval_of_c2fmae_minus_mae(c2fmae, expected):
    rng = np.random.default_rng(1)
    base = {"random_init": {"linear": 0.1, "knn": 0.1}, "mae": {"linear": 0.5, "knn": 0.4, "finetune": 0.6},
            "c2fmae_parallel": {"linear": 0.5, "knn": 0.4, "finetune": 0.6}}
    scores = _scores(rng, {**base, "c2fmae": {"linear": 0.5, "knn": 0.4, "finetune": c2fmae}})
    if expected == "no-go (open)":  # the same images right but 1%: a difference well inside its interval
        scores["c2fmae"]["finetune"] = scores["mae"]["finetune"].copy()
        scores["c2fmae"]["finetune"][0, :20] = ~scores["c2fmae"]["finetune"][0, :20]
    study = Study(scores, replicates=400)
    decision, lines = read_study(study)
    assert decision == expected
    assert re.match(r"validity: MAE - random init on the linear probe = +(3[5-9]|4[0-5])\.\d \[", lines[0])
    assert lines[1].startswith(expected.split(" ")[0] + ":" if expected != "no-go (open)" else "no-go (open):")
    assert any(line.startswith("cascade:") for line in lines)
    assert last_line(decision, study).startswith(f"decision={expected.replace(' ', '_')} c2fmae_minus_mae=")
    rows = table(study)
    assert rows[0].split() == ["linear", "probe", "k-NN", "fine-tune"]
    assert rows[1].startswith("random_init") and rows[1].rstrip().endswith("-")  # no fine-tune of random init


def test_no_decision_when_mae_barely_beats_random_init():
    rng = np.random.default_rng(2)
    # 14 points over 200 images: the mean passes the bar, its interval (about +-6) does not.
    study = Study(_scores(rng, {"random_init": {"linear": 0.10}, "mae": {"linear": 0.24, "finetune": 0.5},
                                "c2fmae": {"linear": 0.5, "finetune": 0.9}}, n=200), replicates=400)
    decision, lines = read_study(study)
    assert study.difference("mae", "random_init", "linear")[0] >= 10
    assert decision == "cannot decide" and "pretrain longer" in lines[-1]


def test_arms_share_one_recipe_and_one_global_batch():
    """Tiny: all four arms (the matched decoder is built at every candidate width: seconds); ViT-B: the
    three whose switches cost nothing, with the parallel decoder's overrides as the tiny twin's shape."""
    from pretraining.training.config import apply_overrides, to_dict

    parallel = decide.parallel_decoder(decide.TINY, num_semantic_classes=133)
    assert parallel["decoder"] == "parallel" and tuple(parallel["decoder_units"]) == (1, 2, 3)
    vit_base = decide.gpu_size(200, 1024, 20.0, 100)
    for size, arms in ((decide.TINY, decide.ARMS), (vit_base, ("mae", "c2fmae", "c2fmae_targets_only"))):
        configs = {}
        for arm in arms:
            name, sets = decide.arm_command(arm, size, seed=3, parallel=parallel)
            configs[arm] = apply_overrides(decide.recipe(name), sets)
        shared = [{k: v for k, v in to_dict(c).items() if k not in ("model", "name")} for c in configs.values()]
        assert all(s == shared[0] for s in shared)  # optimiser, data, schedule, global batch, seed: one recipe
        assert shared[0]["seed"] == 3 and shared[0]["global_batch"] == (4 if size is decide.TINY else 1024)
        models = {arm: c.model for arm, c in configs.items()}
        assert models["mae"].decoder == "mae" and models["mae"].arch.startswith("mae_")
        for field in ("embed_dim", "depth", "img_size", "patch_size"):  # the same encoder
            assert getattr(models["mae"], field) == getattr(models["c2fmae"], field)
        assert models["c2fmae_targets_only"].input_modalities == ("rgb",)
        assert models["c2fmae_targets_only"].masking.num_visible == models["mae"].masking.num_visible
    assert configs["c2fmae"].model.arch == "c2fmae_vit_base_patch16" and configs["mae"].optim.base_lr == 1.5e-4
    tiny_parallel = apply_overrides(decide.recipe("tiny"), decide.arm_command("c2fmae_parallel", decide.TINY, 0,
                                                                               parallel)[1]).model
    assert (tiny_parallel.decoder, tiny_parallel.decoder_units, tiny_parallel.decoder_dim) == \
        ("parallel", (1, 2, 3), parallel["decoder_dim"])


def test_the_gpu_studys_commands_are_accepted_by_the_commands_they_run(tmp_path, monkeypatch):
    """The GPU study runs each stage as a subprocess (the tiny twin calls them in-process): every command
    line it would run must parse with its command's own parser and, for pretraining and fine-tuning, its
    overrides must apply to the named recipe; else the study fails hours in, after labeling."""
    import labeling.run
    from pretraining import evaluate, export, train
    from pretraining.evaluation.finetune import RECIPES as FINETUNE_RECIPES
    from pretraining.training.config import apply_overrides
    from pretraining.training.recipes import get_recipe

    root = _folder(tmp_path / "train", classes=3, per_class=6)
    args = decide.parse_args(["--images", str(root), "--output", str(tmp_path / "out"), "--classes", "2",
                              "--val-per-class", "2", "--launcher", "torchrun --nproc_per_node 8", "--pretrain-set", "data.batch_size=128",
                              "--finetune-set", "accum_steps=8", "--label-arg=--staged-models=/models"])
    size = decide.study_size(args)
    runner = decide.Runner(args.output, in_process=False, launcher=["torchrun", "--nproc_per_node", "8"])
    ran = []

    class Ran(Exception):
        pass

    def command(name, argv, distributed=False):
        ran.append((name, argv, distributed))
        raise Ran  # stands in for the subprocess; the stage is not recorded as done

    monkeypatch.setattr(runner, "command", command)
    with pytest.raises(Ran):
        decide.prepare_data(args, runner, size)
    parallel = {"decoder": "parallel", "decoder_units": [1, 2, 3], "decoder_dim": 96}  # as a rerun reads them back
    run_dir, timm_dir = tmp_path / "run", tmp_path / "timm"
    run_dir.mkdir()
    timm_dir.mkdir()
    (run_dir / "summary.json").write_text("{}")
    (timm_dir / "model.safetensors").write_bytes(b"")
    for arm in decide.ARMS:
        with pytest.raises(Ran):
            decide.pretrain(runner, arm, 0, size, tmp_path / "labels", run_dir, parallel)
    with pytest.raises(Ran):
        decide.export(runner, "mae", 0, run_dir, timm_dir)
    with pytest.raises(Ran):
        decide.finetune(runner, "mae", 0, timm_dir, tmp_path / "eval", size, tmp_path / "ft", tmp_path / "ft.npz")

    stages = [name.split()[0] for name, _, _ in ran]
    assert stages == ["label", *["pretrain"] * len(decide.ARMS), "export", "finetune"]
    for name, argv, distributed in ran:
        assert distributed == (name.startswith(("pretrain", "finetune")))  # under the launcher
        if name == "label":
            assert argv[0] == "labeling/run.py"
            labeled = labeling.run.parser().parse_args(argv[1:])
            assert labeled.sample == 2 * 1300 and labeled.models == "default"
        elif name.startswith("pretrain"):
            assert argv[:2] == ["-m", "pretraining.train"]
            parsed = train.parse_args(argv[2:])
            cfg = apply_overrides(get_recipe(parsed.config), parsed.set)
            assert (cfg.epochs, cfg.global_batch, cfg.data.batch_size) == (200, 1024, 128)
        elif name.startswith("export"):
            assert export.parse_args(argv[2:]).output == str(timm_dir)
        else:
            parsed = evaluate.build_parser().parse_args(argv[2:])
            ft = evaluate.apply_overrides(FINETUNE_RECIPES[parsed.config](), parsed.set)
            assert (parsed.command, ft.epochs, ft.accum_steps) == ("finetune", 100, 8)


def test_a_stage_command_is_teed_to_its_log_and_a_failure_names_it(tmp_path, capsys):
    runner = decide.Runner(tmp_path, in_process=False, launcher=[])
    runner.command("hello", ["-c", "import pretraining; print('from the project')"])
    with pytest.raises(decide.StudyError, match="the broken stage failed \\(exit 3\\)"):
        runner.command("broken", ["-c", "import sys; print('why'); sys.exit(3)"])
    log = (tmp_path / "decide.log").read_text().splitlines()
    assert log[1:] == ["from the project", log[2], "why"] and log[0].startswith("$ ") and log[2].startswith("$ ")
    assert "from the project" in capsys.readouterr().out


def test_gpu_hours_estimate_is_images_over_rates():
    hours = decide.estimate_gpu_hours(images=100_000, held_out=5_000, epochs=200, finetune_epochs=100, seeds=1)
    low, high = decide.RATES["pretrain"]
    assert hours["pretrain"] == pytest.approx((4 * 200 * 100_000 / low / 3600, 4 * 200 * 100_000 / high / 3600))
    assert hours["total"][0] == pytest.approx(sum(h[0] for k, h in hours.items() if k != "total"))
    assert hours["total"][0] < hours["total"][1]


@pytest.mark.slow
@pytest.mark.ray
def test_tiny_twin_runs_end_to_end_and_resumes(tmp_path, capsys, one_thread):
    """Label the bundled photos, pretrain the four arms, export, probe, fine-tune, report; a rerun reuses it all."""
    from pretraining.evaluate import main as evaluate

    out = tmp_path / "decide"
    assert decide.main(["--tiny", "--output", str(out)]) == 0
    printed = capsys.readouterr().out
    report = (out / "report.txt").read_text()
    assert report.strip() in printed
    rows = report.splitlines()
    assert rows[0].startswith("top-1 (%) on 15 held-out images, 1 pretraining seed(s)")
    assert [r.split()[0] for r in rows[2:7]] == ["random_init", "mae", "c2fmae", "c2fmae_parallel",
                                                 "c2fmae_targets_only"]
    assert rows[-1].startswith("decision=") and "c2fmae_minus_mae=" in rows[-1] and "validity=" in rows[-1]
    assert any(r.startswith(("validity:", "cannot decide")) for r in rows)
    # 12 labeled (4 per class), 15 held out (5 per class), never both.
    train = {p.relative_to(out / "eval" / "train") for p in (out / "eval" / "train").rglob("*.png")}
    val = {p.relative_to(out / "eval" / "val") for p in (out / "eval" / "val").rglob("*.png")}
    assert len(train) == 12 and len(val) == 15 and not train & val
    # One recipe and one global batch: the run folders' configs differ only in the model.
    stored = [json.loads((out / "runs" / f"{a}-s0" / "pretrain" / "config.json").read_text()) for a in decide.ARMS]
    assert all({k: v for k, v in s.items() if k not in ("model", "name")} ==
               {k: v for k, v in stored[0].items() if k not in ("model", "name")} for s in stored)
    # The kept predictions give the commands' own top-1.
    knn = json.loads((out / "stages" / "probe-c2fmae-s0.json").read_text())["result"]["knn"]
    spec = f"local-dir:{out / 'runs' / 'c2fmae-s0' / 'timm'}"
    assert evaluate(["knn", "--model", spec, "--data", str(out / "eval"), "--config", "tiny"])["top1"] == \
        pytest.approx(knn)
    linear = json.loads((out / "stages" / "probe-mae-s0.json").read_text())["result"]["linear"]
    spec = f"local-dir:{out / 'runs' / 'mae-s0' / 'timm'}"
    assert evaluate(["linear-probe", "--model", spec, "--data", str(out / "eval"), "--config", "cached_tiny",
                     *[a for s in decide.TINY.linear for a in ("--set", s)]])["top1"] == pytest.approx(linear)
    tuned = json.loads((out / "stages" / "finetune-mae-s0.json").read_text())["result"]
    assert tuned["finetune"] == pytest.approx(tuned["command_top1"])
    assert np.load(out / "runs" / "mae-s0" / "finetune.npz")["finetune"].shape == (15,)

    capsys.readouterr()
    assert decide.main(["--tiny", "--output", str(out)]) == 0
    again = capsys.readouterr().out
    assert "===" not in again and "$ " not in again  # every stage reused, no command run
    assert (out / "report.txt").read_text() == report

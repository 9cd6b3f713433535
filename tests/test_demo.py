"""The README's main job: workflows/demo.sh runs end to end offline and leaves valid outputs."""

import json
import os
import subprocess
import sys
from pathlib import Path

import datasets
import pytest
import timm
import torch

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
@pytest.mark.ray
def test_demo_runs_end_to_end_and_resumes(tmp_path):
    out = tmp_path / "demo"
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    proc = subprocess.run(["bash", "workflows/demo.sh", "--output", str(out)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "stage       seconds  result" in proc.stdout and "45 labeled, 0 failed" in proc.stdout

    labels = out / "labels"
    ds = datasets.load_dataset(str(labels), split="train", cache_dir=str(tmp_path / "cache"))
    assert len(ds) == 45 and ds.features["label"].names == ["graphics", "scenes", "science"]  # sorted folder names
    assert (labels / "assets" / "gallery.png").stat().st_size > 10_000
    assert "dataset_info" in (labels / "README.md").read_text()
    # Coverage (issue 29): measured while labeling, in stats.json and on the card with its figure.
    coverage = json.loads((labels / "stats.json").read_text())["coverage"]
    assert coverage["images"] == 45 == sum(coverage["instance_regions_per_image"].values())
    assert "### Regions for instance-guided masking" in (labels / "README.md").read_text()
    assert (labels / "assets" / "masking_coverage.png").stat().st_size > 10_000
    check = subprocess.run([sys.executable, "-m", "dataset_card", "validate", str(labels)], cwd=ROOT)
    assert check.returncode == 0

    summary = json.loads((out / "pretrain" / "summary.json").read_text())
    assert summary["global_step"] == 300
    assert list((out / "pretrain" / "figures").glob("*.png"))
    encoder = timm.create_model(f"local-dir:{out / 'timm'}", pretrained=True, num_classes=0)
    features = encoder.forward_features(torch.zeros(1, 3, 64, 64))
    assert torch.isfinite(features).all()
    metrics = json.loads(next((out / "probe").glob("*.json")).read_text())["metrics"]
    assert 0 <= metrics["top1"] <= 100

    # A rerun resumes every stage instead of redoing it: labeling skips its committed shards and
    # training finds its last checkpoint at the final step.
    again = subprocess.run(["bash", "workflows/demo.sh", "--output", str(out)], cwd=ROOT, env=env,
                           capture_output=True, text=True, timeout=1200)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert json.loads((out / "pretrain" / "summary.json").read_text())["param_sha256"] == summary["param_sha256"]
    assert len(datasets.load_dataset(str(labels), split="train", cache_dir=str(tmp_path / "cache2"))) == 45

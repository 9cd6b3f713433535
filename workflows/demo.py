"""The whole system on a laptop, offline, in minutes: label photos, build the card, pretrain, export, probe.

  bash workflows/demo.sh                      # tiny random models: meaningless labels, real mechanics
  bash workflows/demo.sh --sam-checkpoint sam_vit_b_01ec64.pth --sam-type vit_b \\
      --semantic-model facebook/mask2former-swin-tiny-coco-panoptic     # real labels (needs the weights)

Every stage runs the same command a user would, in a subprocess, and resumes on a rerun: labeling
skips committed shards, training resumes from its newest checkpoint, and the other stages rewrite
their outputs atomically. `--fresh` deletes the output folder first.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# skimage.data's colour photos, grouped into classes for the ImageFolder layout
PHOTOS = {
    "scenes": ("astronaut", "chelsea", "coffee", "rocket"),
    "science": ("hubble_deep_field", "immunohistochemistry", "retina"),
    "graphics": ("colorwheel", "logo"),
}
CROPS = 4  # extra crops of each photo, so pretraining has a few batches to draw from
PRETRAIN_EPOCHS = 60  # with 45 images in batches of 8: 300 optimizer steps


def lay_out_photos(folder: Path) -> int:
    """skimage.data colour photos (and a few crops of each) as <folder>/<class>/<name>.png."""
    import numpy as np
    import skimage.data
    from PIL import Image

    count = 0
    for cls, names in PHOTOS.items():
        (folder / cls).mkdir(parents=True, exist_ok=True)
        for name in names:
            image = getattr(skimage.data, name)()  # logo is RGBA: the labeler's decoder handles it
            h, w = image.shape[:2]
            views = [image] + [image[(k * h) // 8:(k * h) // 8 + h // 2, (k * w) // 6:(k * w) // 6 + w // 2]
                               for k in range(CROPS)]
            for k, view in enumerate(views):
                path = folder / cls / (f"{name}.png" if k == 0 else f"{name}_crop{k}.png")
                if not path.exists():
                    buf = io.BytesIO()
                    Image.fromarray(np.ascontiguousarray(view)).save(buf, format="PNG")
                    tmp = path.with_name(f".{path.name}.tmp")
                    tmp.write_bytes(buf.getvalue())
                    tmp.replace(path)  # never a half-written photo, even if interrupted
                count += 1
    return count


def tee_run(args: list[str], log: Path, header: str) -> int:
    """Run `args` in the project's root with the project importable, `header` then its output to the
    terminal and appended to `log`; its exit code. (The study that decides runs its stages so too.)"""
    print(header, flush=True)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    with open(log, "a") as out:
        out.write(header + "\n")
        out.flush()
        proc = subprocess.Popen(args, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for line in proc.stdout:
            sys.stdout.write(line)
            out.write(line)
        return proc.wait()


def run(stage: str, args: list[str], log: Path) -> float:
    """Run one stage's command, echo its output to the terminal and its log; its wall time in seconds."""
    start = time.perf_counter()
    code = tee_run(args, log, f"\n=== {stage}: {' '.join(args)}")
    if code != 0:
        sys.exit(f"demo: the {stage} stage failed (exit {code}); its output is above and in {log}. "
                 "Rerun the demo to resume.")
    return time.perf_counter() - start


def read_json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.exists() else {}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bash workflows/demo.sh", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", default=os.environ.get("DEMO_OUTPUT", "demo_output"),
                        help="folder for everything the demo writes (default demo_output)")
    parser.add_argument("--fresh", action="store_true", help="delete the output folder first")
    parser.add_argument("--sam-checkpoint", help="a real SAM checkpoint: label with real models instead of tiny ones")
    parser.add_argument("--sam-type", default="vit_h", help="type of --sam-checkpoint (vit_h, vit_l, vit_b)")
    parser.add_argument("--semantic-model", default="facebook/mask2former-swin-large-coco-panoptic",
                        help="semantic model (hub id, needs the network once, or a local folder) with --sam-checkpoint")
    args = parser.parse_args(argv)
    out = Path(args.output).resolve()
    if args.fresh and out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    log = out / "demo.log"
    py = sys.executable
    times = {}

    start = time.perf_counter()
    photos = lay_out_photos(out / "photos")
    times["photos"] = time.perf_counter() - start
    print(f"laid out {photos} images from skimage.data under {out / 'photos'}")

    if args.sam_checkpoint:
        import torch

        # Real models run on CPUs only when asked: the demo asks on a machine without a GPU.
        models = ["--models", "default", "--sam-checkpoint", args.sam_checkpoint, "--sam-type", args.sam_type,
                  "--semantic-model", args.semantic_model, *([] if torch.cuda.is_available() else ["--device", "cpu"])]
    else:
        models = ["--models", "tiny-random", "--points-per-side", "8"]
    labels = out / "labels"
    times["label"] = run("label", [py, "labeling/run.py", "--input", str(out / "photos"), "--output", str(labels),
                                   *models, "--shard-size", "8", "--num-cpus", "2"], log)
    times["card"] = run("card", [py, "-m", "dataset_card", "build", str(labels)], log)
    times["validate"] = run("validate", [py, "-m", "dataset_card", "validate", str(labels), "--full"], log)

    run_dir = out / "pretrain"
    times["pretrain"] = run("pretrain", [
        py, "-m", "pretraining.train", "--data", str(labels), "--config", "tiny", "--output", str(run_dir),
        "--set", "data.batch_size=8", "--set", f"epochs={PRETRAIN_EPOCHS}", "--set", "figure_every=100",
        "--set", "checkpoint_every=100", "--no-progress"], log)
    timm_dir = out / "timm"
    times["export"] = run("export", [py, "-m", "pretraining.export", str(run_dir), "--to", "timm",
                                     "--output", str(timm_dir)], log)

    probe_data = out / "probe_data"
    if not (probe_data / "metadata.json").exists():
        sys.path.insert(0, str(ROOT))
        from dataset_card.synthetic.shapes import write_colour_task

        write_colour_task(str(probe_data), 300, seed=1)
    probe = [py, "-m", "pretraining.evaluate", "linear-probe", "--model", f"local-dir:{timm_dir}",
             "--data", str(probe_data), "--config", "cached_tiny", "--val-fraction", "0.3"]
    times["probe"] = run("probe", [*probe, "--output", str(out / "probe")], log)
    times["probe (random init)"] = run("probe (random init)", [*probe, "--random-init",
                                                                "--output", str(out / "probe_random")], log)

    summary(out, times, real=bool(args.sam_checkpoint))
    return 0


def summary(out: Path, times: dict[str, float], real: bool) -> None:
    stats = read_json(out / "labels" / "stats.json")
    train = read_json(out / "pretrain" / "summary.json")
    probe = read_json(next((out / "probe").glob("*.json"), out / "probe" / "none")).get("metrics", {})
    random = read_json(next((out / "probe_random").glob("*.json"), out / "none")).get("metrics", {})
    failed = ", ".join(f"{k}: {v}" for k, v in stats.get("failed_by_type", {}).items()) or "none"
    losses = ", ".join(f"{k} {v:.3f}" for k, v in train.get("last", {}).items() if isinstance(v, (int, float)))
    rows = [
        ("photos", times["photos"], ""),
        ("label", times["label"], f"{stats.get('written', '?')} labeled, {stats.get('failed', '?')} failed ({failed})"),
        ("card", times["card"], "README.md + assets/ (gallery, histograms)"),
        ("validate", times["validate"], "every row decoded and checked"),
        ("pretrain", times["pretrain"], f"{train.get('global_step', '?')} steps; last losses: {losses}"),
        ("export", times["export"], "timm folder (config.json + model.safetensors)"),
        ("probe", times["probe"] + times["probe (random init)"],
         f"top-1 {probe.get('top1', float('nan')):.1f} pretrained vs {random.get('top1', float('nan')):.1f} random init"),
    ]
    print("\n" + "=" * 100)
    print(f"{'stage':<10} {'seconds':>8}  result")
    print("-" * 100)
    for name, seconds, result in rows:
        print(f"{name:<10} {seconds:>8.1f}  {result}")
    print(f"{'total':<10} {sum(times.values()):>8.1f}")
    print("=" * 100)
    if not real:
        print("The labels come from tiny random models: they are meaningless and show the mechanics only.\n"
              "Nine photos are too few for a held-out classification, so the probe runs on a synthetic task\n"
              "(the class is the kind of a small coloured shape on a random background): read its numbers as a\n"
              "smoke signal that the exported encoder works downstream, not as evidence about the method.")
    print(f"""
Where to look:
  dataset card      {out / 'labels' / 'README.md'}
  gallery           {out / 'labels' / 'assets' / 'gallery.png'}
  reconstructions   {out / 'pretrain' / 'figures'}
  TensorBoard       tensorboard --logdir {out / 'pretrain'}
  timm encoder      timm.create_model("local-dir:{out / 'timm'}", pretrained=True, num_classes=0)
  full log          {out / 'demo.log'}""")


if __name__ == "__main__":
    sys.exit(main())

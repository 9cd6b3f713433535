"""Label a small ground-truth sample under several labeler settings and print quality against speed.

  python -m labeling.quality.sweep --input /data/coco/val-sample --output /data/sweep \\
      --gt /data/coco/annotations/instances_val2017.json \\
      --setting points_per_side=16 --setting points_per_side=32 \\
      --setting points_per_side=32,pred_iou_thresh=0.88,stability_score_thresh=0.95

Each setting is a comma-separated list of labeling/run.py flags (underscores for dashes) and gets
its own output folder under --output, labeled by `labeling/run.py` exactly as a real run would
(so rerunning resumes) and scored by `labeling.quality.report`. The table shows what each setting buys
in quality and what it costs in images/s, so thresholds are chosen with numbers.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

from labeling.quality import ground_truth as gt_io
from labeling.quality import report

ROOT = Path(__file__).resolve().parents[2]


def parse_setting(text: str) -> dict[str, str]:
    """'points_per_side=32,pred_iou_thresh=0.88' -> {'points_per_side': '32', 'pred_iou_thresh': '0.88'}."""
    setting = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        key, sep, value = part.partition("=")
        if not sep or not re.fullmatch(r"[a-z_]+", key.strip()):
            raise ValueError(f"setting {text!r}: write each flag as name=value, e.g. points_per_side=32")
        setting[key.strip()] = value.strip()
    return setting


def slug(setting: dict[str, str]) -> str:
    return "_".join(f"{k}-{v}" for k, v in setting.items()) or "defaults"


def label(input_dir: str, output: Path, models: str, setting: dict[str, str], extra: list[str]) -> None:
    flags = [a for k, v in setting.items() for a in (f"--{k.replace('_', '-')}", v)]
    cmd = [sys.executable, str(ROOT / "labeling" / "run.py"), "--input", input_dir, "--output", str(output),
           "--models", models, "--no-progress", *flags, *extra]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.run(cmd, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"labeling with {slug(setting)} failed (exit {proc.returncode}); its output is above")


def _fmt(value) -> str:
    return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.4f}"


def table(rows: list[tuple[str, dict, dict]]) -> str:
    lines = [f"{'setting':<48} {'img/s':>7} {'AR@100':>8} {'AR@10':>8} {'align':>8} {'mIoU':>8} {'PQ':>8}",
             "-" * 101]
    for name, stats, scores in rows:
        inst, sem = scores.get("instances", {}), scores.get("semantic", {})
        pq = (scores.get("panoptic") or {}).get("all", {}).get("PQ")
        lines.append(f"{name:<48} {stats.get('images_per_s', float('nan')):>7.3f} {_fmt(inst.get('AR@100')):>8} "
                     f"{_fmt(inst.get('AR@10')):>8} {_fmt(scores.get('alignment', {}).get('accuracy')):>8} "
                     f"{_fmt(sem.get('mIoU')):>8} {_fmt(pq):>8}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m labeling.quality.sweep", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", required=True, help="ImageFolder of ground-truth images (<root>/<class>/<file>)")
    parser.add_argument("--output", required=True, help="folder for one labeled output per setting")
    parser.add_argument("--setting", action="append", required=True,
                        help="labeling/run.py flags for one run, e.g. points_per_side=32,pred_iou_thresh=0.88")
    parser.add_argument("--models", default="default", choices=("default", "tiny-random"))
    parser.add_argument("--gt", help="COCO instances JSON")
    parser.add_argument("--gt-semantic", help="ground-truth PNG folder (see python -m labeling.evaluate --help)")
    parser.add_argument("--gt-panoptic-json", help="COCO panoptic JSON for --gt-semantic")
    parser.add_argument("--limit", type=int, help="label only the first N images in each run")
    args, extra = parser.parse_known_args(argv)  # anything else goes to every labeling/run.py call
    try:
        settings = [parse_setting(s) for s in args.setting]
        semantic = (gt_io.coco_panoptic(args.gt_semantic, args.gt_panoptic_json)
                    if args.gt_semantic and args.gt_panoptic_json else None)
        if args.gt is None and semantic is None:
            raise gt_io.GroundTruthError("give --gt (COCO instances JSON) and/or --gt-semantic with --gt-panoptic-json")
        rows = []
        for setting in settings:
            out = Path(args.output) / slug(setting)
            label(args.input, out, args.models, setting, [*extra, *(["--limit", str(args.limit)] if args.limit else [])])
            scores = report.evaluate(str(out), args.gt, semantic)
            (out / report.QUALITY_FILE).write_text(json.dumps(scores, indent=2))
            rows.append((slug(setting), json.loads((out / "stats.json").read_text()), scores))
    except (ValueError, RuntimeError, OSError, gt_io.GroundTruthError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(table(rows))
    Path(args.output, "sweep.json").write_text(json.dumps(
        [{"setting": name, "images_per_s": stats.get("images_per_s"), "quality": scores}
         for name, stats, scores in rows], indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Score a labeled folder against human ground truth, before spending GPU-hours on ImageNet.

  python -m labeling.evaluate --pred OUTPUT --gt instances_val2017.json \\
      --gt-panoptic-json panoptic_val2017.json --gt-semantic panoptic_val2017/

Instances: class-agnostic COCOeval (AR@1/10/100, by size, AP). Semantic: mIoU, pixel accuracy,
per-class IoU (our taxonomy mapped to the ground truth's by name, or by --class-map). Alignment:
the share of ground-truth objects whose best-matching instance carries the right class. Panoptic
(with COCO panoptic ground truth): PQ, SQ and RQ of the aligned maps (painted instances as things,
the semantic map as stuff) for things, stuff and all classes, torchmetrics' `PanopticQuality`.
Prints a table and writes OUTPUT/quality.json, which the dataset card shows.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from labeling.quality import ground_truth as gt_io
from labeling.quality.report import QUALITY_FILE, evaluate, format_report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m labeling.evaluate", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pred", required=True, help="a labeled output folder (written by labeling/run.py)")
    parser.add_argument("--gt", "--gt-instances", dest="gt_instances",
                        help="COCO instances JSON (e.g. annotations/instances_val2017.json)")
    parser.add_argument("--gt-semantic", help="folder of ground-truth PNGs named like the images (<stem>.png)")
    parser.add_argument("--gt-panoptic-json", help="COCO panoptic JSON: --gt-semantic then holds its panoptic PNGs")
    parser.add_argument("--gt-classes", help="JSON {id: name} of the label PNGs' taxonomy (label-PNG ground truth)")
    parser.add_argument("--gt-ignore", type=int, default=255, help="unlabeled value in label PNGs (ADE20K: 0)")
    parser.add_argument("--class-map", help="JSON {our_semantic_id: gt_id}; default: match class names")
    parser.add_argument("--limit", type=int, help="score only the first N matched images")
    args = parser.parse_args(argv)
    try:
        semantic = None
        if args.gt_semantic:
            if args.gt_panoptic_json:
                semantic = gt_io.coco_panoptic(args.gt_semantic, args.gt_panoptic_json)
            elif args.gt_classes:
                semantic = gt_io.label_folder(args.gt_semantic, args.gt_classes, args.gt_ignore)
            else:
                parser.error("--gt-semantic needs --gt-panoptic-json (COCO panoptic) or --gt-classes (label PNGs)")
        class_map = None
        if args.class_map:
            class_map = {int(k): int(v) for k, v in json.loads(Path(args.class_map).read_text()).items()}
        report = evaluate(args.pred, args.gt_instances, semantic, class_map, args.limit)
    except (gt_io.GroundTruthError, OSError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    Path(args.pred, QUALITY_FILE).write_text(json.dumps(report, indent=2))
    print(format_report(report))
    print(f"wrote {Path(args.pred, QUALITY_FILE)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

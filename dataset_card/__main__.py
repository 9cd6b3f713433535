"""`python -m dataset_card COMMAND`: tools for a labeled dataset folder.

  build OUTPUT            write the dataset card OUTPUT/README.md with statistics, a gallery and
                          histograms (OUTPUT/assets/), from the files the labeling run left; name
                          the images' source and terms with --pretty-name, --license, --source-dataset
  validate OUTPUT         check OUTPUT against the dataset contract; exits 1 and names the file
                          and row of each problem (add --full to decode every row, not a sample)
  repaint OUTPUT          recompute instance_mask and the instances' level / parent from the stored
                          instances and semantic maps under a painting rule (--rule objects|salient|parts),
                          shard by shard, resumable; turns a schema v1 folder into v2; no model runs
  publish OUTPUT DEST     write the copy of OUTPUT to share: the dataset's files without run leftovers
                          (.lease.json, .parts/, temporary files) or internal paths (redacted in the
                          manifest and the other JSON files), and PNG previews of the label maps the
                          Hub's viewer shows; --dry-run lists what it would write and leave out
  show OUTPUT IMAGE_ID    draw one image's labels over it (--layer semantic|instances|levels) into a
                          PNG of its size (--out FILE.png); a labels-only folder's over the file under
                          --images ROOT, else over grey; prints what the colours mean
  check OUTPUT            write a small synthetic dataset through the contract, load it back with
                          `datasets.load_dataset`, and validate it (a self-test of the install)

OUTPUT is a local folder or a URL that pyarrow understands (s3://bucket/prefix, gs://...).
"""

from __future__ import annotations

import argparse
import sys

from dataset_card.card.source import CardOptions
from dataset_card.contract.output_folder import OutputError
from dataset_card.contract.schema import SCHEMA_VERSION, SchemaError
from dataset_card.contract.shards import OutputWriteError


def check(output: str) -> int:
    import datasets
    import numpy as np

    from dataset_card.contract import codecs, painting
    from dataset_card.contract.output_folder import OutputFolder
    from dataset_card.contract.schema import SCHEMA_VERSION, validate_features
    from dataset_card.synthetic.shapes import write_synthetic_dataset

    folder = OutputFolder.open(output)
    write_synthetic_dataset(folder, num_images=16, num_shards=2)
    ds = datasets.load_dataset(output, split="train")
    validate_features(ds.features, source=output)
    rows = ds.with_format("arrow")[:].to_pylist()
    metadata = folder.read_metadata()
    for row in rows:
        semantic = codecs.decode_mask(row["semantic_mask"]["bytes"])
        painted = painting.paint_instances(row["instances"], semantic, metadata.thing_ids, metadata.painting,
                                           metadata.num_semantic_classes)
        if not np.array_equal(painted, codecs.decode_mask(row["instance_mask"]["bytes"])):
            print(f"instance_mask is not what rule {metadata.painting.name!r} paints for {row['image_id']}",
                  file=sys.stderr)
            return 1
    from dataset_card.card.build import build_card
    from dataset_card.validate import validate as run

    report = run(folder, full=True)
    if not report.ok:
        print(report.format(), file=sys.stderr)
        return 1
    print(f"dataset contract v{SCHEMA_VERSION}: wrote, loaded and validated {len(rows)} rows in {output}; "
          f"card: {build_card(folder)}")
    return 0


def build(args: argparse.Namespace) -> int:
    from dataset_card.card.build import BuildConfig, build_card

    cfg = BuildConfig(options=CardOptions.from_args(args), gallery_size=args.gallery_size, seed=args.seed,
                      dataset=args.dataset)
    print(f"wrote {build_card(args.output, cfg)}")
    return 0


def validate(args: argparse.Namespace) -> int:
    from dataset_card.validate import validate as run

    report = run(args.output, full=args.full, sample=args.sample, seed=args.seed, workers=args.workers,
                 progress=sys.stderr.isatty())
    print(report.format(), file=sys.stdout if report.ok else sys.stderr)
    return 0 if report.ok else 1


def repaint(args: argparse.Namespace) -> int:
    from dataset_card.repaint import repaint as run

    result = run(args.output, args.rule, args.min_purity, workers=args.workers, progress=sys.stderr.isatty(),
                 log=print)
    print(f"repainted {len(result.repainted)} shards ({result.rows:,} rows) under rule {result.rule.name!r}"
          + (f", {len(result.skipped)} already were" if result.skipped else "")
          + f"; {args.output} is dataset schema v{SCHEMA_VERSION} and its card is rebuilt")
    return 0


def publish(args: argparse.Namespace) -> int:
    from dataset_card.publish import plan
    from dataset_card.publish import publish as run

    if args.dry_run:
        print(plan(args.output, previews=not args.no_previews).format(args.dest))
        return 0
    work = run(args.output, args.dest, previews=not args.no_previews, workers=args.workers, log=lambda m: None)
    print(f"wrote {len(work.entries)} files to {args.dest}; left out {len(work.left_out)}"
          + (f" ({', '.join(name for name, _ in work.left_out)})" if work.left_out else "")
          + "; upload it with huggingface_hub's upload_large_folder (docs/card.md)")
    return 0


def show(args: argparse.Namespace) -> int:
    from dataset_card.show import show as run

    shown = run(args.output, args.image_id, args.layer, args.images)
    out = args.out or f"{args.image_id.replace('/', '_')}.{args.layer}.png"
    with open(out, "wb") as f:
        f.write(shown.png)
    print("\n".join([f"wrote {out} ({args.layer})", *shown.legend]))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dataset_card", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("build", help="write OUTPUT/README.md: statistics, gallery, usage, citations")
    p.add_argument("output", help="output folder of a labeling run")
    p.add_argument("--gallery-size", type=int, default=6, help="images in the gallery (default 6; 0 for none)")
    p.add_argument("--seed", type=int, default=0, help="which images the gallery shows (default 0)")
    p.add_argument("--dataset", default="DATASET",
                   help="repo id or path the usage snippets load, e.g. your-org/imagenet-c2f-labels")
    CardOptions.add_arguments(p.add_argument_group("what the card says of the images (kept in OUTPUT/card.json)"))
    p = sub.add_parser("validate", help="check OUTPUT against the dataset contract; exit 1 on any problem")
    p.add_argument("output", help="output folder of a labeling run")
    p.add_argument("--full", action="store_true", help="decode and check every row, not a sample (slow)")
    p.add_argument("--sample", type=int, default=256,
                   help="rows to decode and check, spread over all shards, at least one each (default 256)")
    p.add_argument("--seed", type=int, default=0, help="seed of the sample (default 0)")
    p.add_argument("--workers", type=int, default=1, help="processes that decode rows (default 1)")
    p = sub.add_parser("repaint", help="recompute instance_mask under a painting rule, without the models")
    p.add_argument("output", help="output folder of a labeling run (schema v1 or v2)")
    p.add_argument("--rule", choices=("objects", "salient", "parts"), default=None,
                   help="objects (thing objects clipped to their class; the default for a v1 folder), salient "
                        "(objects, plus whole, salient masks with no thing class as class-agnostic objects) or parts "
                        "(every mask, smaller on top: v1's map); default: the folder's own rule")
    p.add_argument("--min-purity", type=float, default=None,
                   help="share of its class under which a thing mask is dropped, not an object (default 0.75)")
    p.add_argument("--workers", type=int, default=1, help="processes that repaint shards (default 1)")
    p = sub.add_parser("publish", help="write the shareable copy of OUTPUT into DEST (--dry-run: list it)")
    p.add_argument("output", help="output folder of a labeling run")
    p.add_argument("dest", help="a new or empty folder (local path or URL) to write the release into")
    p.add_argument("--dry-run", action="store_true", help="list what would be written and left out; write nothing")
    p.add_argument("--no-previews", action="store_true",
                   help="copy the data files unchanged, without the PNG previews of the label maps")
    p.add_argument("--workers", type=int, default=1, help="processes that write the previews (default 1)")
    p = sub.add_parser("show", help="draw one image's labels into a PNG of its size")
    p.add_argument("output", help="output folder of a labeling run")
    p.add_argument("image_id", help="the row's image_id: the input's relative path without extension")
    p.add_argument("--layer", choices=("semantic", "instances", "levels"), default="instances",
                   help="semantic classes, painted instances (default) or every mask by level")
    p.add_argument("--out", help="PNG file to write (default IMAGE_ID.LAYER.png here, '/' as '_')")
    p.add_argument("--images", help="for a labels-only folder: the folder it was labeled from (else grey)")
    p = sub.add_parser("check", help="self-test: write, load and validate a synthetic dataset")
    p.add_argument("output", help="folder to write the synthetic dataset into")
    args = parser.parse_args(argv)
    try:
        if args.command == "build":
            return build(args)
        if args.command == "validate":
            return validate(args)
        if args.command == "repaint":
            return repaint(args)
        if args.command == "publish":
            return publish(args)
        if args.command == "show":
            return show(args)
        return check(args.output)
    except (OutputError, SchemaError, OutputWriteError, ValueError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

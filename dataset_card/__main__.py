"""`python -m dataset_card COMMAND`: tools for a labeled dataset folder.

  check OUTPUT   write a small synthetic dataset through the contract, load it back with
                 `datasets.load_dataset`, and validate it (a self-test of the install)
"""

from __future__ import annotations

import argparse
import sys


def check(output: str) -> int:
    import datasets
    import numpy as np

    from dataset_card import codecs
    from dataset_card.schema import SCHEMA_VERSION, validate_features
    from dataset_card.synthetic import write_synthetic_dataset

    write_synthetic_dataset(output, num_images=16, num_shards=2)
    ds = datasets.load_dataset(output, split="train")
    validate_features(ds.features, source=output)
    rows = ds.with_format("arrow")[:].to_pylist()
    for row in rows:
        painted = codecs.paint(row["instances"], row["height"], row["width"])
        if not np.array_equal(painted, codecs.decode_mask(row["instance_mask"]["bytes"])):
            print(f"instance_mask != paint(instances) for {row['image_id']}", file=sys.stderr)
            return 1
    print(f"dataset contract v{SCHEMA_VERSION}: wrote, loaded and checked {len(rows)} rows in {output}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dataset_card", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("check", help="self-test: write, load and validate a synthetic dataset")
    p.add_argument("output", help="folder to write the synthetic dataset into")
    args = parser.parse_args(argv)
    if args.command == "check":
        return check(args.output)
    return 2


if __name__ == "__main__":
    sys.exit(main())

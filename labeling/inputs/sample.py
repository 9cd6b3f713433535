"""`--sample N`: a deterministic, class-stratified sample of the input list that a later run can grow.

The inputs are put in one order and the sample of N is its first N inputs (kept in input order):

- within each class (an ImageFolder class folder, a table's label; unlabeled inputs form a class
  of their own), inputs are ranked by a key, the first 8 bytes of sha256("SEED:image_id");
- round r takes the r-th input of every class that still has one, classes in the order of their
  own key (sha256("SEED:class:NAME")): a round-robin over the classes.

So the sample is stratified (any two classes get counts within one of each other, unless a class
runs out of images), deterministic (a function of the seed and the ids alone: not of the machine,
the listing order or the run), and nested: the sample of N lies inside the sample of any M > N
drawn with the same seed, so a bigger `--sample`, or the full run, labels only what is new. Keys
hash each id on its own, so images added to the input later move few sampled ones. Inputs the
listing already failed (a duplicate image_id) are never drawn.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import numpy as np

from labeling.inputs.input_list import InputError, Inputs


def _key(text: str) -> int:
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big")


def stratified_order(image_ids: Sequence[str], labels: Sequence[int], class_names: Sequence[str],
                     seed: int = 0) -> np.ndarray:
    """(n,) int64 input indices in round-robin order over the classes (`labels`: each input's index into
    `class_names`; one outside it is unlabeled), each class's inputs in the order of their seeded key;
    the first N of it are the sample of N."""
    n = len(image_ids)
    if n == 0:
        return np.zeros(0, np.int64)
    labels = np.asarray(labels, np.int64)
    labels = np.where((labels >= 0) & (labels < len(class_names)), labels, -1)
    present, group = np.unique(labels, return_inverse=True)  # (G,) labels, (n,) group of each input
    keys = np.fromiter((_key(f"{seed}:{i}") for i in image_ids), np.uint64, count=n)
    by_class = np.lexsort((np.arange(n), keys, group))  # class, then key (then index: equal keys)
    starts = np.searchsorted(group[by_class], np.arange(len(present)))
    rank = np.empty(n, np.int64)
    rank[by_class] = np.arange(n) - starts[group[by_class]]  # place of each input within its class
    names = [class_names[c] if c >= 0 else "" for c in present.tolist()]
    class_key = np.fromiter((_key(f"{seed}:class:{name}") for name in names), np.uint64, count=len(names))
    return np.lexsort((group, class_key[group], rank)).astype(np.int64)  # round, then class key


def draw_sample(listed: Inputs, size: int, seed: int = 0) -> Inputs:
    """The first `size` inputs of `stratified_order` (listing failures left out), in input order;
    `Inputs.planned` stays the count of every listed input, which the shards are sized for."""
    if size < 1:
        raise InputError(f"--sample {size} draws nothing; pass a positive number of images")
    table = listed.table
    drawable = np.flatnonzero(table.column("error_type").to_numpy(zero_copy_only=False) == "")
    labels = table.column("label").to_numpy()[drawable]
    ids = table.column("image_id").take(drawable).to_pylist()
    chosen = np.sort(drawable[stratified_order(ids, labels, listed.class_names, seed)[:size]])
    return listed.subset(chosen)

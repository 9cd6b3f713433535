"""The decision study's statistics and reading: per-example scores -> intervals, one table, go / no-go.

Every arm is scored on the same held-out images, so each (arm, seed, probe) is a vector of 0/1
correctness over those images. An interval is a percentile bootstrap: each replicate draws the
held-out images with replacement (and, with several seeds, the seeds too), the same draw for every
arm, and an arm's accuracy is its mean correctness over the drawn seeds and images. A difference
between two arms is taken within each replicate, so it is paired: what the images share cancels.
With one seed the interval covers which images were held out, not how another pretraining seed
would have come out; docs/results.md says what that leaves open.

The reading (fixed before any run):
  validity      MAE minus random init on the linear probe must reach VALIDITY_BAR points with its whole
                95% interval (stricter than the synthetic study's mean: one seed has only the images'
                interval), or the study says "cannot decide": pretraining at this budget has not taught
                MAE enough for differences between arms to say anything about pretraining
  go            C2FMAE minus MAE on the primary probe (fine-tune) has its 95% interval above 0
  no-go         ...below 0 (C2FMAE is worse), or "no-go (open)" when it straddles 0: no evidence of a
                gain at this budget
Beside it, two readings of what the gain (or its absence) comes from: the cascade against the parallel
decoder, and label inputs against labels as targets only.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from pretraining.study.tables import VALIDITY_BAR

PROBES = ("linear", "knn", "finetune")
PROBE_NAMES = {"linear": "linear probe", "knn": "k-NN", "finetune": "fine-tune"}
ARMS = ("random_init", "mae", "c2fmae", "c2fmae_parallel", "c2fmae_targets_only")
# (name, better, worse): the paired differences the table reports
DIFFERENCES = (("C2FMAE - MAE", "c2fmae", "mae"),
               ("cascade - parallel", "c2fmae", "c2fmae_parallel"),
               ("label inputs - targets only", "c2fmae", "c2fmae_targets_only"),
               ("targets only - MAE", "c2fmae_targets_only", "mae"),
               ("MAE - random init", "mae", "random_init"))
# Scores: {arm: {probe: (seeds, examples) bool array}}
Scores = Mapping[str, Mapping[str, np.ndarray]]


def draws(examples: int, seeds: int, replicates: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """The bootstrap's draws: example indices (R, examples) and seed indices (R, seeds), with replacement
    (the seeds drawn only when there are several)."""
    rng = np.random.default_rng(seed)
    examples_drawn = rng.integers(0, examples, size=(replicates, examples))
    seeds_drawn = rng.integers(0, seeds, size=(replicates, seeds)) if seeds > 1 else np.zeros((replicates, 1), int)
    return examples_drawn, seeds_drawn


def replicate_accuracy(correct: np.ndarray, examples_drawn: np.ndarray, seeds_drawn: np.ndarray) -> np.ndarray:
    """(seeds, examples) correctness -> (R,) accuracy in percent of each replicate."""
    per_seed = correct.astype(np.float64)[:, examples_drawn].mean(axis=2)  # (seeds, R)
    return 100.0 * np.take_along_axis(per_seed.T, seeds_drawn, axis=1).mean(axis=1)


def interval(point: float, replicates: np.ndarray) -> tuple[float, float, float]:
    """(point, low, high): the point estimate and the 95% percentile interval of its replicates."""
    low, high = np.percentile(replicates, [2.5, 97.5])
    return point, float(low), float(high)


class Study:
    """The bootstrap of one set of scores: accuracies and paired differences with intervals."""

    def __init__(self, scores: Scores, replicates: int = 2000, seed: int = 0):
        self.scores = scores
        shapes = {v.shape for probes in scores.values() for v in probes.values()}
        examples = {s[1] for s in shapes}
        if len(examples) != 1:
            raise ValueError(f"every arm must be scored on the same held-out images; got counts {sorted(examples)}")
        self.seeds = max(s[0] for s in shapes)
        self.examples_drawn, self.seeds_drawn = draws(examples.pop(), self.seeds, replicates, seed)

    def _replicates(self, arm: str, probe: str) -> np.ndarray:
        correct = self.scores[arm][probe]
        return replicate_accuracy(correct, self.examples_drawn, self.seeds_drawn % len(correct))

    def has(self, arm: str, probe: str) -> bool:
        return probe in self.scores.get(arm, {})

    def accuracy(self, arm: str, probe: str) -> tuple[float, float, float]:
        return interval(100.0 * float(self.scores[arm][probe].mean()), self._replicates(arm, probe))

    def difference(self, better: str, worse: str, probe: str) -> tuple[float, float, float]:
        """`better` minus `worse` on `probe`, in points, paired by image (and seed)."""
        point = 100.0 * float(self.scores[better][probe].mean() - self.scores[worse][probe].mean())
        return interval(point, self._replicates(better, probe) - self._replicates(worse, probe))


def _cell(value: tuple[float, float, float] | None) -> str:
    if value is None:
        return f"{'-':>21s}"
    point, low, high = value
    return f"{point:6.1f} [{low:5.1f}, {high:5.1f}]"


def side(value: tuple[float, float, float]) -> str:
    """"above" 0, "below" 0, or "open" (the 95% interval contains 0)."""
    _, low, high = value
    return "above" if low > 0 else "below" if high < 0 else "open"


def decide(study: Study, primary: str = "finetune") -> tuple[str, list[str]]:
    """(decision, the reading's lines): "cannot decide", "go", "no-go" or "no-go (open)"."""
    lines = []
    if not (study.has("mae", "linear") and study.has("random_init", "linear")):
        return "cannot decide", ["cannot decide: the validity figure needs MAE's and random init's linear probes"]
    validity = study.difference("mae", "random_init", "linear")
    lines.append(f"validity: MAE - random init on the linear probe = {_cell(validity).strip()} points (bar: the "
                 f"interval above {VALIDITY_BAR:.0f})")
    if not validity[1] >= VALIDITY_BAR:
        lines.append(f"cannot decide: MAE is not shown to beat no pretraining by {VALIDITY_BAR:.0f} points, so this "
                     "budget is too small for differences between arms to say anything about pretraining; "
                     "pretrain longer (--epochs) or on more images (--per-class), or score more held-out images")
        return "cannot decide", lines
    gain = study.difference("c2fmae", "mae", primary)
    where = side(gain)
    name = PROBE_NAMES[primary]
    decision = {"above": "go", "below": "no-go", "open": "no-go (open)"}[where]
    lines.append({
        "above": f"go: C2FMAE beats MAE on {name} by {_cell(gain).strip()} points (95% interval above 0): the "
                 "full-scale run is worth its GPU-hours",
        "below": f"no-go: C2FMAE is worse than MAE on {name} by {_cell(gain).strip()} points (95% interval below "
                 "0): do not spend the full-scale run on it",
        "open": f"no-go (open): C2FMAE minus MAE on {name} is {_cell(gain).strip()} points, an interval that "
                "contains 0: no evidence of a gain at this budget; a full-scale run would be a bet, not a test",
    }[where])
    for probe in PROBES:
        if probe != primary and study.has("c2fmae", probe) and study.has("mae", probe):
            other = study.difference("c2fmae", "mae", probe)
            if side(other) not in ("open", where):
                lines.append(f"  note: on {PROBE_NAMES[probe]} the difference lies {side(other)} 0 "
                             f"({_cell(other).strip()}): the probes disagree")
    if study.has("c2fmae_parallel", primary):
        cascade = study.difference("c2fmae", "c2fmae_parallel", primary)
        lines.append({"above": "cascade: beats the FLOP-matched parallel decoder; the cascade earns its place",
                      "below": "cascade: the FLOP-matched parallel decoder is better; the cascade costs accuracy",
                      "open": "cascade: no difference shown from the FLOP-matched parallel decoder, the simpler "
                              "choice"}[side(cascade)] + f" ({_cell(cascade).strip()})")
    if study.has("c2fmae_targets_only", primary):
        inputs = study.difference("c2fmae", "c2fmae_targets_only", primary)
        lines.append({"above": "label inputs: help beyond labels as targets",
                      "below": "label inputs: hurt; labels as targets only (the encoder reads RGB alone) is better",
                      "open": "label inputs: no difference shown from labels as targets only, the cheaper arm "
                              "(its encoder reads RGB alone)"}[side(inputs)]
                     + f" ({_cell(inputs).strip()})")
    return decision, lines


def table(study: Study) -> list[str]:
    """Accuracy per arm and probe, then the paired differences, each `point [95% interval]` in percent."""
    head = f"{'':28s}" + "".join(f"{PROBE_NAMES[p]:>23s}" for p in PROBES)
    lines = [head]
    for arm in (a for a in ARMS if a in study.scores):
        lines.append(f"{arm:28s}" + "".join("  " + _cell(study.accuracy(arm, p) if study.has(arm, p) else None)
                                            for p in PROBES))
    lines.append("paired differences (points)")
    for name, better, worse in DIFFERENCES:
        cells = [study.difference(better, worse, p) if study.has(better, p) and study.has(worse, p) else None
                 for p in PROBES]
        if any(cells):
            lines.append(f"  {name:26s}" + "".join("  " + _cell(c) for c in cells))
    return lines


def last_line(decision: str, study: Study, primary: str = "finetune") -> str:
    """`decision=... c2fmae_minus_mae=POINT[LOW,HIGH] validity=...`: one line for logs and scripts."""
    parts = [f"decision={decision.replace(' ', '_')}"]
    for name, better, worse, probe in (("c2fmae_minus_mae", "c2fmae", "mae", primary),
                                       ("cascade_minus_parallel", "c2fmae", "c2fmae_parallel", primary),
                                       ("inputs_minus_targets_only", "c2fmae", "c2fmae_targets_only", primary),
                                       ("validity", "mae", "random_init", "linear")):
        if study.has(better, probe) and study.has(worse, probe):
            point, low, high = study.difference(better, worse, probe)
            parts.append(f"{name}={point:.2f}[{low:.2f},{high:.2f}]")
    return " ".join(parts)

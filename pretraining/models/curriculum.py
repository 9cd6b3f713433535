"""The masking curriculum: how often each masking strategy is drawn as training goes on.

Two modes, one interface (`weights(progress)`, then `observe(...)` after each optimizer step):

- "scheduled" (the default): fixed linear ramps over training progress through three phases,
  by default semantic-guided -> instance-guided -> random (`curriculum_weights`).
- "adaptive": the trainer moves the weights towards the strategies whose loss is changing
  fastest (`AdaptiveCurriculum`, rule below), from the losses it already has on the device.

Weights are always (w_semantic, w_instance, w_random) in `STRATEGIES` order, whatever the phase
order. The strategy of each sample is chosen on the device from a uniform the loader drew
(`choose_strategy`), so the trainer can change the weights every step without touching the
loader's workers.

The adaptive rule (learning progress, as in Graves et al. 2017 and Matiisen et al. 2017's
teacher-student curricula). After every optimizer step, for each strategy s drawn in that step,
with m_s the mean total loss of its samples:
    fast_s <- b_f fast_s + (1 - b_f) m_s,   slow_s <- b_s slow_s + (1 - b_s) m_s   (bias-corrected)
    progress_s = |slow_s - fast_s| / slow_s       (the relative change of its loss lately)
    w = floor / 3 + (1 - floor) * progress / sum(progress)     (uniform while no strategy moved)
So a strategy whose loss is still falling (or rising again: forgetting) gets more samples, one
that has plateaued fewer, and every strategy keeps at least floor / 3 so its loss stays measured.
Until every strategy has been seen `warmup` times, the scheduled weights stand in for the
progress shares (with the same floor, so every strategy is drawn and measured from the start).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

STRATEGIES = ("semantic", "instance", "random")  # strategy ids 0, 1, 2 in batches and logs
MODES = ("scheduled", "adaptive")


@dataclass(frozen=True)
class CurriculumConfig:
    """Strategy weights over training progress in [0, 1].

    `phases` orders the three strategies; each boundary is the centre of a linear transition
    `transition` wide, so with the defaults w_semantic = 1 until 0.2 and 0 from 0.4; w_random = 0
    until 0.5 and 1 from 0.7. `phases=("random", "instance", "semantic")` reverses the order
    (easy -> hard when guided masking hides whole regions).
    """

    first_until: float = 0.3  # centre of the phase 1 -> phase 2 transition
    second_until: float = 0.6  # centre of the phase 2 -> phase 3 transition
    transition: float = 0.2  # width of each linear transition; 0 gives hard switches
    phases: tuple[str, ...] = STRATEGIES  # the order the strategies take over
    mode: str = "scheduled"  # scheduled | adaptive
    adaptive_floor: float = 0.1  # adaptive: share spread evenly over the strategies
    adaptive_fast: float = 0.9  # adaptive: per-step decay of the fast loss average (~10 steps)
    adaptive_slow: float = 0.99  # adaptive: per-step decay of the slow loss average (~100 steps)
    adaptive_warmup: int = 10  # adaptive: observations of every strategy before the rule takes over

    def __post_init__(self):
        object.__setattr__(self, "phases", tuple(self.phases))  # JSON gives lists
        if sorted(self.phases) != sorted(STRATEGIES):
            raise ValueError(f"CurriculumConfig.phases must order {STRATEGIES} (each once), got {self.phases}.")
        if self.mode not in MODES:
            raise ValueError(f"Unknown curriculum mode {self.mode!r}; use scheduled or adaptive.")
        half = self.transition / 2
        if not (half <= self.first_until and self.first_until + half <= self.second_until - half
                and self.second_until + half <= 1.0 + 1e-9):
            raise ValueError(
                "CurriculumConfig needs transition/2 <= first_until, first_until + transition <= "
                f"second_until and second_until + transition/2 <= 1, got {self}."
            )
        if not (0.0 <= self.adaptive_floor <= 1.0 and 0.0 < self.adaptive_fast < self.adaptive_slow < 1.0):
            raise ValueError("CurriculumConfig needs 0 <= adaptive_floor <= 1 and 0 < adaptive_fast < "
                             f"adaptive_slow < 1, got {self}.")


def _ramp(x: float, centre: float, width: float) -> float:
    """0 before the transition, 1 after it, linear across it."""
    if width <= 0:
        return float(x >= centre)
    return min(1.0, max(0.0, (x - centre + width / 2) / width))


def curriculum_weights(progress: float, cfg: CurriculumConfig) -> tuple[float, float, float]:
    """The scheduled (w_semantic, w_instance, w_random) at training progress in [0, 1]; they sum to 1.

    Monotone: the first phase's weight never rises and the last phase's never falls.
    """
    progress = min(1.0, max(0.0, float(progress)))
    first = 1.0 - _ramp(progress, cfg.first_until, cfg.transition)
    last = _ramp(progress, cfg.second_until, cfg.transition)
    by_phase = dict(zip(cfg.phases, (first, 1.0 - first - last, last)))
    return tuple(by_phase[s] for s in STRATEGIES)


def choose_strategy(key: torch.Tensor, weights: torch.Tensor | Sequence[float]) -> torch.Tensor:
    """Strategy of each sample from its uniform key: key (B,) in [0, 1), weights (3,) -> (B,) int64.

    Strategy s is chosen when key falls in its slice of [0, 1) (slices in `STRATEGIES` order, sized
    by the normalised weights), so a strategy of weight 0 is never chosen. Runs on the device.
    """
    w = torch.as_tensor(weights, dtype=torch.float64, device=key.device)
    edges = torch.cumsum(w / w.sum(), 0)[:-1]  # (2,) upper edges of the first two slices
    return (key.double()[:, None] >= edges[None, :]).sum(1)


class AdaptiveCurriculum:
    """The adaptive rule of the module doc, as device tensors (no host sync); `state_dict` for checkpoints."""

    def __init__(self, cfg: CurriculumConfig, device: torch.device):
        self.cfg = cfg
        S = len(STRATEGIES)
        self.fast = torch.zeros(S, dtype=torch.float64, device=device)
        self.slow = torch.zeros(S, dtype=torch.float64, device=device)
        self.seen = torch.zeros(S, dtype=torch.float64, device=device)  # updates of each strategy

    def weights(self, progress: float) -> torch.Tensor:
        """(3,) float64 on the device: the rule's weights (the schedule's, floored, until warmed up)."""
        cfg = self.cfg
        scheduled = torch.tensor(curriculum_weights(progress, cfg), dtype=torch.float64)
        if self.fast.is_cuda:  # a copy from pinned memory does not wait for the device's queue
            scheduled = scheduled.pin_memory().to(self.fast.device, non_blocking=True)
        fast = self.fast / (1 - cfg.adaptive_fast ** self.seen).clamp(min=1e-12)  # bias-corrected
        slow = self.slow / (1 - cfg.adaptive_slow ** self.seen).clamp(min=1e-12)
        progress_s = torch.where(self.seen > 0, (slow - fast).abs() / slow.abs().clamp(min=1e-12), 0.0)
        total = progress_s.sum()
        share = torch.where(total > 0, progress_s / total.clamp(min=1e-30), 1.0 / len(STRATEGIES))
        share = torch.where((self.seen >= cfg.adaptive_warmup).all(), share, scheduled)
        return cfg.adaptive_floor / len(STRATEGIES) + (1 - cfg.adaptive_floor) * share

    def update(self, loss_sum: torch.Tensor, count: torch.Tensor) -> None:
        """One optimizer step's per-strategy (sum of sample losses (3,), sample count (3,)), summed over
        micro-batches and ranks. Strategies with no sample this step keep their averages."""
        cfg = self.cfg
        present = count > 0
        mean = loss_sum.double() / count.double().clamp(min=1)
        self.fast = torch.where(present, cfg.adaptive_fast * self.fast + (1 - cfg.adaptive_fast) * mean, self.fast)
        self.slow = torch.where(present, cfg.adaptive_slow * self.slow + (1 - cfg.adaptive_slow) * mean, self.slow)
        self.seen = self.seen + present.double()

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"fast": self.fast.cpu(), "slow": self.slow.cpu(), "seen": self.seen.cpu()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        device = self.fast.device
        self.fast, self.slow, self.seen = (state[k].to(device, torch.float64) for k in ("fast", "slow", "seen"))


class Curriculum:
    """What the trainer holds: the weights for a step at `progress`, and (adaptive) what it observed."""

    def __init__(self, cfg: CurriculumConfig, device: torch.device):
        self.cfg = cfg
        self.adaptive = AdaptiveCurriculum(cfg, device) if cfg.mode == "adaptive" else None

    def weights(self, progress: float) -> tuple[float, float, float] | torch.Tensor:
        """Host floats (scheduled) or a (3,) device tensor (adaptive); `choose_strategy` takes both."""
        if self.adaptive is None:
            return curriculum_weights(progress, self.cfg)
        return self.adaptive.weights(progress)

    def update(self, loss_sum: torch.Tensor, count: torch.Tensor) -> None:
        if self.adaptive is not None:
            self.adaptive.update(loss_sum, count)

    def state_dict(self) -> dict:
        return self.adaptive.state_dict() if self.adaptive is not None else {}

    def load_state_dict(self, state: dict) -> None:
        if self.adaptive is not None and state:
            self.adaptive.load_state_dict(state)

"""What the masking did, measured where it happened: the realised strategy mix, how often a guided
request fell back to random, each loss term per strategy, and the curriculum's weights at every
optimizer step.

Everything is accumulated in device tensors after each micro-batch (no host sync) and read once per
`log_every` optimizer steps (`scalars`, one transfer). The per-step curriculum weights are kept
until then and written under their own steps, so TensorBoard shows every step's weights.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from pretraining.models.curriculum import STRATEGIES
from pretraining.models.masking import RANDOM


class StrategyLog:
    def __init__(self, modalities: Sequence[str], device: torch.device):
        self.modalities = tuple(modalities)
        S, M = len(STRATEGIES), len(self.modalities)
        zeros = lambda *shape: torch.zeros(*shape, dtype=torch.float64, device=device)  # noqa: E731
        self.used, self.requested, self.fallback = zeros(S), zeros(S), zeros(S)
        self.term_sums, self.loss_sums = zeros(S, M), zeros(S)
        self.step_loss, self.step_count = zeros(S), zeros(S)  # this optimizer step only (the adaptive curriculum)
        self.weights: list[tuple[int, torch.Tensor | Sequence[float]]] = []

    def add(self, strategy: torch.Tensor, requested: torch.Tensor, sample_terms: dict[str, torch.Tensor],
            sample_loss: torch.Tensor) -> None:
        """One micro-batch: strategy used and requested (B,), per-sample unweighted terms and weighted loss (B,)."""
        valid = (strategy >= 0).double()  # -1: a batch that came with visible tokens but no strategy
        used = strategy.clamp(min=0)
        self.used.index_add_(0, used, valid)
        self.requested.index_add_(0, requested.clamp(min=0), valid)
        fell_back = ((requested != RANDOM) & (strategy == RANDOM)).double() * valid
        self.fallback.index_add_(0, requested.clamp(min=0), fell_back)
        terms = torch.stack([sample_terms[m].double() for m in self.modalities], dim=1)  # (B, M)
        self.term_sums.index_add_(0, used, terms * valid[:, None])
        loss = sample_loss.double() * valid
        self.loss_sums.index_add_(0, used, loss)
        self.step_loss.index_add_(0, used, loss)
        self.step_count.index_add_(0, used, valid)

    def end_step(self) -> tuple[torch.Tensor, torch.Tensor]:
        """This optimizer step's per-strategy (sum of sample losses (S,), sample count (S,)); starts the next."""
        out = (self.step_loss, self.step_count)
        self.step_loss, self.step_count = torch.zeros_like(out[0]), torch.zeros_like(out[1])
        return out

    def record_weights(self, step: int, weights: torch.Tensor | Sequence[float]) -> None:
        self.weights.append((step, weights.detach() if isinstance(weights, torch.Tensor) else tuple(weights)))

    def scalars(self) -> tuple[dict[str, float], list[tuple[int, dict[str, float]]]]:
        """(window scalars, [(step, curriculum weights)]) since the last call, then reset. One host sync."""
        S = len(STRATEGIES)
        weights = [torch.as_tensor(w, dtype=torch.float64, device=self.used.device) for _, w in self.weights]
        packed = torch.cat([self.used, self.requested, self.fallback, self.loss_sums, self.term_sums.flatten(),
                            *weights]).tolist()
        used, requested, fallback, loss_sums = (packed[i * S:(i + 1) * S] for i in range(4))
        term_sums, flat_weights = packed[4 * S:4 * S + S * len(self.modalities)], packed[4 * S + S * len(self.modalities):]
        total = max(sum(used), 1.0)
        out = {}
        for s, name in enumerate(STRATEGIES):
            out[f"strategy/used_{name}"] = used[s] / total
            out[f"strategy/requested_{name}"] = requested[s] / total
            if name != "random":
                out[f"strategy/fallback_{name}"] = fallback[s] / max(requested[s], 1.0)
            if used[s]:
                out[f"loss_by_strategy/{name}/loss"] = loss_sums[s] / used[s]
                for m, modality in enumerate(self.modalities):
                    out[f"loss_by_strategy/{name}/{modality}"] = term_sums[s * len(self.modalities) + m] / used[s]
        steps = [(step, {f"curriculum/{name}": flat_weights[i * S + s] for s, name in enumerate(STRATEGIES)})
                 for i, (step, _) in enumerate(self.weights)]
        for t in (self.used, self.requested, self.fallback, self.loss_sums, self.term_sums):
            t.zero_()
        self.weights = []
        return out, steps

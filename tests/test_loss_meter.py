"""LossMeter: loss terms kept on the device, read in one transfer, the first non-finite micro-step named."""

from __future__ import annotations

import pytest
import torch

from pretraining.training.loss_meter import LossMeter, MicroStep, NonFiniteLoss


def test_reads_every_micro_step_and_the_last_optimizer_steps_mean():
    meter = LossMeter(["loss", "rgb"])
    for k, (opt, batch) in enumerate([(1, 0), (1, 1), (2, 2), (2, 3)]):  # 2 micro-steps per optimizer step
        meter.add(torch.tensor([1.0 + k, 10.0 * k]), MicroStep(opt, 0, batch, torch.tensor([2 * k, 2 * k + 1])))
    assert meter.check() and meter.check() == []  # read once
    meter.add(torch.tensor([5.0, 6.0]), MicroStep(3, 0, 4, None))
    meter.add(torch.tensor([7.0, 8.0]), MicroStep(3, 0, 5, None))
    steps = meter.check(lambda values: values / 2)  # the reduction (an all-reduce mean over ranks) is applied
    assert [s.values for s in steps] == [[2.5, 3.0], [3.5, 4.0]] and steps[0].index is None
    assert meter.last == {"loss": 3.0, "rgb": 3.5}  # mean of the last optimizer step's micro-steps


def test_sample_indices_come_back_per_micro_step():
    meter = LossMeter(["loss"])
    meter.add(torch.tensor([1.0]), MicroStep(1, 0, 0, torch.tensor([4, 5, 6])))
    meter.add(torch.tensor([2.0]), MicroStep(1, 0, 1, torch.tensor([7, 8, 9])))
    assert [s.index for s in meter.check()] == [[4, 5, 6], [7, 8, 9]]


def test_the_first_non_finite_micro_step_is_named_with_its_terms():
    meter = LossMeter(["loss", "semantic", "instance"])
    meter.add(torch.tensor([1.0, 0.5, 0.5]), MicroStep(7, 1, 20, None))
    meter.add(torch.tensor([float("nan"), 0.5, float("nan")]), MicroStep(8, 1, 21, None))
    meter.add(torch.tensor([float("inf"), float("inf"), 0.5]), MicroStep(9, 1, 22, None))
    with pytest.raises(NonFiniteLoss, match=r"optimizer step 8 \(epoch 1, batch 21\): loss=nan, semantic=0.5, "
                                            r"instance=nan"):
        meter.check()

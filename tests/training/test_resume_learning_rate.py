"""A resumed run trains at its config's learning rate: the saved schedule state must not bring the old base
rate back (a user lowering `learning_rate` after a divergence would silently keep the old one)."""

from __future__ import annotations

import logging

import pytest
import torch

from library.training.checkpoints.state import restore_payload, state_payload
from library.training.optimizers import build_optimizer, build_scheduler


def _run(lr: float, params):
    optimizer = build_optimizer([{"params": params, "lr": lr}], "AdamW", lr)
    return optimizer, build_scheduler(optimizer, "cosine", 10, warmup_steps=2)


def _trained_state(lr: float):
    params = [torch.nn.Parameter(torch.ones(3))]
    optimizer, scheduler = _run(lr, params)
    for _ in range(3):
        params[0].grad = torch.full_like(params[0], 0.5)
        optimizer.step()
        scheduler.step()
    return state_payload([], optimizer, scheduler, {}, sharded=False), optimizer


@pytest.mark.parametrize("new_lr", [1e-4, 1e-3])
def test_a_resumed_run_trains_at_the_configured_learning_rate(new_lr, caplog):
    payload, old = _trained_state(1e-3)
    optimizer, scheduler = _run(new_lr, [torch.nn.Parameter(torch.ones(3))])
    with caplog.at_level(logging.WARNING):
        restore_payload(payload, [], optimizer, scheduler, sharded=False)
    factor = scheduler.lr_lambdas[0](3)  # the schedule's position is the saved one
    assert scheduler.last_epoch == 3
    assert optimizer.param_groups[0]["lr"] == pytest.approx(new_lr * factor)
    assert scheduler.get_last_lr() == [pytest.approx(new_lr * factor)]
    assert torch.equal(optimizer.state_dict()["state"][0]["exp_avg"], old.state_dict()["state"][0]["exp_avg"])
    changed = "replaces 0.001 saved with the state" in caplog.text
    assert changed == (new_lr != 1e-3)

"""Synthetic loss traces: each failure mode raises its warning; a healthy run raises none."""

from __future__ import annotations

import math
import random

from library.training.monitor import LossMonitor


def run(trace, total=1000, val=None, tmp_path=None):
    mon = LossMonitor(total_steps=total, output_dir=tmp_path)
    for step, loss in enumerate(trace, start=1):
        mon.update(step, loss, items=[f"clip_{step:04d}"])
        if val and step in val:
            mon.update_validation(step, val[step])
    return {d.kind: d for d in mon.found}


def healthy(n=1000, seed=0):
    rng = random.Random(seed)
    return [0.08 + 0.12 * math.exp(-i / 250) + rng.gauss(0, 0.01) for i in range(n)]


def test_healthy_run_raises_nothing():
    val = {s: 0.1 + 0.1 * math.exp(-s / 300) for s in range(100, 1001, 100)}
    assert run(healthy(), val=val) == {}


def test_flat_loss_is_a_plateau_warning(tmp_path):
    rng = random.Random(1)
    found = run([0.15 + rng.gauss(0, 0.01) for _ in range(400)], tmp_path=tmp_path)
    assert set(found) == {"plateau"} and found["plateau"].step == 300
    assert "learning rate too low" in (tmp_path / "diagnosis.md").read_text()


def test_unrecovered_spike_names_the_batch():
    trace = healthy(400)[:200] + [2.5] + [0.6 + 0.01 * (i % 3) for i in range(199)]
    found = run(trace)
    assert "spike" in found and "clip_0201" in found["spike"].message and "step 201" in found["spike"].message


def test_recovered_spike_is_quiet():
    trace = healthy(400)
    trace[200] = 2.5
    assert "spike" not in run(trace)


def test_rising_validation_is_overfitting_with_best_step():
    val = {100: 0.20, 200: 0.15, 300: 0.14, 400: 0.17, 500: 0.19, 600: 0.22}
    found = run(healthy(600), val=val)
    assert "overfitting" in found and "step 300" in found["overfitting"].message


def test_tiny_training_loss():
    trace = [max(0.005, 0.2 * math.exp(-i / 30)) for i in range(300)]
    found = run(trace)
    assert "tiny_loss" in found

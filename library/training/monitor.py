"""The training guide's troubleshooting, live: watch the loss and say early when a run goes wrong.

Checks (each warns once, with the step and the advice; warnings go to the log and to `diagnosis.md`):
- plateau from the start: the smoothed loss has not fallen after the first part of training
  (learning rate too low, captions empty or malformed, dataset too small);
- unrecovered spike: a loss far above the recent trend, after which the trend stays high (learning rate
  too high or a bad sample: the spiking batch's items are named);
- overfitting: validation loss rising from its best while training loss falls, or training loss far
  below validation loss (use the checkpoint nearest the best validation step, lower rank or epochs);
- a training loss under 0.01 (memorising).
"""

from __future__ import annotations

import logging
import math
import os
import statistics
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

logger = logging.getLogger(__name__)


@dataclass
class MonitorSettings:
    ema: float = 0.95
    warmup_fraction: float = 0.3  # the "first part of training" after which the loss must have fallen
    min_steps: int = 50  # no verdicts before this many steps
    plateau_drop: float = 0.05  # required relative drop of the smoothed loss
    spike_factor: float = 3.0  # a loss this many times the recent median is a spike
    trend_window: int = 50
    recovery_steps: int = 30  # steps a spike gets to recover
    recovery_factor: float = 1.5  # still this much above the pre-spike trend: not recovered
    overfit_rise: float = 0.10  # validation this much above its best, twice in a row
    overfit_gap: float = 0.5  # training loss below this fraction of validation loss
    tiny_loss: float = 0.01


@dataclass
class Diagnosis:
    step: int
    kind: str
    message: str


@dataclass
class LossMonitor:
    total_steps: int
    output_dir: Path | None = None
    settings: MonitorSettings = field(default_factory=MonitorSettings)

    def __post_init__(self):
        s = self.settings
        self.recent: deque[float] = deque(maxlen=s.trend_window)
        self.ema: float | None = None
        self.first: list[float] = []  # the first losses: the reference a plateau is measured against
        self.spike: tuple[int, float, list[str]] | None = None  # (step, pre-spike trend, items)
        self.val: list[tuple[int, float]] = []
        self.found: list[Diagnosis] = []
        self._kinds: set[str] = set()

    # ---- inputs ---------------------------------------------------------------------------------------

    def update(self, step: int, loss: float, items: list[str] | None = None) -> list[Diagnosis]:
        """Feed one training loss; returns any new diagnoses."""
        s, new = self.settings, []
        if not math.isfinite(loss):
            return new
        self.ema = loss if self.ema is None else s.ema * self.ema + (1 - s.ema) * loss
        if len(self.first) < 20:
            self.first.append(loss)
        trend = statistics.median(self.recent) if len(self.recent) >= 10 else None
        if trend is not None and loss > s.spike_factor * trend and self.spike is None:
            self.spike = (step, trend, list(items or []))
        else:
            self.recent.append(loss)
        new += self._check_spike(step)
        new += self._check_plateau(step)
        if loss < s.tiny_loss and step >= s.min_steps:
            new += self._warn(step, "tiny_loss", (
                f"training loss {loss:.4g} is below {s.tiny_loss}: the LoRA is probably memorising its data. "
                "Compare earlier checkpoints, and lower the rank or the epochs, or add data"))
        return new

    def update_validation(self, step: int, val_loss: float) -> list[Diagnosis]:
        """Feed one validation loss (fixed seeds and timesteps, so values are comparable)."""
        s, new = self.settings, []
        if not math.isfinite(val_loss):
            return new
        self.val.append((step, val_loss))
        best_step, best = min(self.val, key=lambda v: v[1])
        last_two = self.val[-2:]
        if len(self.val) >= 3 and all(v > best * (1 + s.overfit_rise) and st > best_step for st, v in last_two):
            new += self._warn(step, "overfitting", (
                f"validation loss {val_loss:.4g} has risen from its best {best:.4g} at step {best_step}: "
                f"overfitting. Use the checkpoint nearest step {best_step}; lower the rank or the epochs, add "
                "data or dropout"))
        if self.ema is not None and step >= s.min_steps and self.ema < s.overfit_gap * val_loss:
            new += self._warn(step, "train_val_gap", (
                f"training loss {self.ema:.4g} is far below validation loss {val_loss:.4g}: the LoRA fits its "
                "training items much better than held-out ones. Prefer an earlier checkpoint, lower the rank"))
        return new

    # ---- checks ---------------------------------------------------------------------------------------

    def _check_spike(self, step: int) -> list[Diagnosis]:
        s = self.settings
        if self.spike is None or step - self.spike[0] < s.recovery_steps:
            return []
        spike_step, before, items = self.spike
        self.spike = None
        if self.recent and statistics.median(list(self.recent)[-s.recovery_steps:]) > s.recovery_factor * before:
            named = f" The spike came from the batch {', '.join(items)}: check those items." if items else ""
            return self._warn(step, "spike", (
                f"the loss spiked at step {spike_step} and has not come back to its earlier level "
                f"({before:.4g}): learning rate too high or exploding gradients. Halve the learning rate, keep "
                f"max_grad_norm at 1.0, lower the batch size.{named}"))
        return []

    def _check_plateau(self, step: int) -> list[Diagnosis]:
        s = self.settings
        checkpoint = max(s.min_steps, int(s.warmup_fraction * self.total_steps))
        if step != checkpoint or not self.first or not self.recent:
            return []
        start, now = statistics.fmean(self.first), statistics.median(self.recent)
        if now > start * (1 - s.plateau_drop):
            return self._warn(step, "plateau", (
                f"the loss has not fallen in the first {step} steps ({start:.4g} -> {now:.4g}): "
                "learning rate too low (try 1e-4 to 2e-4), empty or malformed captions, or "
                "too few samples (a LoRA needs 100-150 or more)"))
        return []

    def _warn(self, step: int, kind: str, message: str) -> list[Diagnosis]:
        if kind in self._kinds:
            return []
        self._kinds.add(kind)
        found = Diagnosis(step, kind, message)
        self.found.append(found)
        logger.warning("step %d: %s", step, message)
        self._write()
        return [found]

    def _write(self) -> None:
        if self.output_dir is None:
            return
        lines = ["# Training diagnosis", "", "Warnings raised while training, with the step and the advice.", ""]
        lines += [f"- **step {d.step}, {d.kind}**: {d.message}" for d in self.found]
        path = Path(self.output_dir) / "diagnosis.md"
        tmp = path.with_name("diagnosis.md.tmp")
        tmp.write_text("\n".join(lines) + "\n")
        os.replace(tmp, path)

"""What the loop hands to the run's report: the timesteps and expert of each step, the step times, and the
report itself (run_summary.json, the plots, report.html) written at the start, at every save and at the
end. Writing the report never fails the run: a failure is logged and training goes on."""

from __future__ import annotations

import logging
import math
import time
from collections import deque

logger = logging.getLogger(__name__)

STATUS = {"start": "running", "step": "running", "epoch": "running", "final": "finished",
          "interrupt": "interrupted (Ctrl-C): resume = 'latest' continues it",
          "stopped": "stopped after non-finite losses"}


class RunReporter:
    """Main process only. `trainer` is read by attribute (nothing here imports the loop)."""

    def __init__(self, trainer):
        self.trainer = trainer
        self.step_durations: deque[float] = deque(maxlen=200)
        self.timesteps: list[float] = []  # timesteps (0-1000) of the samples trained since the last step
        self._last = time.perf_counter()
        self.warned = False

    def step_done(self) -> tuple[float, ...]:
        """Called once per optimizer step: times it and returns (and forgets) its timesteps."""
        now = time.perf_counter()
        self.step_durations.append(now - self._last)
        self._last = now
        taken, self.timesteps = tuple(self.timesteps), []
        return taken

    def write(self, kind: str) -> None:
        from .report import write_report
        from .report.summary import build_summary, write_summary

        trainer = self.trainer
        try:
            summary = build_summary(trainer, STATUS.get(kind, kind))
            summary["steps"]["seconds_per_step"] = _median(self.step_durations)
            write_summary(trainer.run_info.output_dir, summary)
            write_report(trainer.run_info.output_dir, trainer.run_info.output_name)
        except Exception as exc:  # noqa: BLE001 - the report is a view of the run, never a reason to stop it
            if not self.warned:
                logger.warning("report.html could not be written (%s: %s); training goes on", type(exc).__name__, exc)
                self.warned = True


def start_of_run_advice(trainer) -> tuple[list[str], list[str]]:
    """The start-of-run report (advice.py: the dataset and settings against the guide's tables), logged;
    returns (lines, warnings) for report.html."""
    from .advice import RunFacts, log_report, report

    images, clips = trainer.data.sample_counts()
    cfg, total = trainer.cfg, trainer.opt.total_steps
    epochs = cfg.loop.max_train_epochs or math.ceil(
        total * cfg.loop.gradient_accumulation_steps / trainer.data.batches_per_epoch)
    facts = RunFacts(images, clips, trainer.experts[0].network_dim, epochs, total, cfg.optimizer.learning_rate,
                     cfg.run.preset)
    return report(facts)[0], log_report(facts)


def _median(values) -> float | None:
    import statistics

    finite = [v for v in values if math.isfinite(v)]
    return statistics.median(finite) if finite else None

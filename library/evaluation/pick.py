"""Which saved checkpoint to test first: every save of a run beside the losses of its step.

The guide: "the best one is often at 60-80% of training, not the last"; test a checkpoint by generating
with it and comparing with earlier ones. With a validation set (`validate_every_n_steps`) the run's own
validation loss ranks the saves: the lowest is recommended, its drop from the validation loss before the
first step (the baseline) is shown, and a validation loss that rose well after its minimum while the
training loss kept falling is reported as overfitting. Without one, the saves at 60-80% of the run are the
candidates. Either way the next step is a visual comparison (`tools/compare_checkpoints.py`), which the
report prints. The ranking itself lives in `library.training.report.ranking` (the run's report.html uses
it at every save); this module formats it for the command line.
"""

from __future__ import annotations

from library.training.report.ranking import (  # noqa: F401 - the ranking API, named here too
    OVERFIT_RISE, Report, SavedCheckpoint, rank_checkpoints, read_losses,
)


def format_report(report: Report, command_hint: bool = True) -> str:
    head = ("checkpoint", "step", "% of run", "train loss (avg)", "val loss", "drop from baseline", "")
    rows = [head]
    for r in report.checkpoints:
        mark = "<- test first" if report.recommended and r.label == report.recommended[0] else (
            "<- also" if r.label in report.recommended else "")
        rows.append((r.label, "" if r.step is None else str(r.step),
                     "" if r.share is None else f"{100 * r.share:.0f}%",
                     "" if r.train_loss is None else f"{r.train_loss:.4f}",
                     "" if r.val_loss is None else f"{r.val_loss:.4f}",
                     "" if r.val_drop is None else f"{100 * r.val_drop:.1f}%", mark))
    widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
    lines += [f"- {reason}" for reason in report.reasons]
    if command_hint:
        lines.append(f"next: python tools/compare_checkpoints.py {report.run_dir} --task ... --dit ... "
                     "--from_file prompts.txt --include_base  (render them side by side)")
    return "\n".join(lines)

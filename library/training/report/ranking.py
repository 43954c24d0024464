"""Which saved checkpoint to test first: every save of a run beside the losses of its step (the ranking
`tools/pick_checkpoint.py` prints and report.html shows; here, at the training layer, so the run can
write its report at every save).

The guide: "the best one is often at 60-80% of training, not the last"; test a checkpoint by generating
with it and comparing with earlier ones. With a validation set (`validate_every_n_steps`) the run's own
validation loss ranks the saves: the lowest is recommended, and a validation loss that rose well after its
minimum while the training loss kept falling is reported as overfitting. Without one, the saves at 60-80%
of the run are the candidates. Either way the next step is a visual comparison
(`tools/compare_checkpoints.py`), which the report prints.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

from ..checkpoints import find_checkpoints
from ..logs import read_loss_csv

OVERFIT_RISE = 0.05  # a validation loss this much above its minimum, later in the run, reads as overfitting


@dataclass
class SavedCheckpoint:
    label: str
    step: int | None
    files: list[str]
    train_loss: float | None = None  # the run's moving average at that step
    val_loss: float | None = None  # the last validation loss at or before that step
    val_drop: float | None = None  # (baseline - val_loss) / baseline: the drop from the untrained model
    share: float | None = None  # step / last step of the run


@dataclass
class Report:
    run_dir: str
    checkpoints: list[SavedCheckpoint]
    recommended: list[str] = field(default_factory=list)  # labels, best first
    reasons: list[str] = field(default_factory=list)
    baseline: float | None = None  # validation loss before the first step (the untrained model)


def read_losses(path: Path) -> tuple[dict[int, float], dict[int, float]]:
    """({step: moving-average train loss}, {step: validation loss}) from a run's loss.csv; rows that cannot
    be read (a run killed while writing its last row) and non-finite losses (skipped steps) are left out."""
    train, val = {}, {}
    for row in read_loss_csv(path)[0]:
        if row["kind"] == "val" and math.isfinite(row["loss"]):
            val[row["step"]] = row["loss"]
        elif row["kind"] == "train" and math.isfinite(row["avg_loss"]):
            train[row["step"]] = row["avg_loss"]
    return train, val


def _at_or_before(series: dict[int, float], step: int) -> float | None:
    earlier = [s for s in series if s <= step]
    return series[max(earlier)] if earlier else None


def rank_checkpoints(run_dir: str | Path, output_name: str | None = None) -> Report:
    run_dir = Path(run_dir)
    found = find_checkpoints(run_dir, output_name)
    if not found:
        raise FileNotFoundError(f"{run_dir}: no checkpoints (NAME.safetensors, NAME-step00000500.safetensors, "
                                "NAME-000003.safetensors, per expert with _high_noise / _low_noise)")
    csv_path = run_dir / "loss.csv"
    train, val = read_losses(csv_path) if csv_path.is_file() else ({}, {})
    last = max([*train, *(c.step or 0 for c in found)], default=0)
    rows = []
    for c in found:
        row = SavedCheckpoint(c.label, c.step, [Path(p).name for p in c.files])
        if c.step is not None:
            row.train_loss, row.val_loss = _at_or_before(train, c.step), _at_or_before(val, c.step)
            row.share = c.step / last if last else None
        rows.append(row)
    report = Report(str(run_dir), rows, baseline=val.get(0))
    if report.baseline:
        for row in rows:
            if row.val_loss is not None:
                row.val_drop = (report.baseline - row.val_loss) / report.baseline
    if not train:
        report.reasons.append(f"{csv_path} is missing: no losses to rank by")
    scored = [r for r in rows if r.val_loss is not None]
    if scored:
        best = min(scored, key=lambda r: (r.val_loss, -(r.step or 0)))
        report.recommended = [best.label] + [r.label for r in sorted(scored, key=lambda r: r.val_loss)
                                             if r is not best][:2]
        report.reasons.append(f"lowest validation loss: {best.label} ({best.val_loss:.4f})")
        if best.val_drop is not None:
            report.reasons.append(f"validation loss before training: {report.baseline:.4f}; {best.label} is "
                                  f"{100 * best.val_drop:.1f}% " + ("lower" if best.val_drop >= 0 else
                                  "HIGHER: the training has not improved on the untrained model"))
        low_step, low = min(val.items(), key=lambda kv: kv[1])
        later = {s: v for s, v in val.items() if s > low_step}
        if later and max(later.values()) > low * (1 + OVERFIT_RISE):
            rise = max(later.values()) / low - 1
            falling = _at_or_before(train, max(later)) is not None and _at_or_before(train, low_step) is not None \
                and _at_or_before(train, max(later)) < _at_or_before(train, low_step)
            report.reasons.append(
                f"validation loss rose {100 * rise:.0f}% after step {low_step}"
                + (" while the training loss kept falling: later saves overfit (guide: fewer epochs, lower rank, "
                   "more data)" if falling else ""))
    else:
        window = [r for r in rows if r.share is not None and 0.6 <= r.share <= 0.8]
        report.recommended = [r.label for r in window] or [r.label for r in rows[-2:]]
        report.reasons.append("no validation loss in this run (add [[validation_datasets]] and "
                              "validate_every_n_steps to rank saves by it); the guide's rule: the best save is "
                              "often at 60-80% of training")
        if not window:
            report.reasons.append("no save falls at 60-80% of this run: the last saves are listed; save more often "
                                  "(save_every_n_steps, the guide says every 500-1000 steps)")
    return report

"""sweep.html: the variants of a sweep judged together, in the style of report.html. The loss and validation
curves overlaid (sweep_loss.png), the same prompts' samples side by side per variant and step, and the
variants ranked by their best validation loss with `pick_checkpoint`'s overfitting check (without a
validation set: by the final training loss, with a note that samples must decide)."""

from __future__ import annotations

import io
import logging
import math
from dataclasses import dataclass
from pathlib import Path

from library.training.files import atomic_write_bytes
from library.training.logs import read_loss_csv
from library.training.report.html import esc, fmt, media, page, rel, table, write_page
from library.training.report.page import REPORT_FILE, training_samples
from library.training.report.plots import COLORS, INSTALL_HINT, matplotlib_available
from library.training.report.ranking import rank_checkpoints
from library.training.report.summary import read_summary

from .sweep import SweepPlan, variant_status

logger = logging.getLogger(__name__)
SWEEP_PAGE, SWEEP_PLOT = "sweep.html", "sweep_loss.png"


@dataclass
class VariantResult:
    name: str
    overrides: dict
    status: str
    folder: Path
    rows: list[dict]
    best_val: tuple[int, float] | None = None  # (step, loss)
    baseline: float | None = None
    final_train: float | None = None
    recommended: str = ""
    notes: tuple[str, ...] = ()
    steps: str = ""


def collect(plan: SweepPlan) -> list[VariantResult]:
    results = []
    for v in plan.variants:
        folder = plan.folder(v)
        csv_path = folder / "loss.csv"
        rows = read_loss_csv(csv_path)[0] if csv_path.is_file() else []
        r = VariantResult(v.name, v.overrides, variant_status(plan, v), folder, rows)
        val = [(x["step"], x["loss"]) for x in rows if x["kind"] == "val" and math.isfinite(x["loss"])]
        if val:
            r.best_val = min(val, key=lambda sv: (sv[1], -sv[0]))
            r.baseline = val[0][1] if val[0][0] == 0 else None
        train = [x["avg_loss"] for x in rows if x["kind"] == "train" and math.isfinite(x["avg_loss"])]
        r.final_train = train[-1] if train else None
        steps = read_summary(folder).get("steps", {})
        r.steps = f"{steps.get('done')} / {steps.get('total')}" if steps else ""
        try:
            ranking = rank_checkpoints(folder, plan.output_name)
            r.recommended = ranking.recommended[0] if ranking.recommended else ""
            r.notes = tuple(x for x in ranking.reasons if "rose" in x or "HIGHER" in x)
        except FileNotFoundError:
            pass
        results.append(r)
    return results


def ranked(results: list[VariantResult]) -> tuple[list[VariantResult], str]:
    """The variants best first, and what they were ranked by."""
    if any(r.best_val for r in results):
        return sorted(results, key=lambda r: r.best_val[1] if r.best_val else math.inf), "best validation loss"
    return sorted(results, key=lambda r: r.final_train if r.final_train is not None else math.inf), \
        "final training loss (no validation set: add [[validation_datasets]] and validate_every_n_steps)"


def draw_overlay(results: list[VariantResult], path: Path) -> bool:
    """Every variant's moving-average training loss (line) and validation loss (dashed, markers)."""
    if not matplotlib_available() or not any(r.rows for r in results):
        return False
    from matplotlib.figure import Figure

    fig = Figure(figsize=(9.0, 4.2), dpi=100, layout="constrained")
    ax = fig.add_subplot()
    ax.xaxis.get_major_locator().set_params(integer=True)
    for color, r in zip(COLORS * 4, results):
        train = [x for x in r.rows if x["kind"] == "train" and math.isfinite(x["avg_loss"])]
        val = [x for x in r.rows if x["kind"] == "val" and math.isfinite(x["loss"])]
        if train:
            ax.plot([x["step"] for x in train], [x["avg_loss"] for x in train], color=color, lw=1.8,
                    marker="." if len(train) < 3 else None, label=f"{r.name} (train, avg)")
        if val:
            ax.plot([x["step"] for x in val], [x["loss"] for x in val], color=color, ls="--", marker="o", ms=4,
                    label=f"{r.name} (validation)")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    atomic_write_bytes(path, buffer.getvalue())
    return True


def _ranking_html(results: list[VariantResult], root: Path) -> str:
    order, by = ranked(results)
    rows, classes = [], []
    for i, r in enumerate(order):
        drop = "" if not (r.best_val and r.baseline) else f"{100 * (r.baseline - r.best_val[1]) / r.baseline:.1f}%"
        report = r.folder / REPORT_FILE
        link = f"<a href='{rel(report, root)}'>{esc(r.name)}</a>" if report.is_file() else esc(r.name)
        rows.append([str(i + 1), link, esc(", ".join(f"{k} = {v}" for k, v in r.overrides.items())), esc(r.status),
                     esc(r.steps), esc(fmt(r.baseline)),
                     "" if not r.best_val else f"{r.best_val[1]:.4g} (step {r.best_val[0]})", drop,
                     esc(fmt(r.final_train)), esc(r.recommended),
                     "<br>".join(f"<span class=warn>{esc(n)}</span>" for n in r.notes)])
        classes.append("best" if i == 0 and (r.best_val or r.final_train is not None) else "")
    head = ["#", "variant", "settings", "status", "steps", "val loss before training", "best val loss",
            "drop from baseline", "final train loss (avg)", "save to test first", "overfitting check"]
    return (f"<p>ranked by {esc(by)}; the overfitting check is tools/pick_checkpoint.py's (validation loss rising "
            "after its minimum while the training loss falls)</p><div class=scroll>"
            + table(head, rows, numeric={5, 6, 7, 8}, row_classes=classes, raw=True) + "</div>")


def _samples_html(results: list[VariantResult], root: Path) -> str:
    per_variant = {r.name: training_samples(r.folder) for r in results}
    prompts = sorted({i for s in per_variant.values() for i in s})
    if not prompts:
        return "<p class=muted>no samples rendered during training (sample_prompts, sample_every_n_steps)</p>"
    parts = []
    for index in prompts:
        text = next(s[index]["prompt"] for s in per_variant.values() if index in s)
        steps = sorted({st for s in per_variant.values() if index in s for st in s[index]["steps"]})
        rows = []
        for step in steps:
            cells = []
            for r in results:
                entry = per_variant[r.name].get(index, {}).get("steps", {}).get(step)
                if entry and (entry[0] or entry[1]):
                    video, sheet, still = entry
                    cells.append(media(sheet if (still or not video) and sheet else video, root))
                else:
                    cells.append("<span class=muted>-</span>")
            rows.append([f"step {step}", *cells])
        parts.append(f"<h3>prompt {index + 1}: {esc(text)}</h3><div class='scroll grid'>"
                     + table(["", *[r.name for r in results]], rows, raw=True) + "</div>")
    return "\n".join(parts)


def write_sweep_page(plan: SweepPlan) -> Path:
    """Write ROOT/sweep.html (and ROOT/sweep_loss.png); returns the page's path."""
    root = plan.root
    results = collect(plan)
    plot = root / SWEEP_PLOT
    try:
        drawn = draw_overlay(results, plot)
    except Exception as exc:  # noqa: BLE001 - a plot must never stop the sweep
        logger.warning("%s could not be drawn (%s)", plot.name, exc)
        drawn = False
    curves = (f"<img src='{rel(plot, root)}' alt='loss curves of every variant' style='max-width:100%'>" if drawn
              else f"<p class=muted>no curves: {'no loss yet' if matplotlib_available() else esc(INSTALL_HINT)}</p>")
    base = " ".join(plan.base_args)
    sections = [("ranking", "Variants ranked", _ranking_html(results, root)),
                ("curves", "Loss curves", curves),
                ("samples", "Samples side by side", _samples_html(results, root)),
                ("plan", "Plan", f"<p>every variant: <code>{esc(base)}</code> plus its settings, in its own folder "
                                 f"under {esc(root)}</p>")]
    done = sum(r.status == "finished" for r in results)
    return write_page(root / SWEEP_PAGE, page(f"sweep: {len(results)} variants", f"{root.absolute()} · {done} of "
                                              f"{len(results)} finished", sections))

"""Training logs a user can read without tools: `loss.csv` and the plots in the output folder, refreshed
as training goes, plus TensorBoard / wandb through accelerate's trackers when asked for.

loss.csv has one row per optimizer step (and per validation): step, epoch, loss, moving average, learning
rate, kind (train / val), the gradient norm before clipping (empty when it was not measured), the expert
that step trained and the timesteps (0-1000) of its samples. The plots are drawn by `report.plots`
(matplotlib when installed, else one OpenCV loss.png).
"""

from __future__ import annotations

import csv
import io
import logging
import math
import os
import shutil
import time
from pathlib import Path

from .files import append_bytes, atomic_write_bytes

logger = logging.getLogger(__name__)

CSV_FIELDS = ("step", "epoch", "loss", "avg_loss", "lr", "kind", "grad_norm", "expert", "timesteps")
_KINDS = ("train", "val")


def _whole(text: str) -> int:
    """A step or epoch: an integer ("12"; "12.0" as older versions wrote them on resume)."""
    value = float(text)
    if not value.is_integer():
        raise ValueError(f"{text!r} is not a whole number")
    return int(value)


def _parse_row(row: dict) -> dict:
    """One row; every column of the header must be there (a half-written row is missing some)."""
    if None in row or None in row.values():
        raise ValueError("wrong number of fields")
    loss = float(row["loss"])
    kind = row.get("kind", "train")
    if kind not in _KINDS:
        raise ValueError(f"unknown kind {kind!r}")
    avg, lr, norm = row.get("avg_loss", ""), row.get("lr", ""), row.get("grad_norm", "")
    timesteps = tuple(float(t) for t in (row.get("timesteps") or "").split())
    return {"step": _whole(row["step"]), "epoch": _whole(row.get("epoch") or "0"), "loss": loss,
            "avg_loss": float(avg) if avg else loss, "lr": float(lr) if lr else math.nan, "kind": kind,
            "grad_norm": float(norm) if norm else math.nan, "expert": row.get("expert") or "",
            "timesteps": timesteps}


def read_loss_csv(path: str | os.PathLike) -> tuple[list[dict], list[int]]:
    """The rows of a loss.csv (steps and epochs as ints, losses as floats), and the line numbers of rows
    that could not be read, which are left out with one warning: a run killed while appending leaves a
    half-written last row, and a file edited by hand may hold anything."""
    path = Path(path)
    with open(path, newline="", encoding="utf-8", errors="replace") as f:
        reader = csv.DictReader(f)
        if not reader.fieldnames or not {"step", "loss"} <= set(reader.fieldnames):
            logger.warning("%s has no step and loss columns (header %s): its rows are not used", path,
                           reader.fieldnames)
            return [], [1]
        rows, bad = [], []
        for row in reader:
            try:
                rows.append(_parse_row(row))
            except (ValueError, TypeError):
                bad.append(reader.line_num)
    if bad:
        last = " (the last one: the run was probably stopped while writing it)" if len(bad) == 1 and not \
            _has_rows_after(path, bad[0]) else ""
        logger.warning("%s: left out %d unreadable row(s) at line(s) %s%s", path, len(bad),
                       ", ".join(map(str, bad[:10])), last)
    return rows, bad


def _has_rows_after(path: Path, line: int) -> bool:
    with open(path, encoding="utf-8", errors="replace") as f:
        return sum(1 for _ in f) > line


def _csv_bytes(rows: list[dict], header: bool = False) -> bytes:
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=CSV_FIELDS, lineterminator="\n")
    if header:
        writer.writeheader()
    writer.writerows({**r, "step": int(r["step"]), "epoch": int(r["epoch"]),
                      "grad_norm": "" if not math.isfinite(r.get("grad_norm", math.nan)) else r["grad_norm"],
                      "timesteps": " ".join(f"{t:.1f}" for t in r.get("timesteps", ()))} for r in rows)
    return out.getvalue().encode("utf-8")


class LossLog:
    """One CSV row per optimizer step (and per validation run); rows are appended and the plots redrawn
    at most every `plot_seconds` (also after a validation), and on `plot()` (the end of the run). A
    non-finite loss (a skipped step) gets its row but never enters the moving average or the plot."""

    def __init__(self, folder: str | os.PathLike, ema: float = 0.98, plot_seconds: float = 30.0, resume_step: int = 0):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.csv_path = self.folder / "loss.csv"
        self.png_path = self.folder / "loss.png"
        self.ema, self.plot_seconds, self._plotted, self._drawn_rows = ema, plot_seconds, time.monotonic(), -1
        self.experts: dict[str, tuple[float, float]] = {}  # timestep range per expert, for the per-expert plot
        self._pending: list[dict] = []  # rows not yet appended to loss.csv
        self.rows: list[dict] = self._read_existing(resume_step)
        averages = [r["avg_loss"] for r in self.rows if r["kind"] == "train" and math.isfinite(r["avg_loss"])]
        self._avg = averages[-1] if averages else None
        atomic_write_bytes(self.csv_path, _csv_bytes(self.rows, header=True))

    def _read_existing(self, resume_step: int) -> list[dict]:
        """On resume keep the rows up to the resumed step, so the curve continues without a seam. A file
        with unreadable rows is kept as loss.csv.bak before it is rewritten."""
        if not resume_step or not self.csv_path.exists():
            return []
        rows, bad = read_loss_csv(self.csv_path)
        if bad:
            shutil.copyfile(self.csv_path, self.csv_path.with_name("loss.csv.bak"))
        return [r for r in rows if r["step"] <= resume_step]

    def add(self, step: int, epoch: int, loss: float, lr: float, kind: str = "train", grad_norm: float = math.nan,
            expert: str = "", timesteps: tuple[float, ...] = ()) -> float:
        """Record a loss (with the step's gradient norm, expert and timesteps when known); returns the moving
        average (train; NaN before the first finite loss) or the loss itself (validation)."""
        if kind == "train" and math.isfinite(loss):
            self._avg = loss if self._avg is None else self.ema * self._avg + (1 - self.ema) * loss
        avg = (math.nan if self._avg is None else self._avg) if kind == "train" else loss
        row = {"step": int(step), "epoch": int(epoch), "loss": float(loss), "avg_loss": avg, "lr": lr, "kind": kind,
               "grad_norm": float(grad_norm), "expert": expert, "timesteps": tuple(timesteps)}
        self.rows.append(row)
        self._pending.append(row)
        if kind != "train" or time.monotonic() - self._plotted >= self.plot_seconds:
            self.plot(force=False)
        return avg

    def flush(self) -> None:
        """Append the pending rows to loss.csv in one write (done with every plot and every save)."""
        if self._pending:
            append_bytes(self.csv_path, _csv_bytes(self._pending))
            self._pending.clear()

    def plot(self, force: bool = True) -> None:
        """Append the pending rows and redraw the plots: unless `force`, at most every `plot_seconds`; never
        twice for the same rows. Never raises: a plot that fails is logged and skipped, the run goes on."""
        from .report.plots import draw_plots

        self.flush()
        if len(self.rows) == self._drawn_rows or not force and time.monotonic() - self._plotted < self.plot_seconds:
            return
        self._plotted, self._drawn_rows = time.monotonic(), len(self.rows)
        draw_plots(self.rows, self.folder, experts=self.experts)

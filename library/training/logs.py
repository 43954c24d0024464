"""Training logs a user can read without tools: `loss.csv` and `loss.png` in the output folder, refreshed
as training goes, plus TensorBoard / wandb through accelerate's trackers when asked for.

The PNG is drawn with OpenCV (already a dependency): raw losses as dots, an exponential moving average as
a line, validation losses as crosses.
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

import numpy as np

from .files import append_bytes, atomic_write_bytes

logger = logging.getLogger(__name__)

CSV_FIELDS = ("step", "epoch", "loss", "avg_loss", "lr", "kind")
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
    avg, lr = row.get("avg_loss", ""), row.get("lr", "")
    return {"step": _whole(row["step"]), "epoch": _whole(row.get("epoch") or "0"), "loss": loss,
            "avg_loss": float(avg) if avg else loss, "lr": float(lr) if lr else math.nan, "kind": kind}


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
    writer.writerows({**r, "step": int(r["step"]), "epoch": int(r["epoch"])} for r in rows)
    return out.getvalue().encode("utf-8")


class LossLog:
    """One CSV row per optimizer step (and per validation run); rows are appended and the curve redrawn
    at most every `plot_seconds`, after each validation, and on `flush()` / `plot()` (every save). A
    non-finite loss (a skipped step) gets its row but never enters the moving average or the plot."""

    def __init__(self, folder: str | os.PathLike, ema: float = 0.98, plot_seconds: float = 30.0, resume_step: int = 0):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.csv_path = self.folder / "loss.csv"
        self.png_path = self.folder / "loss.png"
        self.ema, self.plot_seconds, self._plotted = ema, plot_seconds, 0.0
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

    def add(self, step: int, epoch: int, loss: float, lr: float, kind: str = "train") -> float:
        """Record a loss; returns the moving average (train; NaN before the first finite loss) or the loss
        itself (validation)."""
        if kind == "train" and math.isfinite(loss):
            self._avg = loss if self._avg is None else self.ema * self._avg + (1 - self.ema) * loss
        avg = (math.nan if self._avg is None else self._avg) if kind == "train" else loss
        row = {"step": int(step), "epoch": int(epoch), "loss": float(loss), "avg_loss": avg, "lr": lr, "kind": kind}
        self.rows.append(row)
        self._pending.append(row)
        if kind != "train" or time.monotonic() - self._plotted >= self.plot_seconds:
            self.plot()
        return avg

    def flush(self) -> None:
        """Append the pending rows to loss.csv in one write (done with every plot and every save)."""
        if self._pending:
            append_bytes(self.csv_path, _csv_bytes(self._pending))
            self._pending.clear()

    def plot(self, width: int = 900, height: int = 420) -> None:
        import cv2

        self.flush()
        train = [r for r in self.rows if r["kind"] == "train" and math.isfinite(r["loss"])
                 and math.isfinite(r["avg_loss"])]
        val = [r for r in self.rows if r["kind"] != "train" and math.isfinite(r["loss"])]
        self._plotted = time.monotonic()
        losses = [r["loss"] for r in train + val]
        if not train or not math.isfinite(max(losses) - min(losses)):  # nothing to draw, or beyond float range
            return
        canvas = np.full((height, width, 3), 255, np.uint8)
        left, right, top, bottom = 70, 20, 30, 40
        steps = [r["step"] for r in train + val]
        s0, s1 = min(steps), max(max(steps), min(steps) + 1)
        lo, hi = min(losses), max(losses)
        hi = hi if hi > lo else lo + max(1e-6, abs(lo) * 1e-6)

        def xy(step, loss):
            x = left + (step - s0) / (s1 - s0) * (width - left - right)
            y = top + (hi - loss) / (hi - lo) * (height - top - bottom)
            return int(round(x)), int(round(y))

        cv2.rectangle(canvas, (left, top), (width - right, height - bottom), (200, 200, 200), 1)
        for r in train:
            cv2.circle(canvas, xy(r["step"], r["loss"]), 1, (230, 170, 120), -1)
        avg = np.array([xy(r["step"], r["avg_loss"]) for r in train], np.int32)
        cv2.polylines(canvas, [avg], False, (160, 60, 20), 2)
        for r in val:
            cv2.drawMarker(canvas, xy(r["step"], r["loss"]), (30, 30, 200), cv2.MARKER_CROSS, 10, 2)
        font = cv2.FONT_HERSHEY_SIMPLEX
        cv2.putText(canvas, f"{hi:.4g}", (5, top + 5), font, 0.45, (0, 0, 0), 1)
        cv2.putText(canvas, f"{lo:.4g}", (5, height - bottom), font, 0.45, (0, 0, 0), 1)
        cv2.putText(canvas, f"step {s0}", (left, height - 12), font, 0.45, (0, 0, 0), 1)
        cv2.putText(canvas, f"step {s1}", (width - right - 90, height - 12), font, 0.45, (0, 0, 0), 1)
        legend = "loss (dots), moving average (line)" + (", validation (x)" if val else "")
        cv2.putText(canvas, legend, (left, 20), font, 0.5, (0, 0, 0), 1)
        ok, png = cv2.imencode(".png", canvas)
        if ok:
            atomic_write_bytes(self.png_path, png.tobytes())

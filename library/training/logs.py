"""Training logs a user can read without tools: `loss.csv` and `loss.png` in the output folder, refreshed
as training goes, plus TensorBoard / wandb through accelerate's trackers when asked for.

The PNG is drawn with OpenCV (already a dependency): raw losses as dots, an exponential moving average as
a line, validation losses as crosses.
"""

from __future__ import annotations

import csv
import logging
import math
import os
import time
from pathlib import Path

import numpy as np

logger = logging.getLogger(__name__)

CSV_FIELDS = ("step", "epoch", "loss", "avg_loss", "lr", "kind")


def atomic_write_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


class LossLog:
    """One CSV row per optimizer step (and per validation run); rows are appended and the curve redrawn
    at most every `plot_seconds`, after each validation, and on `flush()` / `plot()` (every save)."""

    def __init__(self, folder: str | os.PathLike, ema: float = 0.98, plot_seconds: float = 30.0, resume_step: int = 0):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.csv_path = self.folder / "loss.csv"
        self.png_path = self.folder / "loss.png"
        self.ema, self.plot_seconds, self._plotted = ema, plot_seconds, 0.0
        self._pending: list[dict] = []  # rows not yet appended to loss.csv
        self.rows: list[dict] = self._read_existing(resume_step)
        self._avg = self.rows[-1]["avg_loss"] if self.rows else None
        self._rewrite()

    def _read_existing(self, resume_step: int) -> list[dict]:
        """On resume keep the rows up to the resumed step, so the curve continues without a seam."""
        if not resume_step or not self.csv_path.exists():
            return []
        rows = []
        with open(self.csv_path, newline="") as f:
            for row in csv.DictReader(f):
                if int(row["step"]) <= resume_step:
                    rows.append({k: (row[k] if k == "kind" else float(row[k])) for k in CSV_FIELDS})
        return rows

    def _rewrite(self) -> None:
        tmp = self.csv_path.with_name("loss.csv.tmp")
        with open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=CSV_FIELDS)
            writer.writeheader()
            writer.writerows(self.rows)
        os.replace(tmp, self.csv_path)

    def add(self, step: int, epoch: int, loss: float, lr: float, kind: str = "train") -> float:
        """Record a loss; returns the moving average (train) or the loss itself (validation)."""
        if kind == "train":
            self._avg = loss if self._avg is None else self.ema * self._avg + (1 - self.ema) * loss
        row = {"step": step, "epoch": epoch, "loss": loss, "avg_loss": self._avg if kind == "train" else loss,
               "lr": lr, "kind": kind}
        self.rows.append(row)
        self._pending.append(row)
        if kind != "train" or time.monotonic() - self._plotted >= self.plot_seconds:
            self.plot()
        return row["avg_loss"]

    def flush(self) -> None:
        """Append the pending rows to loss.csv (done with every plot and every save)."""
        if self._pending:
            with open(self.csv_path, "a", newline="") as f:
                csv.DictWriter(f, fieldnames=CSV_FIELDS).writerows(self._pending)
            self._pending.clear()

    def plot(self, width: int = 900, height: int = 420) -> None:
        import cv2

        self.flush()
        train = [r for r in self.rows if r["kind"] == "train" and math.isfinite(r["loss"])]
        val = [r for r in self.rows if r["kind"] != "train" and math.isfinite(r["loss"])]
        if not train:
            return
        self._plotted = time.monotonic()
        canvas = np.full((height, width, 3), 255, np.uint8)
        left, right, top, bottom = 70, 20, 30, 40
        steps = [r["step"] for r in train + val]
        losses = [r["loss"] for r in train + val]
        s0, s1 = min(steps), max(max(steps), min(steps) + 1)
        lo, hi = min(losses), max(losses)
        hi = hi if hi > lo else lo + 1e-6

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

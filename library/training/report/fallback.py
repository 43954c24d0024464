"""The loss curve without matplotlib: one PNG drawn with OpenCV (a dependency anyway). Raw losses as dots,
the moving average as a line, validation losses as crosses; the lowest and highest loss and the first
and last step written on the axes."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from ..files import atomic_write_bytes


def draw_loss_opencv(rows: list[dict], path: Path, width: int = 900, height: int = 420) -> bool:
    """Write the loss curve to `path`; False (nothing written) when there is nothing finite to draw."""
    import cv2

    train = [r for r in rows if r["kind"] == "train" and math.isfinite(r["loss"]) and math.isfinite(r["avg_loss"])]
    val = [r for r in rows if r["kind"] != "train" and math.isfinite(r["loss"])]
    losses = [r["loss"] for r in train + val]
    if not train or not math.isfinite(max(losses) - min(losses)):  # nothing to draw, or beyond float range
        return False
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
        atomic_write_bytes(path, png.tobytes())
    return bool(ok)

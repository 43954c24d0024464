"""Standardising frames: letterbox / pillarbox removal, output size, resize + centre crop, colour.

Bars are found like ffmpeg's cropdetect: an edge row (or column) belongs to a bar when nearly all its
pixels are darker than `BAR_LUMA` in every sampled frame. Output is either a square of `resolution`
(resize so the short side fits, then centre crop) or, keeping the aspect for bucketing, the largest
size of at most `resolution`² pixels with both sides a multiple of 16, never upscaled.
Colour normalisation is one gray-world white balance plus a 1-99 percentile luma stretch fitted on the
whole clip, so every frame gets the same transform and nothing flickers.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

BAR_LUMA = 24  # cropdetect's default limit
BAR_MIN_FRACTION = 0.02  # thinner bars are left alone
SIZE_MULTIPLE = 16


@dataclass(frozen=True)
class CropBox:
    """Content region of a frame: x0 <= x < x1, y0 <= y < y1."""

    x0: int
    y0: int
    x1: int
    y1: int

    @property
    def width(self) -> int:
        return self.x1 - self.x0

    @property
    def height(self) -> int:
        return self.y1 - self.y0

    def apply(self, frame: np.ndarray) -> np.ndarray:
        return frame[self.y0:self.y1, self.x0:self.x1]

    def as_list(self) -> list[int]:
        return [self.x0, self.y0, self.x1, self.y1]


def _leading_dark(dark_lines: np.ndarray) -> int:
    """Count of consecutive True values from the start."""
    not_dark = np.flatnonzero(~dark_lines)
    return int(not_dark[0]) if not_dark.size else int(dark_lines.size)


def detect_bars(frames: list[np.ndarray]) -> CropBox:
    """The content box once dark letterbox (top/bottom) and pillarbox (left/right) bars are removed."""
    greys = [f if f.ndim == 2 else cv2.cvtColor(f, cv2.COLOR_BGR2GRAY) for f in frames]
    height, width = greys[0].shape
    # A line is dark when its 98th percentile is under the limit in every frame.
    rows = np.all([np.percentile(g, 98, axis=1) < BAR_LUMA for g in greys], axis=0)
    cols = np.all([np.percentile(g, 98, axis=0) < BAR_LUMA for g in greys], axis=0)
    top, bottom = _leading_dark(rows), _leading_dark(rows[::-1])
    left, right = _leading_dark(cols), _leading_dark(cols[::-1])
    if top + bottom >= height // 2:  # an almost black frame, not bars
        top = bottom = 0
    if left + right >= width // 2:
        left = right = 0
    top, bottom = [v if v >= BAR_MIN_FRACTION * height else 0 for v in (top, bottom)]
    left, right = [v if v >= BAR_MIN_FRACTION * width else 0 for v in (left, right)]
    # Bars often fade into the picture over a line or two: take one more line, keep sizes even.
    top, bottom, left, right = [v + 1 + (v + 1) % 2 if v else 0 for v in (top, bottom, left, right)]
    return CropBox(left, top, width - right, height - bottom)


def output_size(width: int, height: int, resolution: int, square: bool) -> tuple[int, int]:
    """(W, H) of the prepared media for a content region of width x height."""
    if square:
        return resolution, resolution
    scale = min(1.0, float(np.sqrt(resolution * resolution / float(width * height))))
    out_w = max(SIZE_MULTIPLE, int(width * scale) // SIZE_MULTIPLE * SIZE_MULTIPLE)
    out_h = max(SIZE_MULTIPLE, int(height * scale) // SIZE_MULTIPLE * SIZE_MULTIPLE)
    return out_w, out_h


def resize_cover(frame: np.ndarray, out_w: int, out_h: int) -> np.ndarray:
    """Resize so the frame covers (out_w, out_h), then crop the centre: no distortion, no padding."""
    height, width = frame.shape[:2]
    scale = max(out_w / width, out_h / height)
    new_w, new_h = max(out_w, round(width * scale)), max(out_h, round(height * scale))
    interpolation = cv2.INTER_AREA if scale < 1 else cv2.INTER_CUBIC
    resized = cv2.resize(frame, (new_w, new_h), interpolation=interpolation) if (new_w, new_h) != (
        width, height) else frame
    x0, y0 = (new_w - out_w) // 2, (new_h - out_h) // 2
    return np.ascontiguousarray(resized[y0:y0 + out_h, x0:x0 + out_w])


def scale_to_short_side(frame: np.ndarray, short_side: int) -> np.ndarray:
    """Downscale (never upscale) so the short side is at most `short_side`."""
    if short_side >= min(frame.shape[:2]):
        return frame
    while min(frame.shape[:2]) >= 2 * short_side:  # halving first: INTER_AREA is slow at odd ratios
        frame = cv2.pyrDown(frame)
    scale = short_side / min(frame.shape[:2])
    size = (max(1, round(frame.shape[1] * scale)), max(1, round(frame.shape[0] * scale)))
    return cv2.resize(frame, size, interpolation=cv2.INTER_AREA) if scale < 1 else frame


@dataclass(frozen=True)
class ColorTransform:
    """Per-channel gains (white balance) and a luma stretch, fitted once per clip or image."""

    gains: tuple[float, float, float]
    low: float
    high: float

    def apply(self, frame: np.ndarray) -> np.ndarray:
        out = frame.astype(np.float32) * np.asarray(self.gains, dtype=np.float32)
        out = (out - self.low) * (255.0 / max(1.0, self.high - self.low))
        return np.clip(out + 0.5, 0, 255).astype(np.uint8)


def fit_color_transform(frames: list[np.ndarray]) -> ColorTransform:
    """Gray-world gains (clamped to 0.7-1.4) and the 1st / 99th percentile of the balanced luma."""
    stack = np.stack([cv2.resize(f, (64, 64), interpolation=cv2.INTER_AREA) for f in frames]).astype(np.float32)
    means = stack.reshape(-1, 3).mean(axis=0) + 1e-6
    gains = np.clip(means.mean() / means, 0.7, 1.4)
    luma = (stack * gains).mean(axis=-1)
    low, high = np.percentile(luma, [1, 99])
    if high - low < 32:  # a deliberately low-contrast picture: balance only
        low, high = 0.0, 255.0
    return ColorTransform(gains=tuple(float(g) for g in gains), low=float(low), high=float(high))

"""Quality measurements on grey frames: one number per defect, higher or lower meaning worse as stated.

Per frame (images and sampled clip frames):
  sharpness    variance of the Laplacian at the output scale (low = blurred).
  motion_blur  coherence of the fine-detail structure tensor, (l1 - l2) / (l1 + l2) in [0, 1]: motion
               blur removes detail along one direction only (high = smeared one way).
  noise        sigma of the finest diagonal Haar detail, median(|HH|) / 0.6745, in grey levels, at the
               native resolution (robust to edges; high = noisy).
  blockiness   8x8 grid strength: the largest mean (clipped) neighbour difference at one of the 8 column
               (row) phases over the mean of the other 7, averaged over both axes (1.0 = no grid;
               JPEG/MPEG artefacts give more).
Per clip (consecutive source frames at analysis size):
  shake        global motion by phase correlation between frames; the median distance of the camera
               path from its 5-frame moving average, in % of the frame width (a steady pan is ~0).
  lighting     largest frame-to-frame jump of the mean luma, in % of full scale.
  overlay      % of the frame covered by strong edges that stay fixed while most of the picture moves
               (a watermark or logo); None when too little of the picture moves to tell.
"""

from __future__ import annotations

import cv2
import numpy as np

MOVE_STD = 6.0  # grey-level temporal std above which a pixel counts as moving
STATIC_STD = 2.5  # ... and below which it counts as fixed
OVERLAY_EDGE = 120.0  # Sobel magnitude of a high-contrast edge (a 0->255 step gives about 1020)
MIN_MOVING_FRACTION = 0.4  # overlays are judged only when at least this much of the picture moves
BLOCK_STEP_CLIP = 16.0  # neighbour differences are clipped here before the grid is measured


def to_grey(frame: np.ndarray) -> np.ndarray:
    return frame if frame.ndim == 2 else cv2.cvtColor(frame, cv2.COLOR_BGR2GRAY)


def sharpness(grey: np.ndarray) -> float:
    """Variance of the Laplacian (8-bit scale)."""
    return float(cv2.Laplacian(grey, cv2.CV_64F, ksize=1).var())


def motion_blur(grey: np.ndarray) -> float:
    """Structure-tensor coherence of the fine detail: 0 isotropic, 1 detail in one direction only.

    The frame is high-passed first (minus a sigma-2 blur) so the smooth shading a smear leaves intact
    does not dilute the measure; gradients are plain neighbour differences.
    """
    g = grey.astype(np.float32)
    g = g - cv2.GaussianBlur(g, (0, 0), 2.0)
    gx = np.diff(g, axis=1)[:-1, :]
    gy = np.diff(g, axis=0)[:, :-1]
    a, b, c = float((gx * gx).mean()), float((gx * gy).mean()), float((gy * gy).mean())
    trace = a + c
    if trace < 1e-6:
        return 0.0
    return float(np.sqrt((a - c) ** 2 + 4 * b * b)) / trace  # (l1 - l2) / (l1 + l2)


def noise_sigma(grey: np.ndarray) -> float:
    """Noise sigma in grey levels from the median of the finest diagonal Haar coefficients."""
    g = grey.astype(np.float32)
    h, w = (g.shape[0] // 2) * 2, (g.shape[1] // 2) * 2
    g = g[:h, :w]
    hh = (g[0::2, 0::2] - g[0::2, 1::2] - g[1::2, 0::2] + g[1::2, 1::2]) / 2.0
    return float(np.median(np.abs(hh)) / 0.6745)


def _grid_strength(diffs: np.ndarray) -> float:
    """diffs: mean |neighbour difference| per column boundary. Strongest of 8 phases over the rest."""
    n = diffs.size // 8 * 8
    if n < 16:
        return 1.0
    phases = diffs[:n].reshape(-1, 8).mean(axis=0)
    best = int(np.argmax(phases))
    rest = np.delete(phases, best).mean()
    return float(phases[best] / max(rest, 0.25))


def blockiness(grey: np.ndarray) -> float:
    """8x8 block-grid strength averaged over columns and rows (1.0 when there is no grid)."""
    g = grey.astype(np.float32)
    # Block steps are small; clipping keeps strong content edges from drowning them.
    col = np.minimum(np.abs(np.diff(g, axis=1)), BLOCK_STEP_CLIP).mean(axis=0)
    row = np.minimum(np.abs(np.diff(g, axis=0)), BLOCK_STEP_CLIP).mean(axis=1)
    return 0.5 * (_grid_strength(col) + _grid_strength(row))


def global_motion(greys: list[np.ndarray]) -> np.ndarray:
    """[N-1, 2] per-step (dx, dy) by phase correlation; steps with a weak peak count as no motion."""
    if len(greys) < 2:
        return np.zeros((0, 2), dtype=np.float64)
    window = cv2.createHanningWindow(greys[0].shape[::-1], cv2.CV_32F)
    steps = []
    previous = greys[0].astype(np.float32)
    for grey in greys[1:]:
        current = grey.astype(np.float32)
        (dx, dy), response = cv2.phaseCorrelate(previous, current, window)
        steps.append((dx, dy) if response > 0.03 else (0.0, 0.0))
        previous = current
    return np.asarray(steps, dtype=np.float64)


def shake(greys: list[np.ndarray]) -> float:
    """Median distance of the camera path from its 5-frame moving average, in % of the frame width.

    The median ignores the odd frame where phase correlation locks onto the wrong peak.
    """
    steps = global_motion(greys)
    if len(steps) < 5:
        return 0.0
    path = np.vstack([[0.0, 0.0], np.cumsum(steps, axis=0)])  # [N, 2]
    kernel = np.ones(5) / 5.0
    smooth = np.stack([np.convolve(path[:, i], kernel, mode="valid") for i in range(2)], axis=1)
    residual = np.sqrt(((path[2:-2] - smooth) ** 2).sum(axis=1))
    return float(100.0 * np.median(residual) / greys[0].shape[1])


def lighting_jump(greys: list[np.ndarray]) -> float:
    """Largest frame-to-frame change of the mean luma, in % of 255."""
    if len(greys) < 2:
        return 0.0
    means = np.asarray([float(g.mean()) for g in greys])
    return float(np.abs(np.diff(means)).max() / 255.0 * 100.0)


def static_overlay(greys: list[np.ndarray]) -> float | None:
    """% of the frame that is a fixed high-contrast region while the picture moves; None if it barely moves."""
    if len(greys) < 4:
        return None
    stack = np.stack([g.astype(np.float32) for g in greys])  # [T, H, W]
    temporal_std = stack.std(axis=0)
    if float((temporal_std > MOVE_STD).mean()) < MIN_MOVING_FRACTION:
        return None
    edges = np.stack([cv2.magnitude(cv2.Sobel(g, cv2.CV_32F, 1, 0), cv2.Sobel(g, cv2.CV_32F, 0, 1))
                      for g in stack])
    persistent = edges.min(axis=0) > OVERLAY_EDGE * 0.5
    fixed = (edges.mean(axis=0) > OVERLAY_EDGE) & persistent & (temporal_std < STATIC_STD)
    fixed = cv2.morphologyEx(fixed.astype(np.uint8), cv2.MORPH_OPEN, np.ones((2, 2), np.uint8))
    return float(fixed.mean() * 100.0)


def phash(grey: np.ndarray) -> int:
    """64-bit perceptual hash: signs of the 8x8 low-frequency DCT of a 32x32 thumbnail against their median."""
    small = cv2.resize(grey, (32, 32), interpolation=cv2.INTER_AREA).astype(np.float32)
    low = cv2.dct(small)[:8, :8].flatten()
    bits = low > np.median(low[1:])
    return int(sum(1 << i for i, bit in enumerate(bits) if bit))

"""Thresholds, reasons and the combined score that ranks items for `--keep_best`.

Each metric of `quality.py` (plus the source-to-target resolution scale) has one threshold and one
direction. An item fails a metric when its value is on the wrong side; the reason names the defect,
the value and the threshold, e.g. "blur: sharpness 5.1 < 50". Metrics that do not apply (no motion
blur on a still, no overlay verdict when nothing moves) are None and never fail.

The combined score is the mean over the measured metrics of log2(margin), each clipped to [-3, 3],
where margin is value / threshold for "at least" metrics and threshold / value for "at most" ones:
above 0 means comfortably inside the thresholds on average; larger is better.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

SCORE_CLIP = 3.0


@dataclass(frozen=True)
class Thresholds:
    """Defaults tuned on synthetic defects and meant as a starting point (see the module docstring)."""

    min_sharpness: float = 50.0  # variance of the Laplacian at the output scale
    max_motion_blur: float = 0.6  # structure-tensor coherence of fine detail (videos only)
    max_noise: float = 5.0  # grey-level sigma at the native resolution
    max_blockiness: float = 1.5  # 8x8 grid strength (1.0 = none)
    max_shake: float = 0.6  # camera-path jitter, % of the frame width (videos only)
    max_lighting_jump: float = 5.0  # frame-to-frame mean-luma jump, % of full scale (videos only)
    max_overlay: float = 0.5  # % of the frame that is a fixed high-contrast region (videos only)
    min_resolution_scale: float = 1.0  # source content size / output size (1 = no upscaling)
    max_duplicate_distance: int = 6  # perceptual-hash Hamming distance (of 64 bits) for near-duplicates


# metric -> (threshold field, "min" or "max", defect label)
METRICS: dict[str, tuple[str, str, str]] = {
    "sharpness": ("min_sharpness", "min", "blur"),
    "motion_blur": ("max_motion_blur", "max", "motion blur"),
    "noise": ("max_noise", "max", "noise"),
    "blockiness": ("max_blockiness", "max", "compression artefacts"),
    "shake": ("max_shake", "max", "camera shake"),
    "lighting_jump": ("max_lighting_jump", "max", "lighting change"),
    "overlay": ("max_overlay", "max", "static overlay"),
    "resolution_scale": ("min_resolution_scale", "min", "low resolution"),
}
FILTER_NAMES = tuple(METRICS) + ("duplicate",)


def threshold_names() -> list[str]:
    return [f.name for f in fields(Thresholds)]


def failures(scores: dict[str, float | None], thresholds: Thresholds, disabled: tuple[str, ...] = ()) -> list[str]:
    """Reason strings for every metric on the wrong side of its threshold (empty when the item passes)."""
    reasons = []
    for metric, (field_name, direction, label) in METRICS.items():
        value = scores.get(metric)
        if value is None or metric in disabled:
            continue
        limit = getattr(thresholds, field_name)
        if (direction == "min" and value < limit) or (direction == "max" and value > limit):
            sign = "<" if direction == "min" else ">"
            reasons.append(f"{label}: {metric} {value:.3g} {sign} {limit:g}")
    return reasons


def _margin_log(value: float, limit: float, direction: str) -> float:
    ratio = (value / limit) if direction == "min" else (limit / value if value > 0 else math.inf)
    if ratio <= 0:
        return -SCORE_CLIP
    return max(-SCORE_CLIP, min(SCORE_CLIP, math.log2(ratio) if math.isfinite(ratio) else SCORE_CLIP))


def combined_score(scores: dict[str, float | None], thresholds: Thresholds, disabled: tuple[str, ...] = ()) -> float:
    """Mean clipped log2 margin over the measured, enabled metrics (0.0 when none was measured)."""
    parts = []
    for metric, (field_name, direction, _) in METRICS.items():
        value = scores.get(metric)
        limit = getattr(thresholds, field_name)
        if value is None or metric in disabled or limit <= 0:
            continue
        parts.append(_margin_log(float(value), float(limit), direction))
    return round(sum(parts) / len(parts), 4) if parts else 0.0

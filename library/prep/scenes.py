"""Hard-cut detection and cut-aware clip windows, streaming over a video's frames.

A cut is a frame whose small, blurred, mean/std-normalised grey thumbnail correlates poorly with the
previous one: `distance = 1 - NCC`. Normalising first makes a global brightness change (a lighting
jump) look like no cut at all, so the lighting filter, not the cutter, judges it. A frame is a cut when
its distance exceeds `cut_threshold` and is well above the recent median (fast pans stay whole).

Clips are 1 + 4k output frames at the target fps, picked from the source by frame selection: output
frame j is source frame `start + round(j * source_fps / target_fps)`. Windows sit back to back (plus an
optional gap) inside each scene, `margin` frames away from any cut, so a clip never spans a cut.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

import cv2
import numpy as np

THUMB_SIZE = (48, 27)  # (W, H) of the cut-detection thumbnail
FLAT_STD = 2.0  # a thumbnail this flat (a black frame) has no structure to correlate


@dataclass(frozen=True)
class ClipWindow:
    """One clip: the source frames it reads, in output order, and the source range it covers."""

    start: int
    indices: tuple[int, ...]

    @property
    def end(self) -> int:
        """Last source frame covered (inclusive)."""
        return self.indices[-1]


def check_frame_count(frames: int) -> None:
    """WAN clips are 1 + 4k frames; say which counts are valid when not."""
    if frames < 1 or (frames - 1) % 4:
        low = max(1, 1 + 4 * ((frames - 1) // 4))
        raise ValueError(f"clip frames {frames} is not 1 + 4k (WAN's VAE needs it); use {low} or {low + 4}")


def selection_offsets(frames: int, source_fps: float, target_fps: float) -> tuple[int, ...]:
    """Source-frame offsets of each output frame from the clip start (repeats when the source is slower)."""
    step = source_fps / target_fps
    return tuple(int(np.floor(j * step + 0.5)) for j in range(frames))


def cut_thumbnail(frame: np.ndarray) -> np.ndarray:
    """Small blurred grey thumbnail [27, 48] float32; `cut_distance` normalises it."""
    grey = frame if frame.ndim == 2 else cv2.cvtColor(frame, cv2.COLOR_BGR2GRAY)
    small = cv2.resize(grey, THUMB_SIZE, interpolation=cv2.INTER_AREA).astype(np.float32)
    small = cv2.GaussianBlur(small, (3, 3), 0)
    return small


def cut_distance(previous: np.ndarray, current: np.ndarray) -> float:
    """1 - normalised cross-correlation of two thumbnails; flat-to-flat is 0, flat-to-content is 1."""
    std_p, std_c = float(previous.std()), float(current.std())
    if std_p < FLAT_STD or std_c < FLAT_STD:
        both_flat = std_p < FLAT_STD and std_c < FLAT_STD
        return 0.0 if both_flat and abs(float(previous.mean() - current.mean())) < 30 else 1.0
    a = (previous - previous.mean()) / std_p
    b = (current - current.mean()) / std_c
    return float(1.0 - (a * b).mean())


class SceneClipper:
    """Feed frames in order with `push`; it returns clip windows as soon as they are known to be clean."""

    def __init__(self, frames: int, source_fps: float, target_fps: float, cut_threshold: float = 0.5,
                 margin: int = 2, gap: int = 0, max_clips: int = 0):
        check_frame_count(frames)
        self.offsets = selection_offsets(frames, source_fps, target_fps)
        self.span = self.offsets[-1] + 1
        self.cut_threshold = cut_threshold
        self.margin = margin
        self.gap = gap
        self.max_clips = max_clips
        self.cuts: list[int] = []
        self.emitted = 0
        self._next_start = 0
        self._previous: np.ndarray | None = None
        self._recent: deque[float] = deque(maxlen=12)

    def _is_cut(self, distance: float) -> bool:
        median = float(np.median(self._recent)) if self._recent else 0.0
        return distance > self.cut_threshold and distance > 3.0 * median + 0.1

    def push(self, index: int, frame: np.ndarray) -> list[ClipWindow]:
        """Register frame `index`; return the windows whose frames and trailing margin are now all seen."""
        thumb = cut_thumbnail(frame)
        if self._previous is not None:
            distance = cut_distance(self._previous, thumb)
            if self._is_cut(distance):
                self.cuts.append(index)
                self._next_start = max(self._next_start, index + self.margin)
                self._recent.clear()
            else:
                self._recent.append(distance)
        self._previous = thumb
        return self._ready(index)

    def _ready(self, index: int) -> list[ClipWindow]:
        ready = []
        while not self.max_clips or self.emitted < self.max_clips:
            start = self._next_start
            if start + self.span - 1 + self.margin > index:
                break
            ready.append(ClipWindow(start=start, indices=tuple(start + o for o in self.offsets)))
            self.emitted += 1
            self._next_start = start + self.span + self.gap
        return ready

    def finish(self, last_index: int) -> list[ClipWindow]:
        """At the end of the video there is no cut after the last frame: release windows up to it."""
        ready = []
        while not self.max_clips or self.emitted < self.max_clips:
            start = self._next_start
            if start + self.span - 1 > last_index:
                break
            ready.append(ClipWindow(start=start, indices=tuple(start + o for o in self.offsets)))
            self.emitted += 1
            self._next_start = start + self.span + self.gap
        return ready

    @property
    def earliest_needed(self) -> int:
        """Frames before this index can be dropped from any buffer."""
        return self._next_start

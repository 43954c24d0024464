"""What the media readers share: their error types, `MediaInfo`, and resize-then-centre-crop.

`video_io` (images, OpenCV video, frame folders) and `video_pyav` (the optional PyAV decoder) both
import this module and never each other's internals in a circle: `video_io` calls `video_pyav`, and
`video_pyav` needs only what is here.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from library.errors import UserError


class MediaError(ValueError):
    """A media file that cannot be used; the message names the file and the reason."""


class VideoDecoderError(UserError, RuntimeError):
    """A decoder setting that cannot work (an unknown name, or PyAV asked for but not installed)."""


@dataclass(frozen=True)
class MediaInfo:
    """What enumeration needs to know about a source without decoding it."""

    width: int
    height: int
    frame_count: int  # 1 for an image
    fps: float | None  # None for images and frame folders


def crop_box(width: int, height: int, target: tuple[int, int]) -> tuple[int, int, int, int]:
    """(x, y, w, h) of the centred source region with the target's aspect ratio."""
    tw, th = target
    scale = max(tw / width, th / height)
    cw, ch = min(width, round(tw / scale)), min(height, round(th / scale))
    return (width - cw) // 2, (height - ch) // 2, cw, ch


def resize_and_crop(frame: np.ndarray, target: tuple[int, int], out: np.ndarray | None = None) -> np.ndarray:
    """Resize to cover `target` (W, H) keeping the aspect ratio, then centre-crop to it.

    Implemented as crop-then-resize of the same region (identical result, less work). Shrinking by 2x
    or more uses area averaging; by less than 2x, bilinear (its 2-pixel footprint still covers the
    sample spacing, so no source pixel is skipped, at a quarter of area's cost); enlarging uses bicubic."""
    import cv2

    height, width = frame.shape[:2]
    x, y, cw, ch = crop_box(width, height, target)
    region = frame[y:y + ch, x:x + cw]
    if (cw, ch) == tuple(target):
        if out is None:
            return np.ascontiguousarray(region)
        out[...] = region
        return out
    factor = min(cw / target[0], ch / target[1])
    interpolation = cv2.INTER_AREA if factor >= 2 else cv2.INTER_LINEAR if factor >= 1 else cv2.INTER_CUBIC
    return cv2.resize(region, tuple(target), dst=out, interpolation=interpolation)  # into `out` when given

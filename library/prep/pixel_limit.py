"""The pixel limit on media we are given: an image or video frame over it is refused from its header,
before anything is decoded, so a decompression bomb (a small PNG that claims 10^12 pixels) or a huge
photo costs milliseconds instead of gigabytes.

The limit is `WAN_MAX_IMAGE_PIXELS` (pixels per image or frame; default 178,956,970, Pillow's own hard
limit, about 13,400 x 13,400): far above anything a WAN bucket needs, so only a bomb or a file that
should be downscaled first is refused. Both readers use it: `library.data.video_io` (Pillow, OpenCV,
PyAV) and `library.prep.media` (OpenCV from bytes). Callers turn `TooManyPixels` into their own media
error, which skips the item with this reason.
"""

from __future__ import annotations

import logging
import os
import re
import warnings

logger = logging.getLogger(__name__)

PIXELS_ENV = "WAN_MAX_IMAGE_PIXELS"
DEFAULT_MAX_PIXELS = 2 * 89_478_485  # Pillow's DecompressionBombError threshold


class TooManyPixels(Exception):
    """An image or frame over the pixel limit; the message says its size, the limit and what to do."""


def max_pixels() -> int:
    """The limit: `WAN_MAX_IMAGE_PIXELS` when set to a positive integer, else the default (with a warning
    when the variable is set to something else)."""
    text = os.environ.get(PIXELS_ENV, "").strip().replace("_", "")
    if not text:
        return DEFAULT_MAX_PIXELS
    if text.isdigit() and int(text) > 0:
        return int(text)
    logger.warning("%s=%r is not a positive whole number of pixels; using the default %d", PIXELS_ENV,
                   os.environ[PIXELS_ENV], DEFAULT_MAX_PIXELS)
    return DEFAULT_MAX_PIXELS


def _refusal(size: str, limit: int) -> TooManyPixels:
    return TooManyPixels(f"{size} is over the limit of {limit:,} pixels per image or frame (a decompression bomb, "
                         f"or far larger than training needs): downscale it, or raise {PIXELS_ENV} if it is real")


def check_pixels(width: int, height: int) -> None:
    """Raise TooManyPixels when a width x height image or frame is over the limit."""
    limit = max_pixels()
    if width * height > limit:
        raise _refusal(f"{width}x{height} ({width * height:,} pixels)", limit)


def open_image(source):
    """A Pillow image opened lazily (header read, nothing decoded) whose size is within the limit; raises
    TooManyPixels, and Pillow's own errors for what is not an image. `source`: a path or a binary file."""
    from PIL import Image

    limit = max_pixels()
    if Image.MAX_IMAGE_PIXELS is not None and limit > 2 * Image.MAX_IMAGE_PIXELS:
        Image.MAX_IMAGE_PIXELS = limit // 2 + 1  # the user raised our limit: Pillow's must not stay lower
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # under our limit: wanted
        try:
            image = Image.open(source)
        except Image.DecompressionBombError as exc:  # Pillow saw it first; it states only the pixel count
            found = re.search(r"\((\d+) pixels\)", str(exc))
            raise _refusal(f"{int(found.group(1)):,} pixels" if found else "the image", limit) from None
    try:
        check_pixels(*image.size)
    except TooManyPixels:
        image.close()
        raise
    return image

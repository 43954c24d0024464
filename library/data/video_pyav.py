"""Decoding video files with PyAV, the optional second decoder (`pip install av`, or the `video` extra).

`video_io` calls `probe` and `read_frames` when OpenCV cannot open or decode a file, or first when
`WAN_VIDEO_DECODER=pyav`. Both give what the OpenCV path gives: the real source fps (the stream's
average rate), the frame count (from the header, else by counting packets without decoding), frames
turned upright by the stream's display-matrix rotation, and RGB uint8 frames converted from YUV by
libswscale with bicubic chroma filtering (the flag OpenCV's FFmpeg backend uses), so the two decoders
give the same pixels. Every failure is a `MediaError` naming the file.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from library.prep.pixel_limit import TooManyPixels, check_pixels

from .media_types import MediaError, MediaInfo, VideoDecoderError, resize_and_crop


def import_av():
    """The `av` module, or None when PyAV is not installed."""
    try:
        import av
    except ImportError:
        return None
    return av


def require_av():
    """The `av` module; VideoDecoderError saying how to install it when it is missing."""
    av = import_av()
    if av is None:
        raise VideoDecoderError("WAN_VIDEO_DECODER=pyav needs PyAV, which is not installed: pip install av "
                                "(or pip install -e \".[video]\"), or unset WAN_VIDEO_DECODER to decode with OpenCV")
    return av


def _open(path: Path):
    """(container, its first video stream); MediaError when the file cannot be opened as a video."""
    av = require_av()
    try:
        container = av.open(str(path))
    except av.FFmpegError as exc:
        raise MediaError(f"{path}: cannot open as a video (corrupt or unsupported format: {exc})") from None
    if not container.streams.video:
        container.close()
        raise MediaError(f"{path}: cannot open as a video (the file holds no video stream)")
    return container, container.streams.video[0]


def _check_pixels(path: Path, width: int, height: int) -> None:
    try:
        check_pixels(width, height)
    except TooManyPixels as exc:
        raise MediaError(f"{path}: {exc}") from None


def _rotation(frame) -> int:
    """Counter-clockwise display rotation of a decoded frame, a multiple of 90 (0 before PyAV 14)."""
    return int(round(getattr(frame, "rotation", 0) / 90.0)) % 4 * 90


def _to_rgb(frame) -> np.ndarray:
    """A decoded frame -> upright RGB uint8 [H, W, 3] (bicubic chroma, as OpenCV converts)."""
    rgb = frame.to_ndarray(format="rgb24", interpolation="BICUBIC")
    quarter_turns = _rotation(frame) // 90
    return np.ascontiguousarray(np.rot90(rgb, k=quarter_turns)) if quarter_turns else rgb


def _scan(container, stream) -> tuple[object, int, float]:
    """(first decoded frame or None, packet count, seconds the packets span). Decodes only until the
    first frame; reads every packet (without decoding) only when the header has no frame count."""
    first, count, begin, end = None, 0, None, None
    for packet in container.demux(stream):
        if packet.size == 0:
            continue
        count += 1
        if packet.pts is not None:
            begin = packet.pts if begin is None else min(begin, packet.pts)
            stop = packet.pts + (packet.duration or 0)
            end = stop if end is None else max(end, stop)
        if first is None:
            first = next(iter(stream.decode(packet)), None)
        elif stream.frames > 0:
            break
    if first is None:
        first = next(iter(stream.decode(None)), None)  # a decoder that held its frames back
    span = float((end - begin) * stream.time_base) if begin is not None and end > begin else 0.0
    return first, count, span


def _average_fps(stream, count: int, span: float) -> float | None:
    """The stream's average frame rate; frames / duration instead when the packets were counted and
    their timestamps disagree by over 5% (a variable-rate clip in a container that only states a
    nominal rate, such as Matroska)."""
    fps = float(stream.average_rate) if stream.average_rate else 0.0
    if stream.frames <= 0 and span > 0 and (fps <= 0 or abs(count / span / fps - 1) > 0.05):
        fps = count / span
    return fps if fps > 0 else None


def probe(path: Path) -> MediaInfo:
    """Upright size, frame count and average fps of a video file."""
    av = require_av()
    container, stream = _open(path)
    try:
        _check_pixels(path, stream.codec_context.width, stream.codec_context.height)  # before decoding a frame
        first, count, span = _scan(container, stream)
    except av.FFmpegError as exc:
        raise MediaError(f"{path}: corrupt video ({exc})") from None
    finally:
        container.close()
    count = stream.frames if stream.frames > 0 else count
    if first is None or count <= 0:
        raise MediaError(f"{path}: corrupt video (no frame could be decoded)")
    width, height = (first.height, first.width) if _rotation(first) in (90, 270) else (first.width, first.height)
    _check_pixels(path, width, height)
    return MediaInfo(width, height, count, _average_fps(stream, count, span))


def read_frames(path: Path, indices: list[int], target: tuple[int, int] | None) -> np.ndarray:
    """Decode the given source frame indices (ascending, repeats allowed) -> [N, H, W, 3] RGB uint8,
    each frame resized and centre-cropped to `target` (W, H) when given."""
    av = require_av()
    order = sorted(set(indices))
    slot_of = {index: k for k, index in enumerate(order)}
    out, position, last = None, 0, order[-1]
    container, stream = _open(path)
    try:
        _check_pixels(path, stream.codec_context.width, stream.codec_context.height)
    except MediaError:
        container.close()
        raise
    stream.thread_type = "AUTO"  # frame and slice threads: the same pixels, faster
    try:
        for frame in container.decode(stream):
            if position in slot_of:
                rgb = _to_rgb(frame)
                if out is None:
                    size = (target[1], target[0]) if target else rgb.shape[:2]
                    out = np.empty((len(order), *size, 3), np.uint8)
                if target:
                    resize_and_crop(rgb, target, out=out[slot_of[position]])
                else:
                    np.copyto(out[slot_of[position]], rgb)
            position += 1
            if position > last:
                break
    except av.FFmpegError as exc:
        raise MediaError(f"{path}: corrupt video: decoding failed at frame {position} ({exc})") from None
    finally:
        container.close()
    if position <= last:
        raise MediaError(f"{path}: truncated or corrupt video: decoding stopped at frame {position}, "
                         f"frame {last} was needed (the header promised more)")
    return out if len(order) == len(indices) else out[[slot_of[i] for i in indices]]

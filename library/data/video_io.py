"""Reading media: images (png, jpg, webp, 16-bit, alpha, grayscale, EXIF rotation), video files
(OpenCV, PyAV optional) and folders of frames, plus fps resampling by frame selection and
resize-then-centre-crop.

Everything returns RGB uint8 numpy arrays (`[H, W, 3]` per frame). Failures raise `MediaError`, whose
message says what is wrong with which file, so callers can skip the item and report it.

Video decoders: OpenCV by default. When it cannot open or decode a file and PyAV is installed
(`pip install av`, `video_pyav.py`), PyAV is tried next (a debug log says so). The environment variable
`WAN_VIDEO_DECODER=pyav` makes PyAV the first choice, with OpenCV as the fallback: for codecs OpenCV
mishandles, and for variable-frame-rate clips in containers without a frame count (Matroska, WebM),
where OpenCV estimates the count from duration x nominal rate (PyAV counts the frames and takes their
average rate); `WAN_VIDEO_DECODER=opencv` is the default. When
both fail, the first decoder's reason is reported. The variable is read at every call, so it reaches
worker threads and launched processes.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np

from library.prep.pixel_limit import TooManyPixels, check_pixels, open_image

from . import video_pyav
from .media_types import MediaError, MediaInfo, VideoDecoderError, crop_box, resize_and_crop

__all__ = ["MediaError", "MediaInfo", "VideoDecoderError", "crop_box", "resize_and_crop"]  # re-exported

logger = logging.getLogger(__name__)

DECODER_ENV = "WAN_VIDEO_DECODER"
DECODERS = ("opencv", "pyav")  # the default first
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")
VIDEO_EXTENSIONS = (".mp4", ".mov", ".avi", ".mkv", ".webm", ".m4v", ".gif")


def is_image_file(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_EXTENSIONS


def is_video_source(path: Path) -> bool:
    """A video file or a folder holding image frames."""
    return path.suffix.lower() in VIDEO_EXTENSIONS or path.is_dir()


def _pil_to_rgb(image) -> np.ndarray:
    """Any PIL mode -> RGB uint8: 16-bit scaled to 8-bit, alpha composited onto white, gray expanded."""
    from PIL import Image

    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        array = np.asarray(image, dtype=np.uint32 if image.mode == "I" else np.uint16)
        array = (array.astype(np.float32) / (65535.0 if array.max() > 255 else 255.0) * 255.0).round()
        image = Image.fromarray(array.clip(0, 255).astype(np.uint8), "L")
    if image.mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
    if image.mode in ("RGBA", "LA", "PA"):
        background = Image.new("RGB", image.size, (255, 255, 255))
        background.paste(image.convert("RGBA"), mask=image.convert("RGBA").getchannel("A"))
        image = background
    return np.array(image.convert("RGB"))  # a writable copy (np.asarray would give a read-only view)


def missing_reason(path: Path) -> str:
    """Why a listed path cannot be opened: a dangling symbolic link (and its target), or gone."""
    if path.is_symlink():
        return f"is a symbolic link to {os.readlink(path)}, which does not exist; fix or remove the link"
    return "does not exist (removed while the dataset was read?)"


def pixel_checked(path: Path, width: int, height: int) -> None:
    """MediaError when a width x height image or frame of `path` is over the pixel limit."""
    try:
        check_pixels(width, height)
    except TooManyPixels as exc:
        raise MediaError(f"{path}: {exc}") from None


def _open_image(path: Path):
    """`path` opened lazily by Pillow (header only) within the pixel limit; MediaError for anything else."""
    from PIL import UnidentifiedImageError

    try:
        if path.stat().st_size == 0:
            raise MediaError(f"{path}: zero-byte file")
        return open_image(path)
    except FileNotFoundError:
        raise MediaError(f"{path}: {missing_reason(path)}") from None
    except TooManyPixels as exc:
        raise MediaError(f"{path}: {exc}") from None
    except UnidentifiedImageError:
        raise MediaError(f"{path}: not an image (unreadable as {path.suffix or 'an image'})") from None
    except MediaError:
        raise
    except (OSError, SyntaxError, ValueError) as exc:
        raise MediaError(f"{path}: corrupt image header ({exc})") from None


def load_image(path: str | Path) -> np.ndarray:
    """Decode an image file to RGB uint8 [H, W, 3], applying its EXIF orientation; an image over the
    pixel limit (`WAN_MAX_IMAGE_PIXELS`) is refused before decoding."""
    from PIL import ImageOps

    path = Path(path)
    image = _open_image(path)
    try:
        with image:
            return _pil_to_rgb(ImageOps.exif_transpose(image))
    except (OSError, SyntaxError, ValueError) as exc:
        raise MediaError(f"{path}: corrupt or truncated image ({exc})") from None


def image_size(path: Path) -> tuple[int, int]:
    """(width, height) after EXIF rotation, reading only the header."""
    image = _open_image(path)
    try:
        with image:
            width, height = image.size
            orientation = image.getexif().get(0x0112, 1)
    except (OSError, SyntaxError, ValueError) as exc:
        raise MediaError(f"{path}: corrupt image header ({exc})") from None
    return (height, width) if orientation in (5, 6, 7, 8) else (width, height)


def frame_files(folder: Path) -> list[Path]:
    """Image files of a frame folder in name order."""
    return sorted(p for p in folder.iterdir() if p.is_file() and is_image_file(p))


def probe(path: Path) -> MediaInfo:
    """Size, frame count and fps of an image, a video file or a frame folder (header only)."""
    if path.is_dir():
        frames = frame_files(path)
        if not frames:
            raise MediaError(f"{path}: folder of frames holds no image files")
        width, height = image_size(frames[0])
        return MediaInfo(width, height, len(frames), None)
    if is_image_file(path):
        width, height = image_size(path)
        return MediaInfo(width, height, 1, None)
    return _probe_video(path)


def decoder_order() -> tuple[str, ...]:
    """Video decoders to try, in order: the one `WAN_VIDEO_DECODER` names (default opencv), then the
    other one; PyAV only when it is installed (asking for it without it installed is an error)."""
    first = os.environ.get(DECODER_ENV, "").strip().lower() or DECODERS[0]
    if first not in DECODERS:
        raise VideoDecoderError(f"{DECODER_ENV}={os.environ[DECODER_ENV]!r} is not a video decoder; "
                                f"use one of {', '.join(DECODERS)} (or unset it for {DECODERS[0]})")
    if first == "pyav":
        video_pyav.require_av()
        return ("pyav", "opencv")
    return ("opencv", "pyav") if video_pyav.import_av() is not None else ("opencv",)


def _with_fallback(path: Path, work: dict):
    """Run `work[decoder]()` for each decoder in order until one succeeds; when all fail, raise the first
    decoder's MediaError (its reason is the one users know)."""
    errors: list[MediaError] = []
    order = decoder_order()
    for name in order:
        try:
            result = work[name]()
        except MediaError as exc:
            errors.append(exc)
            if len(errors) < len(order):
                logger.debug("%s: %s failed (%s); trying %s", path, name, exc, order[len(errors)])
            continue
        if errors:
            logger.debug("%s: decoded with %s", path, name)
        return result
    raise errors[0]


def _probe_video(path: Path) -> MediaInfo:
    if not path.exists():
        raise MediaError(f"{path}: {missing_reason(path)}")
    if path.stat().st_size == 0:
        raise MediaError(f"{path}: zero-byte file")
    return _with_fallback(path, {"opencv": lambda: _probe_opencv(path), "pyav": lambda: video_pyav.probe(path)})


def _probe_opencv(path: Path) -> MediaInfo:
    import cv2

    capture = cv2.VideoCapture(str(path))
    try:
        if not capture.isOpened():
            raise MediaError(f"{path}: cannot open as a video (corrupt or unsupported format)")
        count = int(capture.get(cv2.CAP_PROP_FRAME_COUNT))
        fps = float(capture.get(cv2.CAP_PROP_FPS))
        width = int(capture.get(cv2.CAP_PROP_FRAME_WIDTH))  # upright: OpenCV applies the rotation metadata
        height = int(capture.get(cv2.CAP_PROP_FRAME_HEIGHT))
    finally:
        capture.release()
    if count <= 0 or width <= 0 or height <= 0:
        raise MediaError(f"{path}: corrupt video (no frames or no size in its header)")
    pixel_checked(path, width, height)
    return MediaInfo(width, height, count, fps if fps > 0 else None)


def resample_indices(frame_count: int, source_fps: float | None, target_fps: float | None) -> list[int]:
    """Source frame indices that play the clip at `target_fps` with its real speed (frame selection).

    Frame i of the result shows time i / target_fps, taken from the nearest earlier source frame.
    Without both rates, or when they match, every frame is kept.
    """
    if not source_fps or not target_fps or abs(source_fps - target_fps) < 1e-3:
        return list(range(frame_count))
    step = source_fps / target_fps
    count = int(np.floor((frame_count - 1) / step + 1e-6)) + 1
    return [min(frame_count - 1, int(np.floor(i * step + 1e-6))) for i in range(count)]


def read_video_frames(path: Path, indices: list[int], target: tuple[int, int] | None = None) -> np.ndarray:
    """Decode the given source frame indices (ascending, repeats allowed) of a video file or frame folder
    -> [N, H, W, 3] RGB uint8, each frame resized and centre-cropped to `target` when given."""
    if path.is_dir():
        files = frame_files(path)
        frames = [load_image(files[i]) if i < len(files) else None for i in indices]
        if any(f is None for f in frames):
            raise MediaError(f"{path}: folder has {len(files)} frames, frame {max(indices)} requested")
        return np.stack([resize_and_crop(f, target) if target else f for f in frames])
    return _with_fallback(path, {"opencv": lambda: _read_file_frames(path, indices, target),
                                 "pyav": lambda: video_pyav.read_frames(path, indices, target)})


def _finish_frame(frame: np.ndarray, target, slot: np.ndarray) -> None:
    """Resize + crop a decoded BGR frame straight into its output slot, then convert it to RGB in place."""
    import cv2

    resize_and_crop(frame, target, out=slot) if target else np.copyto(slot, frame)
    cv2.cvtColor(slot, cv2.COLOR_BGR2RGB, dst=slot)


def _read_file_frames(path: Path, indices: list[int], target) -> np.ndarray:
    """Decode on this thread while one helper thread resizes the previous frames into the output.
    Skipped frames are only grabbed (never converted); at most 8 decoded frames wait for the helper."""
    import cv2
    from concurrent.futures import ThreadPoolExecutor

    capture = cv2.VideoCapture(str(path))
    if not capture.isOpened():
        raise MediaError(f"{path}: cannot open as a video (corrupt or unsupported format)")
    try:
        pixel_checked(path, int(capture.get(cv2.CAP_PROP_FRAME_WIDTH)), int(capture.get(cv2.CAP_PROP_FRAME_HEIGHT)))
    except MediaError:
        capture.release()
        raise
    wanted: dict[int, int] = {}
    for i in indices:
        wanted[i] = wanted.get(i, 0) + 1
    out, slots, futures, position, last = None, [], [], 0, max(indices)
    try:
        with ThreadPoolExecutor(1) as helper:
            while position <= last:
                ok = capture.grab() if position not in wanted else None
                if ok is None:
                    ok, frame = capture.read()
                    if ok:
                        if out is None:
                            size = (target[1], target[0]) if target else frame.shape[:2]
                            out = np.empty((len(indices), *size, 3), np.uint8)
                        if len(futures) >= 8:
                            futures[-8].result()
                        futures.append(helper.submit(_finish_frame, frame, target, out[len(futures)]))
                        slots.extend([len(futures) - 1] * wanted[position])  # output -> decoded frame
                if not ok:
                    break
                position += 1
            for future in futures:
                future.result()
    finally:
        capture.release()
    if position <= last:
        raise MediaError(f"{path}: truncated or corrupt video: decoding stopped at frame {position}, "
                         f"frame {last} was needed (the header promised more)")
    return out if len(futures) == len(slots) else out[slots]  # repeated indices repeat frames

"""Reading raw media and writing prepared media, atomically.

Sources are found by extension; images are read with OpenCV from bytes (so any path works), videos
are decoded sequentially with `cv2.VideoCapture`. Every file written here goes to a temporary name
in the same folder first and is renamed into place, so an interrupted run never leaves half a file.
"""

from __future__ import annotations

import io
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import cv2
import numpy as np

from .pixel_limit import TooManyPixels, check_pixels, open_image

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")
VIDEO_EXTENSIONS = (".mp4", ".mov", ".mkv", ".avi", ".webm", ".m4v", ".mpg", ".mpeg", ".wmv", ".gif")
DEFAULT_FPS = 24.0


class MediaError(RuntimeError):
    """A source that cannot be read; the message names the file."""


@dataclass(frozen=True)
class VideoInfo:
    """What the container says about a video (frame count may be an estimate; 0 when unknown)."""

    fps: float
    frame_count: int
    width: int
    height: int


def media_kind(path: Path) -> str | None:
    """'image', 'video' or None by extension."""
    suffix = path.suffix.lower()
    if suffix in IMAGE_EXTENSIONS:
        return "image"
    if suffix in VIDEO_EXTENSIONS:
        return "video"
    return None


def list_sources(inputs: list[Path]) -> list[tuple[Path, Path]]:
    """(root, file), both absolute, for every image or video under the inputs, sorted; a file input is its
    own root."""
    found: list[tuple[Path, Path]] = []
    seen: set[Path] = set()
    for root in inputs:
        root = Path(root).expanduser().resolve()
        if root.is_file():
            if media_kind(root) and root not in seen:
                seen.add(root)
                found.append((root.parent, root))
            continue
        if not root.is_dir():
            raise FileNotFoundError(f"input {root} does not exist; pass folders of raw images and videos")
        for path in sorted(root.rglob("*")):
            hidden = any(p.startswith(".") for p in path.relative_to(root).parts)
            dangling = path.is_symlink() and not path.exists()  # listed, so the report says why it is dropped
            if (path.is_file() or dangling) and media_kind(path) and not hidden and path not in seen:
                seen.add(path)
                found.append((root, path))
    return found


def _check_header(path: Path, data: np.ndarray) -> None:
    """MediaError unless Pillow reads an image header within the pixel limit from `data` (so OpenCV never
    decodes a decompression bomb: its own limit is 2^30 pixels, 3 GB per image)."""
    from PIL import UnidentifiedImageError

    try:
        open_image(io.BytesIO(data.tobytes())).close()
    except TooManyPixels as exc:
        raise MediaError(f"{path}: {exc}") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise MediaError(f"{path}: not a readable image ({exc})") from None


def read_image(path: Path) -> np.ndarray:
    """A BGR uint8 image [H, W, 3]; grey and alpha images are converted, 16-bit is scaled down. An image over
    the pixel limit (`WAN_MAX_IMAGE_PIXELS`) is refused from its header, before decoding."""
    if not path.exists():
        raise MediaError(f"{path}: {missing_reason(path)}")
    data = np.fromfile(str(path), dtype=np.uint8)
    if data.size:
        _check_header(path, data)
    image = cv2.imdecode(data, cv2.IMREAD_UNCHANGED) if data.size else None
    if image is None:
        raise MediaError(f"{path}: not a readable image")
    if image.dtype != np.uint8:
        image = (image.astype(np.float32) / np.iinfo(image.dtype).max * 255).round().astype(np.uint8)
    if image.ndim == 2:
        image = cv2.cvtColor(image, cv2.COLOR_GRAY2BGR)
    elif image.shape[2] == 4:
        image = cv2.cvtColor(image, cv2.COLOR_BGRA2BGR)
    return image


def missing_reason(path: Path) -> str:
    """Why a listed source cannot be opened: a dangling symbolic link (and its target), or gone."""
    if path.is_symlink():
        return f"a symbolic link to {os.readlink(path)}, which does not exist"
    return "no such file"


def _open_capture(path: Path) -> cv2.VideoCapture:
    """An opened capture whose frame size is within the pixel limit."""
    if not path.exists():
        raise MediaError(f"{path}: {missing_reason(path)}")
    capture = cv2.VideoCapture(str(path))
    if not capture.isOpened():
        raise MediaError(f"{path}: OpenCV cannot open this video (unsupported codec or not a video)")
    try:
        check_pixels(int(capture.get(cv2.CAP_PROP_FRAME_WIDTH)), int(capture.get(cv2.CAP_PROP_FRAME_HEIGHT)))
    except TooManyPixels as exc:
        capture.release()
        raise MediaError(f"{path}: {exc}") from None
    return capture


def probe_video(path: Path) -> VideoInfo:
    """fps, frame count and size from the container; fps falls back to 24 with a warning."""
    capture = _open_capture(path)
    try:
        fps = float(capture.get(cv2.CAP_PROP_FPS) or 0.0)
        count = int(capture.get(cv2.CAP_PROP_FRAME_COUNT) or 0)
        width = int(capture.get(cv2.CAP_PROP_FRAME_WIDTH) or 0)
        height = int(capture.get(cv2.CAP_PROP_FRAME_HEIGHT) or 0)
    finally:
        capture.release()
    if not np.isfinite(fps) or fps <= 0 or fps > 1000:
        logger.warning("%s: the container gives no usable fps; assuming %.0f", path, DEFAULT_FPS)
        fps = DEFAULT_FPS
    return VideoInfo(fps=fps, frame_count=max(count, 0), width=width, height=height)


def iter_frames(path: Path, wanted: set[int] | None = None) -> Iterator[tuple[int, np.ndarray]]:
    """(index, BGR frame) in decode order; with `wanted`, other frames are skipped without conversion."""
    capture = _open_capture(path)
    last = max(wanted) if wanted else None
    index = 0
    try:
        while last is None or index <= last:
            if wanted is not None and index not in wanted:
                if not capture.grab():
                    break
            else:
                ok, frame = capture.read()
                if not ok:
                    break
                yield index, frame
            index += 1
    finally:
        capture.release()


def sample_frames_at(path: Path, positions: list[int]) -> list[np.ndarray]:
    """Frames near the given indices by seeking (approximate in some codecs; fine for bar detection)."""
    capture = _open_capture(path)
    frames = []
    try:
        for position in positions:
            capture.set(cv2.CAP_PROP_POS_FRAMES, position)
            ok, frame = capture.read()
            if ok:
                frames.append(frame)
        if not frames:
            ok, frame = capture.read()
            if ok:
                frames.append(frame)
    finally:
        capture.release()
    return frames


def _temp_path(path: Path) -> Path:
    return path.with_name(f".{path.stem}.tmp{os.getpid()}{path.suffix}")


def atomic_write_bytes(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temp_path(path)
    tmp.write_bytes(data)
    os.replace(tmp, path)


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def encode_image(image: np.ndarray, ext: str = ".png") -> bytes:
    ok, buffer = cv2.imencode(ext, image)
    if not ok:
        raise MediaError(f"OpenCV could not encode an image as {ext}")
    return buffer.tobytes()


def write_image(path: Path, image: np.ndarray) -> None:
    """Write a BGR image; the extension picks the format (PNG is lossless)."""
    atomic_write_bytes(path, encode_image(image, path.suffix.lower()))


def write_clip(path: Path, frames: list[np.ndarray], fps: float) -> None:
    """An .mp4 (OpenCV mp4v, about 39 dB luma PSNR), a lossless .mkv (FFV1) or, when `path` has no
    suffix, a folder of lossless PNG frames 000.png, 001.png, ..."""
    if not frames:
        raise MediaError(f"{path}: no frames to write")
    if path.suffix == "":
        tmp_dir = path.with_name(f".{path.name}.tmp{os.getpid()}")
        shutil.rmtree(tmp_dir, ignore_errors=True)
        tmp_dir.mkdir(parents=True)
        for i, frame in enumerate(frames):
            (tmp_dir / f"{i:03d}.png").write_bytes(encode_image(frame, ".png"))
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp_dir, path)
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temp_path(path)
    height, width = frames[0].shape[:2]
    codec = "FFV1" if path.suffix.lower() == ".mkv" else "mp4v"
    writer = cv2.VideoWriter(str(tmp), cv2.VideoWriter_fourcc(*codec), float(fps), (width, height))
    if not writer.isOpened():
        raise MediaError(f"{path}: OpenCV cannot open a {codec} writer on this system")
    try:
        for frame in frames:
            writer.write(frame)
    finally:
        writer.release()
    os.replace(tmp, path)


def remove_output(path: Path) -> None:
    """Delete a file or frame folder that this tool wrote earlier."""
    if path.is_dir():
        shutil.rmtree(path)
    elif path.exists():
        path.unlink()

"""Synthetic media with known defects, for the tests and the benchmark (no downloads, seeded).

A scene is a large textured canvas (smooth noise, rectangles, discs and lines); a clip is a window
moving across it. Each defect the filters look for can be switched on: Gaussian or motion blur, noise,
JPEG blocking, camera jitter, a lighting jump, a hard cut to another scene, letterbox bars and a fixed
overlay. Videos are written losslessly (FFV1) so the only defects are the ones asked for.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np


def canvas(seed: int, height: int, width: int) -> np.ndarray:
    """A textured BGR canvas: smooth colour noise plus hard-edged shapes."""
    rng = np.random.default_rng(seed)
    base = rng.integers(40, 215, size=(max(2, height // 12), max(2, width // 12), 3)).astype(np.uint8)
    image = cv2.resize(base, (width, height), interpolation=cv2.INTER_CUBIC)
    for _ in range(max(6, height * width // 600)):
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        x, y = int(rng.integers(0, width)), int(rng.integers(0, height))
        size = int(rng.integers(3, max(4, min(height, width) // 6)))
        shape = int(rng.integers(0, 3))
        if shape == 0:
            cv2.rectangle(image, (x, y), (x + size, y + size // 2 + 2), colour, -1)
        elif shape == 1:
            cv2.circle(image, (x, y), size // 2 + 1, colour, -1)
        else:
            cv2.line(image, (x, y), (x + size, y + int(rng.integers(-size, size))), colour, 1)
    return image


@dataclass
class ClipSpec:
    """What to draw. Sizes in pixels, speeds in pixels per frame."""

    frames: int = 24
    width: int = 96
    height: int = 64
    seed: int = 0
    pan: tuple[float, float] = (1.0, 0.5)
    jitter: float = 0.0  # random camera offset, pixels
    blur_sigma: float = 0.0
    motion_blur: int = 0  # horizontal smear length
    noise_sigma: float = 0.0
    jpeg_quality: int = 0  # 0 = none
    light_jump_at: int = -1  # frame from which brightness changes
    light_delta: float = 45.0
    cut_at: int = -1  # frame from which the content is another scene
    letterbox: int = 0  # bar height at top and bottom
    overlay: bool = False


def _window(scene: np.ndarray, x: float, y: float, width: int, height: int) -> np.ndarray:
    matrix = np.float32([[1, 0, -x], [0, 1, -y]])
    return cv2.warpAffine(scene, matrix, (width, height), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT)


def _apply_defects(frame: np.ndarray, spec: ClipSpec, index: int, rng: np.random.Generator) -> np.ndarray:
    if spec.blur_sigma:
        frame = cv2.GaussianBlur(frame, (0, 0), spec.blur_sigma)
    if spec.motion_blur:
        kernel = np.ones((1, spec.motion_blur), np.float32) / spec.motion_blur
        frame = cv2.filter2D(frame, -1, kernel)
    if 0 <= spec.light_jump_at <= index:
        frame = np.clip(frame.astype(np.float32) + spec.light_delta, 0, 255).astype(np.uint8)
    if spec.overlay:
        x0, y0 = spec.width - 43, spec.letterbox + 5
        cv2.rectangle(frame, (x0, y0), (x0 + 34, y0 + 14), (255, 255, 255), -1)
        cv2.putText(frame, "WM", (x0 + 4, y0 + 12), cv2.FONT_HERSHEY_SIMPLEX, 0.4, (0, 0, 0), 1)
    if spec.noise_sigma:
        frame = np.clip(frame + rng.normal(0, spec.noise_sigma, frame.shape), 0, 255).astype(np.uint8)
    if spec.jpeg_quality:
        _, data = cv2.imencode(".jpg", frame, [cv2.IMWRITE_JPEG_QUALITY, spec.jpeg_quality])
        frame = cv2.imdecode(data, cv2.IMREAD_COLOR)
    if spec.letterbox:
        frame = frame.copy()
        frame[: spec.letterbox] = 0
        frame[-spec.letterbox:] = 0
    return frame


def make_clip(spec: ClipSpec) -> list[np.ndarray]:
    """BGR frames [H, W, 3] for the spec."""
    rng = np.random.default_rng(spec.seed + 1000)
    pad = int(max(abs(spec.pan[0]), abs(spec.pan[1])) * spec.frames + 4 * spec.jitter + 8)
    scenes = [canvas(spec.seed + k * 7919, spec.height + 2 * pad, spec.width + 2 * pad) for k in range(2)]
    frames = []
    for i in range(spec.frames):
        scene = scenes[1] if 0 <= spec.cut_at <= i else scenes[0]
        jx, jy = rng.uniform(-spec.jitter, spec.jitter, 2) if spec.jitter else (0.0, 0.0)
        x = pad + spec.pan[0] * i + jx - (pad if spec.pan[0] > 0 else 0)
        y = pad + spec.pan[1] * i + jy - (pad if spec.pan[1] > 0 else 0)
        frame = _window(scene, x + 4, y + 4, spec.width, spec.height)
        frames.append(_apply_defects(frame, spec, i, rng))
    return frames


def make_image(seed: int = 0, width: int = 96, height: int = 64, **defects) -> np.ndarray:
    """One still: the first frame of a clip with those defects."""
    return make_clip(ClipSpec(frames=1, width=width, height=height, seed=seed, pan=(0.0, 0.0), **defects))[0]


def write_lossless_video(path: Path, frames: list[np.ndarray], fps: float = 24.0) -> Path:
    """Write FFV1 in .mkv or .avi (lossless, so the defects are exactly the drawn ones)."""
    return write_video(path, frames, fps, "FFV1")


def write_video(path: Path, frames: list[np.ndarray], fps: float, fourcc: str) -> Path:
    """BGR frames to a video file with OpenCV's `fourcc` encoder (FFV1 lossless, mp4v for .mp4)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    height, width = frames[0].shape[:2]
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*fourcc), float(fps), (width, height))
    if not writer.isOpened():
        raise RuntimeError(f"{path}: OpenCV has no {fourcc} writer here")
    for frame in frames:
        writer.write(frame)
    writer.release()
    return path

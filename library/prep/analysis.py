"""Scoring one source: an image becomes one item, a video becomes one item per cut-aware clip window.

An item is a plain JSON-ready dict (it is cached in the state file and copied into the report):
  kind      "image", "clip" or "source" (a source that gave no item: unreadable, too short)
  source    absolute path of the raw file; index (clip ordinal in its source); start / indices
  crop      content box after bar removal [x0, y0, x1, y1]; size (source W, H); out_size (W, H)
  scores    metric -> value (see quality.py); phash (hex); thumb (base64 JPEG); reasons (hard failures)
Sharpness and motion blur are measured on the frame as it will be written (output size), noise and
blockiness on the cropped source pixels, shake / lighting / overlay on small grey frames of every
source frame the clip covers.
"""

from __future__ import annotations

import base64
import logging
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from . import quality
from .media import MediaError, iter_frames, probe_video, read_image, sample_frames_at
from .scenes import ClipWindow, SceneClipper
from .standardize import CropBox, detect_bars, output_size, resize_cover, scale_to_short_side

logger = logging.getLogger(__name__)

ANALYSIS_SHORT_SIDE = 160  # clip-level metrics run on frames this small
THUMB_WIDTH = 128
OVERLAY_FRAMES = 24  # at most this many frames for the overlay test
BAR_SAMPLES = 8
SEQUENTIAL_BAR_FRAMES = 240  # up to this length, bar samples are decoded in order rather than sought


@dataclass(frozen=True)
class AnalysisSettings:
    """Everything that changes the scores or the clip windows (its repr keys the analysis cache)."""

    resolution: int = 512
    square: bool = True
    frames: int = 17
    target_fps: float = 24.0
    crop_bars: bool = True
    cut_threshold: float = 0.5
    cut_margin: int = 2
    clip_gap: int = 0
    max_clips_per_video: int = 0


def thumbnail_b64(frame: np.ndarray) -> str:
    height, width = frame.shape[:2]
    small = cv2.resize(frame, (THUMB_WIDTH, max(1, round(height * THUMB_WIDTH / width))), interpolation=cv2.INTER_AREA)
    ok, data = cv2.imencode(".jpg", small, [cv2.IMWRITE_JPEG_QUALITY, 80])
    return base64.b64encode(data.tobytes()).decode("ascii") if ok else ""


def _frame_scores(native_grey: np.ndarray, out_w: int, out_h: int, with_motion_blur: bool) -> tuple[dict, np.ndarray]:
    """Per-frame metrics and the output-scale grey frame."""
    out_grey = resize_cover(native_grey, out_w, out_h)
    scores = {
        "sharpness": quality.sharpness(out_grey),
        "noise": quality.noise_sigma(native_grey),
        "blockiness": quality.blockiness(native_grey),
    }
    if with_motion_blur:
        scores["motion_blur"] = quality.motion_blur(out_grey)
    return scores, out_grey


def _base_item(kind: str, source: Path, crop: CropBox, size: tuple[int, int], settings: AnalysisSettings) -> dict:
    out_w, out_h = output_size(crop.width, crop.height, settings.resolution, settings.square)
    return {"kind": kind, "source": str(source), "crop": crop.as_list(), "size": list(size),
            "out_size": [out_w, out_h], "reasons": [],
            "scores": {"resolution_scale": round(min(crop.width / out_w, crop.height / out_h), 4)}}


def source_failure(source: Path, reason: str) -> dict:
    """The item for a source that yields nothing (listed in the report as dropped)."""
    return {"kind": "source", "source": str(source), "reasons": [reason], "scores": {}, "thumb": ""}


def analyse_image(path: Path, settings: AnalysisSettings) -> list[dict]:
    image = read_image(path)
    height, width = image.shape[:2]
    crop = detect_bars([image]) if settings.crop_bars else CropBox(0, 0, width, height)
    item = _base_item("image", path, crop, (width, height), settings)
    content = crop.apply(image)
    scores, out_grey = _frame_scores(quality.to_grey(content), *item["out_size"], with_motion_blur=False)
    item["scores"].update({k: round(v, 4) for k, v in scores.items()})
    item["phash"] = f"{quality.phash(out_grey):016x}"
    item["thumb"] = thumbnail_b64(content)
    return [item]


def _median(values: list[float]) -> float:
    return round(float(np.median(values)), 4)


def _clip_item(window: ClipWindow, ordinal: int, buffer: dict, base: dict, fps: float) -> dict:
    """Score one clip window from the buffered frames: {index: (small BGR, cropped native grey)}."""
    item = {**base, "scores": dict(base["scores"]), "reasons": []}
    item.update({"index": ordinal, "start": window.start, "indices": list(window.indices), "source_fps": fps})
    out_w, out_h = item["out_size"]
    positions = sorted({window.indices[0], window.indices[len(window.indices) // 2], window.indices[-1]})
    per_frame, middle_grey = [], None
    for position in positions:
        scores, out_grey = _frame_scores(buffer[position][1], out_w, out_h, with_motion_blur=True)
        per_frame.append(scores)
        if position == window.indices[len(window.indices) // 2]:
            middle_grey = out_grey
    for name in per_frame[0]:
        item["scores"][name] = _median([s[name] for s in per_frame])
    greys = [quality.to_grey(buffer[i][0]) for i in range(window.start, window.end + 1)]
    item["scores"]["shake"] = round(quality.shake(greys), 4)
    item["scores"]["lighting_jump"] = round(quality.lighting_jump(greys), 4)
    pick = np.linspace(0, len(greys) - 1, min(len(greys), OVERLAY_FRAMES)).round().astype(int)
    overlay = quality.static_overlay([greys[i] for i in pick])
    item["scores"]["overlay"] = None if overlay is None else round(overlay, 4)
    item["phash"] = f"{quality.phash(middle_grey):016x}"
    item["thumb"] = thumbnail_b64(buffer[window.indices[len(window.indices) // 2]][0])
    return item


def _video_crop(path: Path, frame_count: int, width: int, height: int, crop_bars: bool) -> CropBox:
    if not crop_bars:
        return CropBox(0, 0, width, height)
    positions = [int(p) for p in np.linspace(0, max(0, frame_count - 1), BAR_SAMPLES)] if frame_count else [0]
    if frame_count <= SEQUENTIAL_BAR_FRAMES:  # decoding a short video beats seeking in it
        frames = [frame for _, frame in iter_frames(path, wanted=set(positions))]
    else:
        frames = sample_frames_at(path, positions)
    if not frames:
        raise MediaError(f"{path}: no frame could be decoded")
    return detect_bars(frames)


def analyse_video(path: Path, settings: AnalysisSettings) -> list[dict]:
    """Stream the video once: find cuts, emit windows, score each from a small rolling buffer."""
    info = probe_video(path)
    crop = _video_crop(path, info.frame_count, info.width, info.height, settings.crop_bars)
    base = _base_item("clip", path, crop, (info.width, info.height), settings)
    clipper = SceneClipper(settings.frames, info.fps, settings.target_fps, settings.cut_threshold,
                           settings.cut_margin, settings.clip_gap, settings.max_clips_per_video)
    buffer: dict[int, tuple[np.ndarray, np.ndarray]] = {}
    items: list[dict] = []
    last = -1
    for index, frame in iter_frames(path):
        content = crop.apply(frame)
        buffer[index] = (scale_to_short_side(content, ANALYSIS_SHORT_SIDE), quality.to_grey(content))
        for window in clipper.push(index, buffer[index][0]):
            items.append(_clip_item(window, len(items), buffer, base, info.fps))
        for old in [i for i in buffer if i < clipper.earliest_needed]:
            del buffer[old]
        last = index
    if last < 0:
        raise MediaError(f"{path}: no frame could be decoded")
    for window in clipper.finish(last):
        items.append(_clip_item(window, len(items), buffer, base, info.fps))
    if not items:
        need = clipper.span
        reason = (f"too short: no cut-free stretch of {need} source frames ({settings.frames} frames at "
                  f"{settings.target_fps:g} fps from {info.fps:g} fps); {last + 1} frames, cuts at {clipper.cuts}")
        return [source_failure(path, reason)]
    for item in items:
        item["cuts"] = list(clipper.cuts)
    return items


def analyse_source(path: Path, kind: str, settings: AnalysisSettings) -> list[dict]:
    """Items for one source; an unreadable source becomes one failure item instead of an exception."""
    try:
        return analyse_image(path, settings) if kind == "image" else analyse_video(path, settings)
    except MediaError as error:
        logger.warning("%s", error)
        return [source_failure(path, f"unreadable: {error}")]

"""Writing the kept items: crop the bars, resize + centre crop, optional colour normalisation, save.

Clips are re-read from their source in one sequential pass per video, holding only the frames of the
clips not written yet; each clip is written as soon as its last frame is decoded. Sidecar captions of
a source (`NAME.txt` next to it, or `captions/NAME.txt` beside its folder) seed the caption of every
item made from it, but an existing caption is never touched: it may hold a user's edits.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import numpy as np

from .media import iter_frames, read_image, write_clip, write_image
from .standardize import CropBox, fit_color_transform, resize_cover

logger = logging.getLogger(__name__)


def _standardize(frames: list[np.ndarray], item: dict, color_normalize: bool) -> list[np.ndarray]:
    crop = CropBox(*item["crop"])
    out_w, out_h = item["out_size"]
    frames = [resize_cover(crop.apply(f), out_w, out_h) for f in frames]
    if color_normalize:
        transform = fit_color_transform(frames)
        frames = [transform.apply(f) for f in frames]
    return frames


def write_image_item(item: dict, target: Path, color_normalize: bool) -> None:
    write_image(target, _standardize([read_image(Path(item["source"]))], item, color_normalize)[0])


def write_clips_of_source(source: Path, jobs: list[tuple[dict, Path]], fps: float, color_normalize: bool) -> int:
    """Write every (clip item, target) of one video in a single decode pass; returns how many were written."""
    pending = sorted(jobs, key=lambda job: job[0]["start"])
    wanted = {i for item, _ in pending for i in item["indices"]}
    frames: dict[int, np.ndarray] = {}
    written = 0
    for index, frame in iter_frames(source, wanted=wanted):
        frames[index] = frame
        while pending and pending[0][0]["indices"][-1] <= index:
            item, target = pending.pop(0)
            clip = _standardize([frames[i] for i in item["indices"]], item, color_normalize)
            write_clip(target, clip, fps)
            written += 1
        keep_from = min((job[0]["start"] for job in pending), default=index + 1)
        for old in [i for i in frames if i < keep_from]:
            del frames[old]
    for item, target in pending:
        logger.warning("%s: the video ended before frame %d; %s not written", source, item["indices"][-1], target)
    return written


def sidecar_caption(source: Path, extension: str = ".txt") -> Path | None:
    """A caption the user already has for a raw source, if any."""
    for candidate in (source.with_suffix(extension), source.parent.parent / "captions" / f"{source.stem}{extension}"):
        if candidate.is_file():
            return candidate
    return None


def seed_caption(source: Path, target: Path, extension: str = ".txt") -> bool:
    """Copy the source's sidecar caption to `target` unless `target` exists; True when copied."""
    if target.exists():
        return False
    caption = sidecar_caption(source, extension)
    if caption is None:
        return False
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.tmp")
    shutil.copyfile(caption, tmp)
    tmp.replace(target)
    return True

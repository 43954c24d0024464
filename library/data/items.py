"""Enumerating a dataset's items: media files, their captions, frame windows, buckets and item keys.

One function, `enumerate_dataset`, turns a `DatasetSpec` into `MediaItem`s plus `Skip`s (with the file
and the reason) for everything unusable. The caching tools and the training datasets both call it, so
they always agree on what the items are. Item keys are `stem_WxH` for images and
`stem_START-COUNT_WxH` for video windows (START and COUNT in frames at the target fps): stable across
runs, so caches are reused.

Caption sources, in order: `NAME.txt` beside the media (sd-scripts), `captions/NAME.txt` in the media
folder's parent or in the media folder (the training guide's `images/` + `captions/` layout), and the
`caption` field of a JSONL line.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, replace
from pathlib import Path

from .buckets import resolution_problem, select_bucket
from .conditions import ConditionFinder
from .control import attach_controls
from .dataset_config import DatasetConfigError, DatasetSpec, round_frames
from .one_frame import is_one_frame
from .video_io import (VIDEO_EXTENSIONS, MediaError, frame_files, is_image_file, is_video_source, missing_reason, probe,
                       resample_indices)

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class MediaItem:
    """One training item: an image, or one frame window of a video, in one bucket."""

    key: str
    media_path: Path
    is_image: bool
    caption: str
    caption_source: str  # caption file, or "file.jsonl:LINE"
    frames: tuple[int, ...]  # source frame indices at the target fps; (0,) for an image
    bucket: tuple[int, int, int]  # (W, H, F)
    fps: float | None  # target fps of a video window
    conditions: tuple[tuple[str, Path], ...] = ()  # VACE: ("control" | "mask" | "reference", file), see conditions.py
    control_path: Path | None = None  # Fun-Control: the control video / image of this item (data/control.py)


@dataclass(frozen=True)
class Skip:
    """Something that could not become an item, and why."""

    path: str
    reason: str
    dataset: str = ""
    key: str | None = None

    def __str__(self) -> str:
        return f"{self.path}: {self.reason}"


class CaptionError(ValueError):
    pass


def read_caption(path: Path) -> str:
    """A caption file's text (UTF-8, BOM tolerated), stripped; raises CaptionError when unusable."""
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise CaptionError(f"caption {path} is not UTF-8 text ({exc.reason} at byte {exc.start}); "
                           "re-save it as UTF-8") from None
    text = text.strip()
    if not text:
        raise CaptionError(f"caption {path} is empty; write a caption (empty captions are added by "
                           "caption_dropout_rate, not by empty files)")
    return text


def caption_candidates(media: Path, extension: str) -> list[Path]:
    name = (media.name if media.is_dir() else media.stem) + extension
    return [media.parent / name, media.parent.parent / "captions" / name, media.parent / "captions" / name]


def find_caption(media: Path, extension: str) -> tuple[str, str]:
    """(caption, caption file) for a media file of a directory dataset."""
    candidates = caption_candidates(media, extension)
    for path in candidates:
        if path.is_file():
            return read_caption(path), str(path)
    raise CaptionError(f"missing caption: none of {', '.join(str(p) for p in candidates)} exists")


def _directory_sources(spec: DatasetSpec, skips: list[Skip]) -> list[tuple[Path, str | None, str]]:
    """(media, caption or None, caption source) for a directory dataset, in name order; a media name that
    is a dangling symbolic link becomes a skip (never a silent omission)."""
    if not spec.source.is_dir():
        state = "is a file, not a directory" if spec.source.exists() else "does not exist"
        raise MediaError(f"{spec.where()}: directory {spec.source} {state}")
    out = []
    for path in sorted(spec.source.iterdir()):
        wanted = is_image_file(path) if spec.kind == "image" else path.suffix.lower() in VIDEO_EXTENSIONS
        if wanted and path.is_symlink() and not path.exists():
            skips.append(Skip(str(path), missing_reason(path), spec.where()))
        elif spec.kind == "image" and path.is_file() and is_image_file(path):
            out.append((path, None, ""))
        elif spec.kind == "video" and path.is_file() and is_video_source(path):
            out.append((path, None, ""))
        elif spec.kind == "video" and path.is_dir() and path.name != "captions" and frame_files(path):
            out.append((path, None, ""))
    return out


def _jsonl_sources(spec: DatasetSpec, skips: list[Skip]) -> list[tuple[Path, str | None, str]]:
    """(media, caption, 'file:line') per usable JSONL line; bad lines become skips."""
    if not spec.source.is_file():
        raise MediaError(f"{spec.where()}: JSONL file {spec.source} does not exist")
    key = "image_path" if spec.kind == "image" else "video_path"
    out = []
    lines = spec.source.read_text(encoding="utf-8", errors="replace").splitlines()
    for number, line in enumerate(lines, start=1):
        where = f"{spec.source}:{number}"
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            skips.append(Skip(where, f"line {number} is not valid JSON ({exc.msg})", spec.where()))
            continue
        if not isinstance(record, dict) or not isinstance(record.get(key), str):
            skips.append(Skip(where, f"line {number} has no {key!r} string", spec.where()))
            continue
        media = Path(record[key]).expanduser()
        media = media if media.is_absolute() else spec.source.parent / media
        if not media.exists():
            skips.append(Skip(where, f"line {number} names {media}, which does not exist", spec.where()))
            continue
        caption = record.get("caption")
        if not isinstance(caption, str) or not caption.strip():
            skips.append(Skip(str(media), f"empty or missing caption at {where}", spec.where()))
            continue
        out.append((media, caption.strip(), where))
    return out


def frame_windows(length: int, spec: DatasetSpec) -> list[tuple[int, int]]:
    """(start, count) windows over `length` frames (at the target fps) for the extraction mode."""
    if spec.frame_extraction == "full":
        count = round_frames(min(length, spec.max_frames))
        return [(0, count)] if length >= 1 else []
    windows = []
    for count in spec.target_frames:
        if count > length:
            continue
        if spec.frame_extraction == "head":
            starts = [0]
        elif spec.frame_extraction == "chunk":
            starts = list(range(0, length - count + 1, count))
        elif spec.frame_extraction == "slide":
            starts = list(range(0, length - count + 1, spec.frame_stride))
        else:  # uniform
            last, n = length - count, spec.frame_sample
            # n starts spread evenly over [0, last], rounded half up
            starts = sorted({(2 * i * last + n - 1) // (2 * (n - 1)) for i in range(n)}) if n > 1 else [0]
        windows.extend((s, count) for s in starts)
    return windows


def _items_for(media: Path, caption: str, caption_source: str, spec: DatasetSpec, step: int,
               model_fps: float) -> list[MediaItem]:
    """Every item one media file yields (raises MediaError when it yields none)."""
    info = probe(media)
    name = media.name if media.is_dir() else media.stem
    bucket_wh = select_bucket(info.width, info.height, spec.resolution, step, enable_bucket=spec.enable_bucket,
                              no_upscale=spec.bucket_no_upscale, name=str(media))
    size = f"{bucket_wh[0]}x{bucket_wh[1]}"
    if spec.kind == "image":
        return [MediaItem(f"{name}_{size}", media, True, caption, caption_source, (0,), (*bucket_wh, 1), None)]
    source_fps = spec.source_fps or info.fps
    target_fps = spec.target_fps or model_fps
    if source_fps is None:
        target_fps = None  # a frame folder without source_fps: frames are taken as they are
    indices = resample_indices(info.frame_count, source_fps, target_fps)
    windows = frame_windows(len(indices), spec)
    if not windows:
        rate = f" at {target_fps:g} fps ({info.frame_count} source frames at {source_fps:g} fps)" if target_fps else ""
        raise MediaError(f"{media}: {len(indices)} frames{rate}, shorter than the smallest target frame "
                         f"count {min(spec.target_frames)}; use a longer clip or smaller target_frames")
    return [MediaItem(f"{name}_{start:05d}-{count:03d}_{size}", media, False, caption, caption_source,
                      tuple(indices[start:start + count]), (*bucket_wh, count), target_fps)
            for start, count in windows]


def captioned_sources(spec: DatasetSpec) -> tuple[list[tuple[Path, str, str]], list[Skip]]:
    """(media, caption, caption source) for every source with a usable caption; skips with reasons.
    Reads captions only (no media decoding): the text cacher needs nothing more."""
    skips: list[Skip] = []
    sources = _jsonl_sources(spec, skips) if spec.jsonl else _directory_sources(spec, skips)
    out: list[tuple[Path, str, str]] = []
    names: dict[str, Path] = {}
    for media, caption, caption_source in sources:
        name = media.name if media.is_dir() else media.stem
        if name in names:
            skips.append(Skip(str(media), f"has the same name as {names[name]}: their caches would collide; "
                                          "rename one", spec.where()))
            continue
        names[name] = media
        if caption is None:
            try:
                caption, caption_source = find_caption(media, spec.caption_extension)
            except CaptionError as exc:
                skips.append(Skip(str(media), str(exc), spec.where()))
                continue
        out.append((media, caption, caption_source))
    return out, skips


def enumerate_dataset(spec: DatasetSpec, step: int, model_fps: float) -> tuple[list[MediaItem], list[Skip]]:
    """All usable items of one dataset, and the skipped sources with reasons (in name order). Raises
    DatasetConfigError for a `resolution` the task's bucket step cannot honour."""
    problem = resolution_problem(spec.resolution, step)
    if problem is not None:
        raise DatasetConfigError(f"{spec.where()}: {problem}")
    sources, skips = captioned_sources(spec)
    items: list[MediaItem] = []
    one_frame = is_one_frame(spec)  # its control images are matched by one_frame.py (several per image)
    conditions = None if one_frame else ConditionFinder(spec)
    for media, caption, caption_source in sources:
        try:
            found = () if conditions is None else conditions.find(media)
            items.extend(replace(item, conditions=found)
                         for item in _items_for(media, caption, caption_source, spec, step, model_fps))
        except MediaError as exc:
            message = str(exc)
            reason = message[len(str(media)) + 2:] if message.startswith(f"{media}: ") else message
            skips.append(Skip(str(media), reason, spec.where()))
    if one_frame:
        return items, skips
    items, missing = attach_controls(spec, items)  # Fun-Control: control_directory / JSONL control_path
    skips.extend(Skip(path, reason, spec.where()) for path, reason in missing)
    return items, skips

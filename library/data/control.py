"""Fun-Control control media: which control video or image belongs to each item, reading it with the item's
frames and crop, and the control part of a latent cache.

Matching follows musubi-tuner's dataset config (`control_directory`, JSONL `control_path`):
- video directory datasets: `control_directory/NAME.ext` with the clip's own file name, else a folder of
  frames `control_directory/STEM`, else `control_directory/STEM.<any video extension>`;
- image directory datasets: `control_directory/STEM.<image extension>`, else `STEM_N.<ext>` with the smallest
  N (a name that is itself another image's stem belongs to that image);
- JSONL datasets: the `control_path` field of each line (relative paths from the JSONL file's folder); once
  one line has it, every line needs it.
An item whose control is missing is skipped with the paths that were tried (musubi-tuner stops instead).

The control is read at the clip's own source frame indices (so it must run at the clip's frame rate; a
shorter control repeats its last frame, as musubi-tuner pads it), resized and centre-cropped to the item's
bucket exactly like the clip. A still control image serves every frame. Its latents are cached as
`control_latents` beside the clip's `latents`, with the control file's fingerprint in the metadata.
"""

from __future__ import annotations

import json
import re
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from . import cache
from .dataset_config import DatasetConfigError, DatasetSpec
from .video_io import (IMAGE_EXTENSIONS, VIDEO_EXTENSIONS, MediaError, frame_files, is_image_file, load_image, probe,
                       read_video_frames, resize_and_crop)

CONTROL_KEY = "control_latents"


def _video_control(folder: Path, media: Path) -> tuple[Path | None, list[Path]]:
    stem = media.name if media.is_dir() else media.stem
    tried = [folder / media.name, folder / stem]
    tried += [folder / (stem + ext) for ext in VIDEO_EXTENSIONS if folder / (stem + ext) != tried[0]]
    if tried[0].exists():
        return tried[0], tried
    if tried[1].is_dir() and frame_files(tried[1]):
        return tried[1], tried
    return next((p for p in tried[2:] if p.is_file()), None), tried


def _image_control(folder: Path, media: Path, stems: set[str]) -> tuple[Path | None, list[Path]]:
    stem = media.stem
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS) \
        if folder.is_dir() else []
    exact = [p for p in files if p.stem == stem]
    if exact:
        return exact[0], exact
    numbered = [(int(m.group(1)), p) for p in files
                if (m := re.fullmatch(re.escape(stem) + r"_(\d+)", p.stem)) and p.stem not in stems]
    tried = [folder / f"{stem}.<image>", folder / f"{stem}_<N>.<image>"]
    return (min(numbered)[1] if numbered else None), tried


def _jsonl_controls(spec: DatasetSpec) -> dict[int, object]:
    """{line number: the line's control_path value} for the lines that have one."""
    found = {}
    for number, line in enumerate(spec.source.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
        try:
            record = json.loads(line) if line.strip() else None
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict) and "control_path" in record:
            found[number] = record["control_path"]
    return found


def _jsonl_control(spec: DatasetSpec, controls: dict[int, object], item) -> tuple[Path | None, str]:
    number = int(item.caption_source.rsplit(":", 1)[1])
    value = controls.get(number)
    if not isinstance(value, str) or not value:
        return None, (f"line {number} of {spec.source} has no control_path string, but other lines have one: "
                      "give every line its control_path")
    path = Path(value).expanduser()
    path = path if path.is_absolute() else spec.source.parent / path
    return (path, "") if path.exists() else (None, f"its control_path {path} (line {number}) does not exist")


def attach_controls(spec: DatasetSpec, items: list) -> tuple[list, list[tuple[str, str]]]:
    """The items (`items.MediaItem`) with their `control_path` set when the dataset names controls, and
    (source, reason) for each source whose control is missing (its items are left out)."""
    controls = _jsonl_controls(spec) if spec.jsonl else {}
    if spec.control_directory is None and not controls:
        return items, []
    if spec.control_directory is not None and not spec.control_directory.is_dir():
        state = "is a file, not a folder" if spec.control_directory.exists() else "does not exist"
        raise MediaError(f"{spec.where()}: control_directory {spec.control_directory} {state}")
    stems = {item.media_path.stem for item in items}
    kept, found, missing, skips = [], {}, set(), []
    for item in items:
        if item.media_path not in found and item.media_path not in missing:
            if spec.jsonl:
                path, reason = _jsonl_control(spec, controls, item)
            else:
                match = _image_control if spec.kind == "image" else _video_control
                path, tried = (match(spec.control_directory, item.media_path, stems) if spec.kind == "image"
                               else match(spec.control_directory, item.media_path))
                reason = "no control in control_directory: tried " + ", ".join(str(p) for p in tried)
            if path is None:
                missing.add(item.media_path)
                skips.append((str(item.media_path), reason))
                continue
            found[item.media_path] = path
        if item.media_path in found:
            kept.append(replace(item, control_path=found[item.media_path]))
    return kept, skips


def require_controls(spec: DatasetSpec, items: list, task: str) -> None:
    """A Fun-Control task trains on control videos: a dataset that names none is an error."""
    if items and all(item.control_path is None for item in items):
        key = "a `control_path` on every line of the JSONL file" if spec.jsonl else "`control_directory`"
        raise DatasetConfigError(f"{spec.where()}: task {task} (Fun-Control) trains on control videos, and this "
                                 f"dataset names none: add {key} (see README, Fun-Control)")


def load_control_pixels(item) -> torch.Tensor:
    """The item's control, read with its frames and crop -> [3, F, H, W] float32 in [-1, 1]."""
    width, height, count = item.bucket
    path = item.control_path
    if path is None:
        raise MediaError(f"{item.media_path}: no control video or image for this item")
    if is_image_file(path):  # a still control serves every frame
        frames = np.repeat(resize_and_crop(load_image(path), (width, height))[None], count, axis=0)
    else:
        info = probe(path)
        if not item.is_image and info.fps and item.fps:
            clip_fps = probe(item.media_path).fps
            if clip_fps and abs(info.fps - clip_fps) > 1e-2:
                raise MediaError(f"{item.media_path}: its control {path} runs at {info.fps:g} fps and the clip at "
                                 f"{clip_fps:g} fps; the control is read at the clip's frames: re-encode it at "
                                 f"{clip_fps:g} fps")
        last = info.frame_count - 1  # a shorter control repeats its last frame (as musubi-tuner pads it)
        frames = read_video_frames(path, [min(i, last) for i in item.frames], (width, height))
    video = torch.from_numpy(np.ascontiguousarray(frames)).permute(3, 0, 1, 2)  # [3, F, H, W] uint8
    return video.float().div_(127.5).sub_(1.0)


def control_metadata(item) -> dict[str, str]:
    """What a latent cache records about the control it was made from."""
    return {"control_path": str(item.control_path),
            "control_fingerprint": json.dumps(cache.source_fingerprint(item.control_path), sort_keys=True)}


def control_cache_problem(path: Path, item) -> str | None:
    """Why a latent cache that is otherwise fresh lacks the item's current control latents, else None."""
    meta = cache.read_metadata(path) or {}
    if CONTROL_KEY not in meta.get("__keys__", "").split(","):
        return "has no control_latents (cached for a task without control videos): cache again with the Fun task"
    if meta.get("control_path") != str(item.control_path):
        return f"control changed (cached {meta.get('control_path')}, now {item.control_path})"
    if not cache.source_matches(json.loads(meta.get("control_fingerprint", "{}")), item.control_path):
        return f"control {item.control_path} changed since it was cached"
    return None

"""The prepared dataset's layout: output names, the state file that makes reruns idempotent, the TOML.

Layout (the training guide's step 5):
  <out>/images/NAME.png            stills
  <out>/videos/NAME_cKKK.mp4       clips (K = the window's ordinal in its source; or .mkv, or a folder
                                   of PNG frames)
  <out>/captions/NAME.txt          one caption per item, never overwritten here
  <out>/dataset.toml               musubi-schema dataset config for the folders above
  <out>/report.json, report.html   every input with scores and the decision
  <out>/.prepare_state.json        source fingerprints, cached scores and what this tool wrote
NAME comes from the path below the input folder ("a/b.mp4" -> "a__b"); a name two sources would share
gets a short hash of the full path, so names depend only on the inputs.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from pathlib import Path

from .media import atomic_write_text

logger = logging.getLogger(__name__)

STATE_NAME = ".prepare_state.json"
STATE_FORMAT = 1
VIDEO_SUFFIX = {"mp4": ".mp4", "mkv": ".mkv", "png": ""}


def source_stems(sources: list[tuple[Path, Path]]) -> dict[str, str]:
    """{absolute source path: output stem}, unique (case-insensitively) across images and videos."""
    stems: dict[str, str] = {}
    taken: set[str] = set()
    for root, path in sorted(sources, key=lambda rp: str(rp[1])):
        relative = path.relative_to(root).with_suffix("")
        stem = re.sub(r"[^A-Za-z0-9._-]+", "_", "__".join(relative.parts)).strip("._") or "item"
        if stem.lower() in taken:
            stem = f"{stem}_{hashlib.sha1(str(path.resolve()).encode()).hexdigest()[:8]}"
        taken.add(stem.lower())
        stems[str(path.resolve())] = stem
    return stems


def item_stem(item: dict, stem: str) -> str:
    return f"{stem}_c{item['index']:03d}" if item["kind"] == "clip" else stem


def output_path(item: dict, stem: str, video_format: str, image_format: str = "png") -> str:
    """Path of the prepared file relative to the output folder."""
    if item["kind"] == "clip":
        return f"videos/{item_stem(item, stem)}{VIDEO_SUFFIX[video_format]}"
    return f"images/{stem}.{image_format}"


def caption_path(item: dict, stem: str, extension: str = ".txt") -> str:
    return f"captions/{item_stem(item, stem)}{extension}"


def settings_key(settings: object) -> str:
    """A short, stable digest of a frozen settings dataclass."""
    return hashlib.sha1(repr(settings).encode()).hexdigest()[:16]


def fingerprint(path: Path) -> list[int]:
    stat = path.stat()
    return [stat.st_size, stat.st_mtime_ns]


def load_state(output_dir: Path) -> dict:
    """The previous run's state, or an empty one (a damaged file is ignored with a warning)."""
    path = output_dir / STATE_NAME
    empty = {"format": STATE_FORMAT, "sources": {}, "written": {}}
    if not path.is_file():
        return empty
    try:
        state = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        logger.warning("%s is damaged (%s); everything will be analysed again", path, error)
        return empty
    if state.get("format") != STATE_FORMAT:
        return empty
    return state


def save_state(output_dir: Path, state: dict) -> None:
    atomic_write_text(output_dir / STATE_NAME, json.dumps(state, indent=1, sort_keys=True))


def _toml_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    return json.dumps(str(value))  # a TOML basic string is a JSON string


def dataset_toml(output_dir: Path, resolution: tuple[int, int], frames: int, has_images: bool, has_videos: bool,
                 batch_size: int = 1, caption_extension: str = ".txt", square: bool = True, fps: float = 24.0) -> str:
    """A musubi-schema dataset TOML for the prepared folders (captions in <out>/captions/).

    `source_fps` states the clips' fps, so a loader training a model of another fps can resample them.
    """
    out = output_dir.resolve()
    general = {"resolution": list(resolution), "caption_extension": caption_extension, "batch_size": batch_size,
               "enable_bucket": not square, "bucket_no_upscale": not square}
    lines = ["# Written by tools/prepare_dataset.py. Captions live in captions/ beside images/ and videos/.",
             "", "[general]"] + [f"{k} = {_toml_value(v)}" for k, v in general.items()]
    if has_images:
        lines += ["", "[[datasets]]", f"image_directory = {_toml_value((out / 'images').as_posix())}",
                  f"cache_directory = {_toml_value((out / 'cache' / 'images').as_posix())}"]
    if has_videos:
        lines += ["", "[[datasets]]", f"video_directory = {_toml_value((out / 'videos').as_posix())}",
                  f"cache_directory = {_toml_value((out / 'cache' / 'videos').as_posix())}",
                  f"target_frames = [{frames}]", 'frame_extraction = "head"', f"source_fps = {float(fps)!r}"]
    return "\n".join(lines) + "\n"

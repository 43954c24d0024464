"""VACE conditioning media of a dataset: control video, mask and reference image per item, and their pixels.

Dataset TOML keys (each optional, per dataset): `control_directory` (musubi-tuner's name), `mask_directory`
and `reference_directory`. Each holds files named like the media (`clip01.mp4` -> `clip01.mp4` /
`clip01.png` / a frame folder `clip01/`): the control video (frames taken at the item's own frame indices,
resized and cropped like the item), the mask (a video, a frame folder, or one image for every frame;
white = generate, black = keep) and one reference image (any size: letterboxed onto a white canvas).
JSONL lines name them with `control_path`, `mask_path` and `reference_path` (DiffSynth-Studio's
`vace_video`, `vace_video_mask` and `vace_reference_image` are read too); relative paths are relative to
the JSONL file. A named file that does not exist skips the item with the reason. Within one dataset either
every item has a reference image or none does (a batch stacks the same number of reference frames).
Fun-Control tasks use the reference image the same way for `ref_conv` (fun_reference.py).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from .dataset_config import DatasetSpec
from .video_io import MediaError, frame_files, is_image_file, is_video_source, load_image, read_video_frames, \
    resize_and_crop

ROLES = ("control", "mask", "reference")
JSONL_KEYS = {"control": ("control_path", "vace_video"), "mask": ("mask_path", "vace_video_mask"),
              "reference": ("reference_path", "vace_reference_image")}


def _index(folder: Path | None) -> dict[str, list[Path]]:
    """{name: entries} of a conditioning folder: files by stem, frame folders by name (read once)."""
    index: dict[str, list[Path]] = {}
    if folder is not None and folder.is_dir():
        for path in sorted(folder.iterdir()):
            index.setdefault(path.name if path.is_dir() else path.stem, []).append(path)
    return index


def _matching(entries: list[Path], role: str) -> Path | None:
    """The entry usable for `role`: a frame folder (not for references), an image, or a video."""
    for path in entries:
        if path.is_dir():
            if role != "reference" and frame_files(path):
                return path
        elif is_image_file(path) or (role != "reference" and is_video_source(path)):
            return path
    return None


class ConditionFinder:
    """Finds each media file's VACE conditioning files for one dataset (a directory or JSONL dataset)."""

    def __init__(self, spec: DatasetSpec):
        self.spec = spec
        self.folders = {role: getattr(spec, f"{role}_directory") for role in ROLES}
        for role, folder in self.folders.items():
            if folder is not None and not folder.is_dir():
                raise MediaError(f"{spec.where()}: {role}_directory {folder} "
                                 f"{'is a file, not a folder' if folder.exists() else 'does not exist'}")
        self.indexes = {role: _index(folder) for role, folder in self.folders.items()}
        self.records: dict[Path, dict[str, Path]] = self._jsonl_records() if spec.jsonl else {}
        self.has_reference = self.folders["reference"] is not None or any(
            "reference" in found for found in self.records.values())

    def _jsonl_records(self) -> dict[Path, dict[str, Path]]:
        """{media path: {role: file}} from the JSONL lines that name conditioning files."""
        out: dict[Path, dict[str, Path]] = {}
        key = "image_path" if self.spec.kind == "image" else "video_path"
        base = self.spec.source.parent
        for line in self.spec.source.read_text(encoding="utf-8", errors="replace").splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue  # reported by the item enumeration
            if not isinstance(record, dict) or not isinstance(record.get(key), str):
                continue
            found = {}
            for role, names in JSONL_KEYS.items():
                value = next((record[n] for n in names if isinstance(record.get(n), str) and record[n]), None)
                if value is not None:
                    path = Path(value).expanduser()
                    found[role] = path if path.is_absolute() else base / path
            media = Path(record[key]).expanduser()
            out[media if media.is_absolute() else base / media] = found
        return out

    def find(self, media: Path) -> tuple[tuple[str, Path], ...]:
        """(role, file) pairs for `media`; raises MediaError (the item is skipped) for a missing file."""
        name = media.name if media.is_dir() else media.stem
        found = dict(self.records.get(media, {}))
        for role, folder in self.folders.items():
            if folder is not None and role not in found:
                path = _matching(self.indexes[role].get(name, []), role)
                if path is None and role == "control":
                    continue  # control.attach_controls skips the item, with the paths it tried
                if path is None:
                    what = "reference image" if role == "reference" else f"{role} video or image"
                    raise MediaError(f"{media}: no {what} named {name}.* in {role}_directory {folder}")
                found[role] = path
        for role, path in found.items():
            if not path.exists():
                raise MediaError(f"{media}: its {role} file {path} does not exist")
        if self.has_reference and "reference" not in found:
            raise MediaError(f"{media}: other items of this dataset have a reference image and this one has none; "
                             "give every item one (a batch holds the same number of reference frames) or none")
        return tuple((role, found[role]) for role in ROLES if role in found)


def _to_tensor(frames: np.ndarray) -> torch.Tensor:
    """[F, H, W, 3] uint8 -> [3, F, H, W] float32 in [-1, 1]."""
    return torch.from_numpy(np.ascontiguousarray(frames)).permute(3, 0, 1, 2).float().div_(127.5).sub_(1.0)


def _frames(path: Path, item, role: str) -> torch.Tensor:
    """The control or mask pixels of `item` [3, F, H, W] in [-1, 1], at the item's frames and size."""
    width, height, count = item.bucket
    if is_image_file(path) and path.is_file():
        if count != 1 and role == "control":
            raise MediaError(f"{item.media_path}: the control file {path} is an image but the item is a video; give "
                             "a control video with the same frames")
        image = resize_and_crop(load_image(path), (width, height))[None]
        return _to_tensor(np.repeat(image, count, axis=0))  # a still mask holds for every frame
    if item.is_image:
        frames = read_video_frames(path, [0], (width, height))
    else:
        frames = read_video_frames(path, list(item.frames), (width, height))
    if frames.shape[0] != count:
        raise MediaError(f"{item.media_path}: its {role} video {path} gave {frames.shape[0]} of the {count} frames the "
                         "item needs; give it at least as many frames as the video")
    return _to_tensor(frames)


def load_conditions(item) -> dict:
    """The item's conditioning pixels: control [3, F, H, W] in [-1, 1], mask [1, F, H, W] in [0, 1] and
    references (a list of [3, h, w] in [-1, 1]); absent roles are None / []."""
    files = dict(item.conditions)
    out = {"control": None, "mask": None, "references": []}
    try:
        if "control" in files:
            out["control"] = _frames(files["control"], item, "control")
        if "mask" in files:
            out["mask"] = _frames(files["mask"], item, "mask")[:1].add(1.0).div(2.0).clamp(0.0, 1.0)
        if "reference" in files:
            out["references"] = [_to_tensor(load_image(files["reference"])[None])[:, 0]]
    except (OSError, IndexError) as exc:
        raise MediaError(f"{item.media_path}: a conditioning file could not be read ({exc})") from None
    return out


def condition_fingerprint(item) -> list:
    """What decides the conditioning part of an item's cache: each file's role, path, size and mtime."""
    out = []
    for role, path in item.conditions:
        files = frame_files(path) if path.is_dir() else [path]
        stats = [f.stat() for f in files]
        out.append([role, str(path), sum(s.st_size for s in stats), max((s.st_mtime_ns for s in stats), default=0)])
    return out

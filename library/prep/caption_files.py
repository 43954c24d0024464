"""Caption files: which media need one, where it goes, and how a generated caption is merged in.

Where: in the guide's layout (`<root>/images/x.png` or `<root>/videos/x.mp4`) the caption is
`<root>/captions/x.txt`; anywhere else it is the sd-scripts sidecar `x.txt` next to the media.
Modes: `overwrite` replaces, `skip_existing` leaves a non-empty caption alone (and does not run the
model for it), `append` adds the generated text after the existing one (the guide's hybrid workflow:
generate, then refine by hand). A trigger word goes first and a prefix right before the generated text;
neither is repeated when the existing caption already starts with it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np

from .captioning import MediaSample
from .media import IMAGE_EXTENSIONS, atomic_write_text, iter_frames, media_kind, probe_video, read_image

logger = logging.getLogger(__name__)

MODES = ("overwrite", "skip_existing", "append")
GUIDE_FOLDERS = ("images", "videos")


@dataclass
class CaptionStats:
    written: int = 0
    skipped: int = 0
    failed: list[str] = field(default_factory=list)


def find_media(inputs: list[Path]) -> list[Path]:
    """Images, videos and PNG-frame folders under the inputs (a dataset root, a media folder or files)."""
    found: list[Path] = []
    for root in map(Path, inputs):
        if root.is_file():
            found.append(root)
            continue
        if not root.is_dir():
            raise FileNotFoundError(f"{root} does not exist")
        folders = [root / name for name in GUIDE_FOLDERS if (root / name).is_dir()] or [root]
        for folder in folders:
            for path in sorted(folder.iterdir()):
                if path.name.startswith("."):
                    continue
                if path.is_file() and media_kind(path):
                    found.append(path)
                elif path.is_dir() and folder.name == "videos" and any(path.glob("*.png")):
                    found.append(path)
    return found


def caption_path_for(media: Path, extension: str = ".txt") -> Path:
    """captions/NAME.txt beside images/ or videos/, else NAME.txt next to the media."""
    stem = media.stem if media.is_file() else media.name
    if media.parent.name in GUIDE_FOLDERS:
        return media.parent.parent / "captions" / f"{stem}{extension}"
    return media.with_name(f"{stem}{extension}")


def _to_pil(frame: np.ndarray):
    from PIL import Image

    return Image.fromarray(cv2.cvtColor(frame, cv2.COLOR_BGR2RGB))


def load_sample(path: Path, frames: int = 6) -> MediaSample:
    """An image, or `frames` frames spread evenly over a clip (a video file or a folder of frames)."""
    if path.is_dir():
        files = sorted(path.glob("*.png"))
        pick = np.linspace(0, len(files) - 1, min(frames, len(files))).round().astype(int)
        return MediaSample("video", [_to_pil(read_image(files[i])) for i in sorted(set(pick))])
    if path.suffix.lower() in IMAGE_EXTENSIONS:
        return MediaSample("image", [_to_pil(read_image(path))])
    count = probe_video(path).frame_count
    if count <= 0:
        count = sum(1 for _ in iter_frames(path))
    wanted = {int(i) for i in np.linspace(0, max(0, count - 1), min(frames, max(1, count))).round()}
    decoded = [_to_pil(frame) for _, frame in iter_frames(path, wanted=wanted)]
    if not decoded:
        raise ValueError(f"{path}: no frame could be decoded")
    return MediaSample("video", decoded)


def compose(generated: str, existing: str, mode: str, trigger: str = "", prefix: str = "") -> str:
    """The caption text to write for one item."""
    body = f"{prefix.strip()} {generated.strip()}".strip() if prefix else generated.strip()
    existing = existing.strip()
    if mode == "append" and existing:
        if prefix and prefix.strip().lower() in existing.lower():
            body = generated.strip()
        text = f"{existing.rstrip(',. ')}, {body}" if body else existing
    else:
        text = body
    if trigger and not text.lower().startswith(trigger.strip().lower()):
        text = f"{trigger.strip()}, {text}" if text else trigger.strip()
    return text


def _read(path: Path) -> str:
    return path.read_text(encoding="utf-8") if path.is_file() else ""


def caption_media(media: list[Path], captioner, mode: str = "skip_existing", trigger: str = "", prefix: str = "",
                  batch_size: int = 4, frames: int = 6, extension: str = ".txt", progress: bool = True) -> CaptionStats:
    """Caption every item (images and clips batched separately) and write the caption files."""
    if mode not in MODES:
        raise ValueError(f"mode {mode!r}: use one of {', '.join(MODES)}")
    stats = CaptionStats()
    todo = []
    for path in media:
        target = caption_path_for(path, extension)
        if mode == "skip_existing" and _read(target).strip():
            stats.skipped += 1
        else:
            todo.append((path, target))
    bar = _progress_bar(len(todo), progress)
    for kind in ("image", "video"):
        group = [(p, t) for p, t in todo if _kind_of(p) == kind]
        for start in range(0, len(group), max(1, batch_size)):
            _caption_batch(group[start:start + batch_size], captioner, mode, trigger, prefix, frames, stats)
            bar.update(len(group[start:start + batch_size]))
    bar.close()
    return stats


def _kind_of(path: Path) -> str:
    return "video" if path.is_dir() else media_kind(path)


def _caption_batch(batch, captioner, mode, trigger, prefix, frames, stats: CaptionStats) -> None:
    samples, ready = [], []
    for path, target in batch:
        try:
            samples.append(load_sample(path, frames))
            ready.append((path, target))
        except (ValueError, OSError, RuntimeError) as error:
            logger.warning("%s: skipped (%s)", path, error)
            stats.failed.append(str(path))
    if not samples:
        return
    for (path, target), generated in zip(ready, captioner.caption(samples)):
        atomic_write_text(target, compose(generated, _read(target), mode, trigger, prefix) + "\n")
        stats.written += 1


class _NoBar:
    def update(self, n: int) -> None:
        pass

    def close(self) -> None:
        pass


def _progress_bar(total: int, enabled: bool):
    if not enabled:
        return _NoBar()
    try:
        from tqdm import tqdm
    except ImportError:
        return _NoBar()
    return tqdm(total=total, desc="caption", unit="item")

"""Writing what a sampler made: H.264 MP4, PNG frames, labelled contact sheets and grid videos, JSON sidecars.

Videos are [3, F, H, W] tensors in [-1, 1] until `to_frames` turns them into uint8 [F, H, W, 3] RGB arrays.
Every file is written to a temporary name beside the target and moved into place (atomic). The MP4 is
H.264 / yuv420p through the ffmpeg binary that imageio-ffmpeg ships, so browsers and editors play it; odd
sizes are padded to even (yuv420p needs it).
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

_UMASK = os.umask(0)
os.umask(_UMASK)


def to_frames(video: torch.Tensor) -> np.ndarray:
    """[3, F, H, W] in [-1, 1] -> uint8 [F, H, W, 3]."""
    return ((video.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 3, 0).cpu().numpy()


def atomic_target(path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=path.suffix, dir=path.parent)
    os.close(fd)
    os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600 files; give the usual permissions
    return Path(tmp)


def _commit(tmp: Path, path: Path) -> Path:
    os.replace(tmp, path)
    return path


def write_json(data: dict, path: Path) -> Path:
    tmp = atomic_target(path)
    tmp.write_text(json.dumps(data, indent=2, ensure_ascii=False, default=str) + "\n", encoding="utf-8")
    return _commit(tmp, path)


def write_png(image: np.ndarray, path: Path) -> Path:
    """uint8 [H, W, 3] RGB -> PNG."""
    import cv2

    ok, data = cv2.imencode(".png", cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
    if not ok:
        raise OSError(f"could not encode {path} as PNG")
    tmp = atomic_target(path)
    tmp.write_bytes(data.tobytes())
    return _commit(tmp, path)


def write_mp4(frames: np.ndarray, path: Path, fps: float) -> Path:
    """uint8 [F, H, W, 3] -> H.264 MP4 (yuv420p, even width and height, faststart)."""
    import imageio_ffmpeg

    _, h, w, _ = frames.shape
    frames = np.pad(frames, ((0, 0), (0, h % 2), (0, w % 2), (0, 0)), mode="edge")
    tmp = atomic_target(path)
    writer = imageio_ffmpeg.write_frames(
        str(tmp), (w + w % 2, h + h % 2), fps=fps, codec="libx264", pix_fmt_in="rgb24", pix_fmt_out="yuv420p",
        macro_block_size=1, quality=8, ffmpeg_log_level="error", output_params=["-movflags", "+faststart"],
    )
    try:
        writer.send(None)
        for frame in frames:
            writer.send(np.ascontiguousarray(frame))
    finally:
        writer.close()
    return _commit(tmp, path)


def write_frames(frames: np.ndarray, folder: Path, stem: str) -> list[Path]:
    return [write_png(frame, folder / f"{stem}_{i:04d}.png") for i, frame in enumerate(frames)]


def label_bar(text: str, width: int, height: int | None = None) -> np.ndarray:
    """A dark bar [h, width, 3] with `text` in white, shrunk to fit."""
    import cv2

    height = height or max(14, min(28, width // 10))
    bar = np.full((height, width, 3), 24, dtype=np.uint8)
    scale = height / 34
    while scale > 0.2 and cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, scale, 1)[0][0] > width - 4:
        scale *= 0.9
    (_, th), baseline = cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, scale, 1)
    y = (height + th - baseline) // 2  # text and descenders centred in the bar
    cv2.putText(bar, text, (2, y), cv2.FONT_HERSHEY_SIMPLEX, scale, (255, 255, 255), 1, cv2.LINE_AA)
    return bar


def _fit(frame: np.ndarray, height: int, width: int) -> np.ndarray:
    """Resize keeping the aspect ratio and pad (letterbox) to [height, width, 3]."""
    import cv2

    h, w = frame.shape[:2]
    if (h, w) == (height, width):
        return frame
    s = min(height / h, width / w)
    nh, nw = max(1, round(h * s)), max(1, round(w * s))
    resized = cv2.resize(frame, (nw, nh), interpolation=cv2.INTER_AREA if s < 1 else cv2.INTER_CUBIC)
    out = np.zeros((height, width, 3), dtype=np.uint8)
    top, left = (height - nh) // 2, (width - nw) // 2
    out[top:top + nh, left:left + nw] = resized
    return out


def contact_sheet(rows: Sequence[tuple[str, np.ndarray]], columns: int = 8) -> np.ndarray:
    """One row per (label, frames [F, H, W, 3]): the label bar, then `columns` evenly spaced frames."""
    cell_h, cell_w = rows[0][1].shape[1:3]
    blocks = []
    for label, frames in rows:
        picks = np.linspace(0, len(frames) - 1, min(columns, len(frames))).round().astype(int)
        strip = [_fit(frames[i], cell_h, cell_w) for i in picks]
        strip += [np.zeros((cell_h, cell_w, 3), np.uint8)] * (columns - len(strip))
        body = np.concatenate(strip, axis=1)
        blocks += [label_bar(label, body.shape[1]), body]
    return np.concatenate(blocks, axis=0)


def grid_video(cells: Sequence[Sequence[tuple[str, np.ndarray]]]) -> np.ndarray:
    """Rows of (label, frames) cells -> one uint8 video [F, H, W, 3]; every cell gets a label bar on top,
    is letterboxed to the first cell's size, and holds its last frame when shorter than the longest."""
    cell_h, cell_w = cells[0][0][1].shape[1:3]
    length = max(len(frames) for row in cells for _, frames in row)
    columns = max(len(row) for row in cells)
    bar_h = max(14, min(28, cell_w // 10))
    out = []
    for f in range(length):
        grid_rows = []
        for row in cells:
            tiles = []
            for label, frames in row:
                tile = _fit(frames[min(f, len(frames) - 1)], cell_h, cell_w)
                tiles.append(np.concatenate([label_bar(label, cell_w, bar_h), tile], axis=0))
            tiles += [np.zeros((bar_h + cell_h, cell_w, 3), np.uint8)] * (columns - len(tiles))
            grid_rows.append(np.concatenate(tiles, axis=1))
        out.append(np.concatenate(grid_rows, axis=0))
    return np.stack(out)

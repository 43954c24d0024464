"""A small synthetic captioned dataset in the training guide's layout, for the demo and end-to-end tests.

    ROOT/videos/clip_000.mp4 ...   ROOT/images/img_000.png ...   ROOT/captions/<stem>.txt
    ROOT/dataset.toml              (musubi dataset schema; caches under ROOT/cache/)

Clips are windows panning across textured scenes (the same generator the filter tests use, without
defects), captions describe what moves and how, so a tiny model has something real to fit.
"""

from __future__ import annotations

import random
from pathlib import Path

import cv2

from .synthetic import ClipSpec, make_clip, make_image, write_video

_DIRECTIONS = {(1.5, 0.0): "pans right", (-1.5, 0.0): "pans left", (0.0, 1.5): "tilts down", (0.0, -1.5): "tilts up"}
_SUBJECTS = ["a colourful abstract painting", "a field of bright shapes", "a mosaic of discs and squares",
             "a patterned wall", "a textured canvas"]


def write_demo_dataset(root: str | Path, clips: int = 6, images: int = 6, width: int = 64, height: int = 64,
                       frames: int = 17, fps: int = 16, target_frames: tuple[int, ...] = (9,), seed: int = 0) -> Path:
    """Write the media, captions and dataset TOML (skipping files already there); returns the TOML path."""
    root = Path(root)
    for sub in ("videos", "images", "captions"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    for i in range(clips):
        pan, motion = rng.choice(list(_DIRECTIONS.items()))
        path = root / "videos" / f"clip_{i:03d}.mp4"
        if not path.exists():
            spec = ClipSpec(frames=frames, width=width, height=height, seed=seed + i, pan=pan)
            write_video(path, make_clip(spec), fps, "mp4v")
        (root / "captions" / f"clip_{i:03d}.txt").write_text(f"{rng.choice(_SUBJECTS)}, the camera {motion} slowly")
    for i in range(images):
        path = root / "images" / f"img_{i:03d}.png"
        if not path.exists():
            cv2.imwrite(str(path), make_image(seed=seed + 100 + i, width=width, height=height))
        (root / "captions" / f"img_{i:03d}.txt").write_text(f"{rng.choice(_SUBJECTS)}, still image")
    toml = root / "dataset.toml"
    toml.write_text(
        "# Synthetic demo dataset (library/prep/demo_dataset.py): clips and stills in the guide's layout.\n"
        "[general]\n"
        f"resolution = [{width}, {height}]\n"
        'caption_extension = ".txt"\n'
        "batch_size = 1\n"
        "enable_bucket = true\n\n"
        "[[datasets]]\n"
        f'video_directory = "{(root / "videos").as_posix()}"\n'
        f'cache_directory = "{(root / "cache" / "videos").as_posix()}"\n'
        f"target_frames = [{', '.join(map(str, target_frames))}]\n"
        'frame_extraction = "head"\n'
        f"source_fps = {fps}\n\n"
        "[[datasets]]\n"
        f'image_directory = "{(root / "images").as_posix()}"\n'
        f'cache_directory = "{(root / "cache" / "images").as_posix()}"\n'
    )
    return toml

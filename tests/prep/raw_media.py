"""The raw folder of synthetic media for the preparation tests: one defect per file, named after it.

Videos are 96x64 FFV1 (the letterboxed one 128x96; lossless, so the only defects are the drawn ones), images
96x64 PNG. `clean_*`
items have no defect and must survive every filter.
"""

from __future__ import annotations

from library.prep.analysis import AnalysisSettings
from library.prep.media import write_image
from library.prep.synthetic import ClipSpec, make_clip, make_image, write_lossless_video

VIDEOS = {
    "clean_pan.mkv": ClipSpec(frames=44, seed=1),
    "hard_cut.mkv": ClipSpec(frames=60, seed=2, cut_at=30),
    "shaky.mkv": ClipSpec(frames=24, seed=3, jitter=3.0),
    "lighting_jump.mkv": ClipSpec(frames=24, seed=4, light_jump_at=10),
    "overlay.mkv": ClipSpec(frames=24, seed=5, overlay=True),
    "letterboxed.mkv": ClipSpec(frames=24, seed=6, width=128, height=96, letterbox=12),
    "motion_blur.mkv": ClipSpec(frames=24, seed=7, motion_blur=7),
    "too_short.mkv": ClipSpec(frames=10, seed=12),
}
IMAGES = {
    "clean_photo.png": dict(seed=8),
    "clean_photo_copy.png": dict(seed=8, blur_sigma=0.5),  # a slightly softer near-duplicate
    "blurred.png": dict(seed=9, blur_sigma=2.0),
    "noisy.png": dict(seed=10, noise_sigma=12.0),
    "jpeg_blocks.png": dict(seed=11, jpeg_quality=8),
}
# 64 px square output: the 96x64 sources (and the letterboxed 128x96 one, 72 px high once cropped) stay >= 1x.
SETTINGS = AnalysisSettings(resolution=64, frames=17, target_fps=24.0)


def write_raw(folder):
    for name, spec in VIDEOS.items():
        write_lossless_video(folder / "clips" / name, make_clip(spec), fps=24.0)
    for name, defects in IMAGES.items():
        write_image(folder / "photos" / name, make_image(**defects))
    (folder / "photos" / "clean_photo.txt").write_text("a colourful abstract still life\n")
    (folder / "photos" / "broken.png").write_bytes(b"not an image")
    return folder

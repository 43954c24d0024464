"""Enumerating items: the three caption sources, frame windows per extraction mode, fps, stable keys."""

from __future__ import annotations

import json

import pytest

from library.data.dataset_config import load_dataset_config
from library.data.items import enumerate_dataset, frame_windows

from .conftest import write_caption, write_image, write_toml, write_video


def _items(tmp_path, body: str, step: int = 16, fps: float = 16.0):
    config = load_dataset_config(write_toml(tmp_path / "d.toml", body))
    return enumerate_dataset(config.datasets[0], step, fps)


def test_three_caption_sources(tmp_path):
    write_image(tmp_path / "root/images/001.png")
    write_caption(tmp_path / "root/captions/001.txt", "guide layout\n")
    write_image(tmp_path / "root/images/002.png")
    write_caption(tmp_path / "root/images/002.txt", "  sd-scripts layout ")
    items, skips = _items(tmp_path, "[[datasets]]\nimage_directory = 'root/images'\nresolution = 64\n")
    assert not skips
    assert [(i.key, i.caption) for i in items] == [("001_64x64", "guide layout"), ("002_64x64", "sd-scripts layout")]
    assert items[0].caption_source == str(tmp_path / "root/captions/001.txt")

    write_image(tmp_path / "j/pics/x.png", 64, 32)
    (tmp_path / "j/list.jsonl").write_text(json.dumps({"image_path": "pics/x.png", "caption": "from jsonl"}) + "\n\n")
    items, skips = _items(tmp_path, "[[datasets]]\nimage_jsonl_file = 'j/list.jsonl'\ncache_directory = 'c'\n"
                                    "resolution = 64\nenable_bucket = true\n")
    assert not skips and [(i.key, i.caption, i.caption_source) for i in items] == [
        ("x_80x48", "from jsonl", f"{tmp_path / 'j/list.jsonl'}:1")]


def test_caption_extension(tmp_path):
    write_image(tmp_path / "imgs/a.png")
    write_caption(tmp_path / "imgs/a.caption", "custom extension")
    items, _ = _items(tmp_path, "[[datasets]]\nimage_directory = 'imgs'\ncaption_extension = '.caption'\n"
                                "resolution = 64\n")
    assert items[0].caption == "custom extension"


class _Spec:
    def __init__(self, mode, frames=(5,), stride=1, sample=1, max_frames=129):
        self.frame_extraction, self.target_frames = mode, frames
        self.frame_stride, self.frame_sample, self.max_frames = stride, sample, max_frames


@pytest.mark.parametrize("spec, expected", [
    (_Spec("head", (1, 5, 21)), [(0, 1), (0, 5)]),
    (_Spec("chunk", (5,)), [(0, 5), (5, 5)]),
    (_Spec("slide", (5,), stride=3), [(0, 5), (3, 5), (6, 5)]),
    (_Spec("uniform", (5,), sample=3), [(0, 5), (4, 5), (7, 5)]),
    (_Spec("uniform", (9,), sample=5), [(0, 9), (1, 9), (2, 9), (3, 9)]),
    (_Spec("full", max_frames=9), [(0, 9)]),
    (_Spec("full", max_frames=81), [(0, 9)]),
])
def test_frame_windows(spec, expected):
    assert frame_windows(12, spec) == expected


def test_video_windows_fps_and_keys(tmp_path):
    write_video(tmp_path / "v/clip.mp4", frames=25, fps=24.0)  # 1 s at 24 fps -> 17 frames at 16 fps
    write_caption(tmp_path / "v/clip.txt", "a clip")
    body = "[[datasets]]\nvideo_directory = 'v'\nresolution = 64\ntarget_frames = [5, 17]\nframe_extraction = 'chunk'\n"
    items, skips = _items(tmp_path, body)
    assert not skips
    assert [i.key for i in items] == ["clip_00000-005_64x64", "clip_00005-005_64x64", "clip_00010-005_64x64",
                                      "clip_00000-017_64x64"]
    assert items[1].frames == (7, 9, 10, 12, 13) and items[1].bucket == (64, 64, 5) and items[1].fps == 16.0
    assert items[3].frames[-1] == 24
    again, _ = _items(tmp_path, body)
    assert [i.key for i in again] == [i.key for i in items]  # stable across runs
    at_24, _ = _items(tmp_path, body, fps=24.0)  # TI2V-5B: 24 fps, no resampling
    assert at_24[-1].frames == tuple(range(17))
    forced, _ = _items(tmp_path, body.replace("resolution", "target_fps = 8\nresolution"))
    assert forced[-1].key == "clip_00000-005_64x64" and len(forced) == 1  # 9 frames at 8 fps


def test_frame_folder_items(tmp_path):
    from PIL import Image

    from .conftest import gradient_frame

    for i in range(9):
        (tmp_path / "v/seq").mkdir(parents=True, exist_ok=True)
        Image.fromarray(gradient_frame(64, 48, i)).save(tmp_path / f"v/seq/{i:03d}.png")
    write_caption(tmp_path / "v/seq.txt", "a folder of frames")
    body = "[[datasets]]\nvideo_directory = 'v'\nresolution = 64\ntarget_frames = [9]\n"
    items, skips = _items(tmp_path, body)
    assert not skips and items[0].frames == tuple(range(9)) and items[0].fps is None
    items, _ = _items(tmp_path, body.replace("[9]", "[5]") + "source_fps = 32\n")
    assert items[0].frames == (0, 2, 4, 6, 8)


def test_duplicate_stems_are_reported(tmp_path):
    write_image(tmp_path / "i/a.png")
    write_image(tmp_path / "i/a.jpg")
    write_caption(tmp_path / "i/a.txt", "x")
    items, skips = _items(tmp_path, "[[datasets]]\nimage_directory = 'i'\nresolution = 64\n")
    assert len(items) == 1 and len(skips) == 1
    assert skips[0].reason == f"has the same name as {tmp_path / 'i/a.jpg'}: their caches would collide; rename one"

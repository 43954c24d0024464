"""Fun-Control control media in the dataset config: musubi-tuner's matching (`control_directory`, JSONL
`control_path`), the control read with the clip's frames and crop, and `control_latents` in the latent cache
(fingerprinted: a changed control is rebuilt)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from library.data import cache
from library.data.control import load_control_pixels
from library.data.dataset_config import DatasetConfigError, load_dataset_config
from library.data.datasets import CacheError, build_train_datasets
from library.data.items import enumerate_dataset
from library.data.latent_caching import cache_latents, load_pixels
from library.data.video_io import MediaError

from .conftest import write_caption, write_image, write_toml, write_video
from tests.helpers import single_thread

@pytest.fixture(autouse=True)
def one_thread():
    """Tiny VAE: intra-op threads only add overhead on a busy machine."""
    with single_thread():
        yield


VIDEOS = """
[general]
resolution = [64, 48]
[[datasets]]
video_directory = "videos"
control_directory = "control"
cache_directory = "cache"
target_frames = [5]
frame_extraction = "chunk"
"""


def _videos(root, controls=("a.mp4", "b", "c.mov")):
    """Clips a, b, c (and d without a control); controls by the clip's name, a frame folder, another extension."""
    for name in "abcd":
        write_video(root / f"videos/{name}.mp4", frames=12, fps=16.0)
        write_caption(root / f"videos/{name}.txt", f"clip {name}")
    for control in controls:
        if control == "b":  # a folder of frames named like the clip
            for i in range(12):
                write_image(root / f"control/b/{i:03d}.png")
        else:
            write_video(root / "control" / control, frames=12, fps=16.0)
    return load_dataset_config(write_toml(root / "d.toml", VIDEOS))


def test_video_controls_match_by_name_and_missing_ones_are_skipped(tmp_path):
    config = _videos(tmp_path)
    items, skips = enumerate_dataset(config.datasets[0], 16, 16.0)
    assert {i.media_path.stem: i.control_path.relative_to(tmp_path).as_posix() for i in items} == {
        "a": "control/a.mp4", "b": "control/b", "c": "control/c.mov"}
    assert len(items) == 6  # 12 frames in chunks of 5: two windows each, every window keeps its control
    (skip,) = skips
    assert skip.path.endswith("d.mp4") and "no control in control_directory: tried" in skip.reason
    assert str(tmp_path / "control" / "d.mp4") in skip.reason
    (tmp_path / "d.toml").write_text(VIDEOS.replace('"control"', '"videos/a.mp4"'))
    with pytest.raises(MediaError, match=r"control_directory .*a\.mp4 is a file, not a folder"):
        enumerate_dataset(load_dataset_config(tmp_path / "d.toml").datasets[0], 16, 16.0)


def test_control_frames_follow_the_clip_window_and_crop(tmp_path):
    """The control is read at the clip's own frames and cropped like it: the same file as control gives the
    same pixels for every window; a shorter control repeats its last frame."""
    config = _videos(tmp_path, controls=())
    for name in "bcd":
        (tmp_path / f"videos/{name}.mp4").unlink()
    write_video(tmp_path / "control/a.mp4", frames=12, fps=16.0)  # the clip's own content
    items, _ = enumerate_dataset(config.datasets[0], 16, 16.0)
    for item in items:
        assert torch.equal(load_control_pixels(item), load_pixels(item)), item.key
    write_video(tmp_path / "control/a.mp4", frames=7, fps=16.0)  # shorter than the clip
    second = [i for i in items if i.frames[0] == 5][0]
    pixels = load_control_pixels(second)  # frames 5..9 of a 7-frame control: 5, 6, 6, 6, 6
    assert torch.equal(pixels[:, 2], pixels[:, 4]) and torch.equal(pixels[:, 1], pixels[:, 3])


def test_image_controls_prefer_the_exact_stem_then_the_lowest_number(tmp_path):
    for name in ("cat", "cat_1", "dog"):
        write_image(tmp_path / f"images/{name}.png")
        write_caption(tmp_path / f"images/{name}.txt", name)
    for name in ("cat_1.png", "cat_2.jpg", "dog_3.png", "dog_10.png"):
        write_image(tmp_path / "control" / name)
    body = '[[datasets]]\nimage_directory = "images"\ncontrol_directory = "control"\ncache_directory = "c"\n'
    config = load_dataset_config(write_toml(tmp_path / "d.toml", "[general]\nresolution = 64\n" + body))
    items, skips = enumerate_dataset(config.datasets[0], 16, 16.0)
    got = {i.media_path.stem: i.control_path.name for i in items}
    # cat_1.png belongs to the image cat_1; cat takes cat_2.jpg; dog the lowest number
    assert got == {"cat": "cat_2.jpg", "cat_1": "cat_1.png", "dog": "dog_3.png"} and skips == []
    assert load_control_pixels(items[0]).shape == (3, 1, 64, 64)  # resolution 64 without buckets: 64x64


def test_jsonl_control_path(tmp_path):
    write_video(tmp_path / "v/a.mp4", frames=9)
    write_video(tmp_path / "v/b.mp4", frames=9)
    write_video(tmp_path / "ctrl/a_pose.mp4", frames=9)
    lines = [{"video_path": "v/a.mp4", "caption": "a", "control_path": "ctrl/a_pose.mp4"},
             {"video_path": "v/b.mp4", "caption": "b"}]
    (tmp_path / "m.jsonl").write_text("\n".join(json.dumps(line) for line in lines))
    body = '[[datasets]]\nvideo_jsonl_file = "m.jsonl"\ncache_directory = "c"\ntarget_frames = [5]\n'
    config = load_dataset_config(write_toml(tmp_path / "d.toml", body))
    items, skips = enumerate_dataset(config.datasets[0], 16, 16.0)
    assert [i.control_path for i in items] == [tmp_path / "ctrl/a_pose.mp4"]
    assert "line 2 of" in skips[0].reason and "has no control_path" in skips[0].reason
    with pytest.raises(DatasetConfigError, match=r"control_directory is for directory datasets; a JSONL dataset"):
        load_dataset_config(write_toml(tmp_path / "e.toml", body + 'control_directory = "ctrl"\n'))


def test_control_latents_are_cached_fingerprinted_and_required(tmp_path, tiny_models):
    config = _videos(tmp_path)
    vae = tiny_models["t2v-tiny"].vae
    summary = cache_latents(config, vae, progress=False)  # no --task: controls are cached as musubi-tuner does
    assert (summary.cached, len(summary.skipped), summary.errors) == (6, 1, [])
    (dataset,) = build_train_datasets(config, "t2v-tiny-fc")
    assert not [p for p in dataset.cache_problems() if p.startswith("latents")]  # fresh for the Fun-Control task
    item = dataset.items[0]
    tensors = cache.load_tensors(dataset.latent_path(item))
    assert tensors["control_latents"].shape == tensors["latents"].shape == (16, 2, 6, 8)
    assert cache.read_metadata(dataset.latent_path(item))["control_path"] == str(item.control_path)
    write_video(tmp_path / "control/a.mp4", frames=12, fps=16.0, width=48)  # the control changed
    with pytest.raises(CacheError, match=r"control .*a\.mp4 changed since it was cached"):
        build_train_datasets(config, "t2v-tiny-fc")[0].check_caches()
    again = cache_latents(config, vae, task="t2v-tiny-fc", progress=False)
    assert (again.cached, again.reused) == (2, 4)  # only a's two windows
    plain = cache_latents(config, vae, task="t2v-tiny", progress=False)  # same files serve a plain task
    assert plain.reused == 6
    no_control = tmp_path / "n.toml"
    no_control.write_text(VIDEOS.replace('control_directory = "control"\n', ""))
    with pytest.raises(DatasetConfigError, match=r"task t2v-tiny-fc \(Fun-Control\) trains on control videos, and "
                                                 r"this dataset names none: add `control_directory`"):
        cache_latents(load_dataset_config(no_control), vae, task="t2v-tiny-fc", progress=False)
    assert np.isfinite(tensors["control_latents"].float().numpy()).all()

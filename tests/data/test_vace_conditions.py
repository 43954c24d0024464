"""VACE conditioning media in the dataset TOML: directories and JSONL keys matched to items, skips with reasons,
the same number of reference images within a dataset, and the cache going stale when a conditioning file
changes."""

from __future__ import annotations

import json
import os

import pytest

from library.data.conditions import load_conditions
from library.data.dataset_config import DatasetConfigError, load_dataset_config
from library.data.datasets import latent_settings
from library.data.items import enumerate_dataset
from tests.data.conftest import write_caption, write_image, write_toml, write_video


def _video_dataset(tmp_path, extra: str):
    for name in ("a", "b"):
        write_video(tmp_path / "videos" / f"{name}.mp4", frames=9, width=32, height=32)
        write_caption(tmp_path / "videos" / f"{name}.txt", f"clip {name}")
    return load_dataset_config(write_toml(tmp_path / "d.toml", (
        "[general]\nresolution = [32, 32]\n[[datasets]]\n"
        f'video_directory = "{(tmp_path / "videos").as_posix()}"\ntarget_frames = [9]\nsource_fps = 16\n' + extra)))


def test_directories_match_by_name_and_missing_files_skip(tmp_path):
    write_video(tmp_path / "controls" / "a.mp4", frames=9, width=48, height=40)
    write_video(tmp_path / "controls" / "b.mp4", frames=5, width=32, height=32)  # too short for 9 frames
    write_image(tmp_path / "masks" / "a.png", 32, 32)
    write_image(tmp_path / "refs" / "a.jpg", 20, 30)
    config = _video_dataset(tmp_path, f'control_directory = "{(tmp_path / "controls").as_posix()}"\n'
                                      f'mask_directory = "{(tmp_path / "masks").as_posix()}"\n'
                                      f'reference_directory = "refs"\n')  # relative to the TOML file
    spec = config.datasets[0]
    assert spec.reference_directory == tmp_path / "refs"
    items, skips = enumerate_dataset(spec, 16, 16.0)
    assert [i.media_path.name for i in items] == ["a.mp4"]
    assert "no mask video or image named b.* in mask_directory" in skips[0].reason
    roles = dict(items[0].conditions)
    assert roles == {"control": tmp_path / "controls" / "a.mp4", "mask": tmp_path / "masks" / "a.png",
                     "reference": tmp_path / "refs" / "a.jpg"}
    inputs = load_conditions(items[0])
    assert inputs["control"].shape == (3, 9, 32, 32) and inputs["mask"].shape == (1, 9, 32, 32)
    assert 0 <= inputs["mask"].min() and inputs["mask"].max() <= 1 and inputs["references"][0].shape == (3, 30, 20)
    before = latent_settings(items[0], "2.1", vace=True)
    assert latent_settings(items[0], "2.1") != before  # a VACE cache is not a plain one
    os.utime(tmp_path / "masks" / "a.png", ns=(1, 1))
    assert latent_settings(items[0], "2.1", vace=True) != before  # a changed mask makes the cache stale


def test_jsonl_keys_ours_and_diffsynths(tmp_path):
    write_video(tmp_path / "a.mp4", frames=9, width=32, height=32)
    write_video(tmp_path / "b.mp4", frames=9, width=32, height=32)
    write_video(tmp_path / "ca.mp4", frames=9, width=32, height=32)
    write_image(tmp_path / "r.png", 32, 32)
    lines = [{"video_path": "a.mp4", "caption": "a", "control_path": "ca.mp4", "reference_path": "r.png"},
             {"video_path": "b.mp4", "caption": "b", "vace_video": "ca.mp4", "vace_video_mask": "missing.mp4",
              "vace_reference_image": "r.png"}]
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps(x) for x in lines))
    config = load_dataset_config(write_toml(tmp_path / "d.toml", (
        '[general]\nresolution = [32, 32]\n[[datasets]]\nvideo_jsonl_file = "d.jsonl"\n'
        'cache_directory = "cache"\ntarget_frames = [9]\n')))
    items, skips = enumerate_dataset(config.datasets[0], 16, 16.0)
    assert dict(items[0].conditions) == {"control": tmp_path / "ca.mp4", "reference": tmp_path / "r.png"}
    assert len(items) == 1 and "its mask file" in skips[0].reason and "missing.mp4" in skips[0].reason


def test_references_all_or_none_and_keys_in_general_are_errors(tmp_path):
    write_image(tmp_path / "i" / "x.png", 32, 32)
    write_image(tmp_path / "i" / "y.png", 32, 32)
    for n in "xy":
        write_caption(tmp_path / "i" / f"{n}.txt", n)
    lines = [{"image_path": "i/x.png", "caption": "x", "reference_path": "i/y.png"},
             {"image_path": "i/y.png", "caption": "y"}]
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps(x) for x in lines))
    config = load_dataset_config(write_toml(tmp_path / "d.toml", (
        '[[datasets]]\nimage_jsonl_file = "d.jsonl"\ncache_directory = "c"\nresolution = 32\n')))
    items, skips = enumerate_dataset(config.datasets[0], 16, 16.0)
    assert len(items) == 1 and "other items of this dataset have a reference image" in skips[0].reason
    with pytest.raises(DatasetConfigError, match="'mask_directory' belongs in each"):
        load_dataset_config(write_toml(tmp_path / "g.toml", '[general]\nmask_directory = "m"\n[[datasets]]\n'
                                                            'image_directory = "i"\n'))


def test_a_missing_conditioning_folder_names_the_key(tmp_path):
    from library.data.video_io import MediaError

    config = _video_dataset(tmp_path, f'mask_directory = "{(tmp_path / "nowhere").as_posix()}"\n')
    with pytest.raises(MediaError, match="mask_directory .*nowhere does not exist"):
        enumerate_dataset(config.datasets[0], 16, 16.0)

"""The dataset linter (library/data/lint.py and tools/check_dataset.py): one small dataset per problem,
each finding checked with its exact message; a clean dataset warns only about its size for the goal."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

from library.data.lint import estimate_tokens, format_report, lint_dataset
from library.prep.demo_dataset import write_demo_dataset
from library.prep.synthetic import ClipSpec, make_clip, make_image, write_lossless_video

from .conftest import write_caption, write_toml

REPO = Path(__file__).resolve().parents[2]


def _image(root: Path, name: str, seed: int, width: int = 64, height: int = 64, caption: str | None = "a scene"):
    """images/NAME.png (distinct content per seed) and captions/NAME.txt unless caption is None."""
    path = root / "images" / f"{name}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(path), make_image(seed=seed, width=width, height=height))
    if caption is not None:
        write_caption(root / "captions" / f"{name}.txt", caption)
    return path


def _clip(root: Path, name: str, seed: int, frames: int = 17, fps: float = 16.0, caption: str = "a pan"):
    path = write_lossless_video(root / "videos" / f"{name}.mkv",
                                make_clip(ClipSpec(frames=frames, width=64, height=64, seed=seed)), fps)
    write_caption(root / "captions" / f"{name}.txt", caption)
    return path


def _images_toml(root: Path, extra: str = "", general: str = "resolution = 64\n") -> Path:
    return write_toml(root / "d.toml", f"[general]\n{general}[[datasets]]\nimage_directory = 'images'\n"
                                       f"cache_directory = 'cache'\n{extra}")


def _videos_toml(root: Path, extra: str = "target_frames = [9]\n") -> Path:
    return write_toml(root / "d.toml", "[general]\nresolution = 64\n[[datasets]]\nvideo_directory = 'videos'\n"
                                       f"cache_directory = 'cache'\n{extra}")


def _found(report, check: str) -> list[tuple[str, str, str]]:
    """(level, file name, message) of one check's findings."""
    return [(f.level, Path(f.file).name, f.message) for f in report.findings if f.check == check]


def _levels(report, level: str) -> list[str]:
    return [f.message for f in report.by_level(level)]


def test_clean_demo_dataset_warns_only_about_its_size(tmp_path):
    toml = write_demo_dataset(tmp_path / "demo")
    report = lint_dataset(toml, task="t2v-A14B", goal="character")
    assert report.exit_code == 0 and not report.by_level("error")
    assert _levels(report, "warning") == [
        "character: the guide's minimum is 150 images or 30 clips; this dataset has 6 images and 6 clips"]
    assert (report.images, report.clips, report.items) == (6, 6, 12)
    assert "12 samples (6 images, 6 clips): the guide recommends rank 16-32 and 15-20 epochs for this size" \
        in _levels(report, "info")
    assert _found(report, "bucket") == [("info", "videos", "6 items in 1 bucket(s): 64x64x9: 6"),
                                        ("info", "images", "6 items in 1 bucket(s): 64x64x1: 6")]
    assert not lint_dataset(toml, task="t2v-A14B").by_level("warning")  # no goal: nothing to compare


def test_goal_minimum_met_gives_rank_and_epochs(tmp_path):
    for i in range(150):
        _image(tmp_path, f"img_{i:03d}", seed=i, width=32, height=32)
    report = lint_dataset(_images_toml(tmp_path, general="resolution = 32\n"), goal="character")
    assert not report.by_level("warning") and report.exit_code == 0
    assert _found(report, "dataset_size") == [
        ("info", "", "150 samples (150 images, 0 clips): the guide recommends rank 32-48 and 15-20 epochs "
                     "for this size"),
        ("info", "", "character: meets the guide's minimum of 150 images or 30 clips")]
    assert _levels(lint_dataset(_images_toml(tmp_path, general="resolution = 32\n"), goal="style"), "warning") == [
        "style: the guide's minimum is 200 clips; this dataset has 150 images and 0 clips"]


def test_missing_and_empty_captions_are_errors(tmp_path):
    _image(tmp_path, "a", 1)
    _image(tmp_path, "b", 2, caption=None)
    _image(tmp_path, "c", 3, caption="  \n")
    report = lint_dataset(_images_toml(tmp_path))
    assert _found(report, "caption") == [("error", "b.png", "missing caption"),
                                         ("error", "c.png", "empty caption file c.txt")]
    missing = next(f for f in report.findings if f.message == "missing caption")
    assert missing.advice == f"write {tmp_path / 'captions' / 'b.txt'} (tools/caption.py can draft captions)"
    assert missing.dataset == 0 and report.exit_code == 1 and report.images == 1
    assert len(report.by_level("error")) == 2  # nothing else reported for the two skipped images


def test_long_captions_estimated_without_a_tokenizer(tmp_path):
    _image(tmp_path, "long", 1, caption="word " * 600)
    _image(tmp_path, "short", 2, caption="a short caption")
    report = lint_dataset(_images_toml(tmp_path))
    assert estimate_tokens("word " * 600) == 751  # stripped: 2999 ASCII characters / 4, rounded up, + EOS
    assert _found(report, "tokens") == [
        ("info", "", "caption token counts are estimates (about 4 characters per token)"),
        ("warning", "long.png", "caption has about 751 tokens, over the 512 the text encoder reads: "
                                "the rest is cut off")]


def test_long_captions_counted_with_a_tokenizer(tmp_path, tiny_umt5_tokenizer_dir):
    from library.wan.text_encoder import load_tokenizer

    caption = "the camera pans slowly across a field " * 100
    _image(tmp_path, "long", 1, caption=caption)
    _image(tmp_path, "short", 2, caption="a short caption")
    report = lint_dataset(_images_toml(tmp_path), tokenizer=tiny_umt5_tokenizer_dir)
    tokens = len(load_tokenizer(tiny_umt5_tokenizer_dir)(caption.strip()).input_ids)
    assert tokens > 512 and tokens != estimate_tokens(caption.strip())
    assert _found(report, "tokens") == [
        ("warning", "long.png", f"caption has {tokens} tokens, over the 512 the text encoder reads: "
                                "the rest is cut off")]
    with pytest.raises(ValueError, match="umT5 tokenizer folder .* does not exist"):
        lint_dataset(_images_toml(tmp_path), tokenizer=tmp_path / "no_tokenizer")


def test_images_under_the_bucket_size(tmp_path):
    _image(tmp_path, "big", 1, width=64, height=64)
    _image(tmp_path, "small", 2, width=32, height=24)
    report = lint_dataset(_images_toml(tmp_path))
    assert _found(report, "size") == [("warning", "small.png", "32x24 is under its 64x64 bucket: upscaled 2.67x, "
                                                               "which blurs it")]
    strict = lint_dataset(_images_toml(tmp_path, general="resolution = 64\nbucket_no_upscale = true\n"))
    assert [(f.level, Path(f.file).name, f.message) for f in strict.by_level("error")] == [
        ("error", "small.png", "32x24 is smaller than the 64x64 bucket and bucket_no_upscale is set; use a larger "
                               "source, lower `resolution`, set enable_bucket or unset bucket_no_upscale")]


def test_videos_shorter_than_the_target_frames(tmp_path):
    _clip(tmp_path, "long", 1, frames=17)
    _clip(tmp_path, "mid", 2, frames=12)
    _clip(tmp_path, "short", 3, frames=6)
    report = lint_dataset(_videos_toml(tmp_path, "target_frames = [9, 17]\n"), task="t2v-A14B")
    assert _found(report, "frames") == [
        ("warning", "mid.mkv", "12 frames at 16 fps, shorter than target frames 17: only 9-frame windows are taken"),
        ("error", "short.mkv", "6 frames at 16 fps, shorter than the smallest target frame count 9")]
    assert [f.file for f in report.by_level("error")] == [str(tmp_path / "videos" / "short.mkv")]  # reported once
    assert (report.clips, report.items) == (2, 3)


def test_frame_rates_far_from_the_models(tmp_path):
    _clip(tmp_path, "at16", 1, fps=16)
    _clip(tmp_path, "at30", 2, fps=30)
    _clip(tmp_path, "at32", 3, fps=32)  # whole multiple: every other frame, even motion
    _clip(tmp_path, "at8", 4, fps=8)
    report = lint_dataset(_videos_toml(tmp_path), task="t2v-A14B")
    assert _found(report, "fps") == [
        ("warning", "at30.mkv", "30 fps is far from the model's 16 fps: frames are taken 1.88 apart (uneven motion)"),
        ("warning", "at8.mkv", "8 fps is far from the model's 16 fps: frames are repeated (stutter)")]
    ti2v = lint_dataset(_videos_toml(tmp_path, "target_frames = [9]\ntarget_fps = 16\n"), task="ti2v-5B")
    assert _found(ti2v, "fps")[0] == ("warning", "d.toml", "target_fps 16 is far from the model's 24 fps: learned "
                                                           "motion will play too fast or too slow")
    assert ("warning", "at30.mkv", "30 fps is far from the target_fps 16: frames are taken 1.88 apart "
                                   "(uneven motion)") in _found(ti2v, "fps")


def test_buckets_of_one(tmp_path):
    for i in range(3):
        _image(tmp_path, f"square_{i}", seed=i)
    _image(tmp_path, "wide", seed=9, width=96, height=48)
    report = lint_dataset(_images_toml(tmp_path, general="resolution = 64\nenable_bucket = true\n"))
    assert _found(report, "bucket") == [("info", "images", "4 items in 2 bucket(s): 64x64x1: 3, 80x48x1: 1"),
                                        ("warning", "wide.png", "only item in bucket 80x48x1")]


def test_identical_and_near_duplicate_files(tmp_path):
    original = _image(tmp_path, "a", 1)
    _image(tmp_path, "b", 2)
    (tmp_path / "images" / "a_copy.png").write_bytes(original.read_bytes())
    write_caption(tmp_path / "captions" / "a_copy.txt", "a scene")
    brighter = np.clip(make_image(seed=1, width=64, height=64).astype(np.int16) + 3, 0, 255).astype(np.uint8)
    cv2.imwrite(str(tmp_path / "images" / "a_bright.png"), brighter)
    write_caption(tmp_path / "captions" / "a_bright.txt", "a scene")
    clip = _clip(tmp_path, "clip", 5)
    (tmp_path / "videos" / "clip_copy.mkv").write_bytes(clip.read_bytes())
    write_caption(tmp_path / "captions" / "clip_copy.txt", "a pan")
    toml = _images_toml(tmp_path, "[[datasets]]\nvideo_directory = 'videos'\ncache_directory = 'vcache'\n"
                                  "target_frames = [9]\n")
    report = lint_dataset(toml)
    assert _found(report, "duplicate") == [
        ("warning", "a_copy.png", f"identical to {original}"),
        ("warning", "clip_copy.mkv", f"identical to {clip}"),
        ("warning", "a_bright.png", f"near-duplicate of {original} (perceptual hash distance 0 of 64)")]
    assert [f.dataset for f in report.findings if f.check == "duplicate"] == [0, 1, 0]


def test_config_errors_and_missing_folders(tmp_path):
    bad = write_toml(tmp_path / "bad.toml", "[[datasets]]\nimage_directory = 'x'\nbatchsize = 2\n")
    report = lint_dataset(bad)
    assert _levels(report, "error") == [f"{bad}: [[datasets]] #0: unknown key 'batchsize'; did you mean 'batch_size'?"]
    assert report.exit_code == 1
    gone = lint_dataset(_images_toml(tmp_path))
    assert _found(gone, "config")[-1] == (
        "error", "images", f"{gone.config_path}: [[datasets]] #0 ({tmp_path / 'images'}): directory "
                           f"{tmp_path / 'images'} does not exist")
    with pytest.raises(ValueError, match="unknown goal 'portrait'"):
        lint_dataset(bad, goal="portrait")


def _tool():
    spec = importlib.util.spec_from_file_location("tool_check_dataset", REPO / "tools" / "check_dataset.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_cli_exit_status_text_and_json(tmp_path, capsys):
    _image(tmp_path, "a", 1)
    _image(tmp_path, "b", 2, caption=None)
    toml = _images_toml(tmp_path)
    out_json = tmp_path / "lint.json"
    assert _tool().main(["--dataset_config", str(toml), "--goal", "character", "--json", str(out_json)]) == 1
    text = capsys.readouterr().out
    assert f"ERROR   #0 {tmp_path / 'images' / 'b.png'}: missing caption" in text
    assert f"WARNING #0 {tmp_path / 'images' / 'a.png'}: only item in bucket 64x64x1" in text
    assert text.rstrip().endswith("1 images, 0 clips, 1 items: 1 error, 2 warnings, 4 notes")
    data = json.loads(out_json.read_text())
    assert data["counts"] == {"error": 1, "warning": 2, "info": 4} and data["images"] == 1
    assert data["findings"][-1]["check"] == "dataset_size"
    assert _tool().main(["--dataset_config", str(toml), "--task", "nope"]) == 2  # the check cannot run
    assert "error: unknown WAN task 'nope'" in capsys.readouterr().err


def test_cli_runs_from_another_folder(tmp_path):
    toml = write_demo_dataset(tmp_path / "demo", clips=1, images=1)
    result = subprocess.run([sys.executable, str(REPO / "tools" / "check_dataset.py"), "--dataset_config", str(toml)],
                            cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "2 samples (1 images, 1 clips)" in result.stdout
    assert format_report(lint_dataset(toml)).splitlines()[-1] == result.stdout.rstrip().splitlines()[-1]

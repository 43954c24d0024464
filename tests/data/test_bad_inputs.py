"""Every bad input named in the issue: a clear message with the file and the reason, and every other
item still cached; `strict` turns the first skip into a failure."""

from __future__ import annotations

import json
import logging
import os

import cv2
import pytest
import torch

from library.data import cache
from library.data.dataset_config import load_dataset_config
from library.data.datasets import DatasetError, build_train_datasets
from library.data.latent_caching import CachingError, cache_latents
from library.data.text_caching import cache_text_encoder_outputs

from .conftest import gradient_frame, write_caption, write_image, write_toml, write_video

BODY = """
[general]
resolution = 32
bucket_no_upscale = true
[[datasets]]
image_directory = "imgs"
cache_directory = "cache/imgs"
[[datasets]]
video_directory = "vids"
cache_directory = "cache/vids"
target_frames = [5]
frame_extraction = "chunk"
[[datasets]]
video_jsonl_file = "clips.jsonl"
cache_directory = "cache/jsonl"
target_frames = [5]
"""


def _bad_tree(root):
    write_image(root / "imgs/good.png")
    write_caption(root / "imgs/good.txt", "a good image")
    (root / "imgs/zero.png").write_bytes(b"")
    write_caption(root / "imgs/zero.txt", "zero bytes")
    (root / "imgs/fake.jpg").write_text("this is text, not a jpeg")
    write_caption(root / "imgs/fake.txt", "not an image")
    write_image(root / "imgs/small.png", 24, 24)
    write_caption(root / "imgs/small.txt", "too small")
    write_image(root / "imgs/nocap.png")
    write_image(root / "imgs/empty.png")
    write_caption(root / "imgs/empty.txt", "  \n")
    write_image(root / "imgs/latin1.png")
    (root / "imgs/latin1.txt").write_bytes("café".encode("latin-1"))
    write_video(root / "vids/good.mp4", frames=8)
    write_caption(root / "vids/good.txt", "a good clip")
    (root / "vids/corrupt.mp4").write_bytes(os.urandom(3000))
    write_caption(root / "vids/corrupt.txt", "corrupt")
    write_video(root / "vids/short.mp4", frames=3)
    write_caption(root / "vids/short.txt", "short")
    writer = cv2.VideoWriter(str(root / "vids/trunc.avi"), cv2.VideoWriter_fourcc(*"MJPG"), 16, (64, 48))
    for i in range(40):
        writer.write(gradient_frame(64, 48, i))
    writer.release()
    data = (root / "vids/trunc.avi").read_bytes()
    (root / "vids/trunc.avi").write_bytes(data[: len(data) // 2])
    write_caption(root / "vids/trunc.txt", "truncated")
    (root / "vids/trunc_tail.txt").unlink(missing_ok=True)
    write_video(root / "clips/ok.mp4", frames=6)
    lines = [json.dumps({"video_path": "clips/ok.mp4", "caption": "jsonl clip"}), "{not json",
             json.dumps({"video_path": "clips/gone.mp4", "caption": "missing"})]
    (root / "clips.jsonl").write_text("\n".join(lines) + "\n")
    return load_dataset_config(write_toml(root / "d.toml", BODY))


def test_every_bad_input_is_reported_and_the_rest_cached(tmp_path, tiny_models):
    config = _bad_tree(tmp_path)
    summary = cache_latents(config, tiny_models["t2v-tiny"].vae, task="t2v-tiny", progress=False)
    reasons = {s.key or os.path.basename(s.path): s.reason for s in summary.skipped}
    reasons = {key.replace(str(tmp_path) + "/", ""): reason for key, reason in reasons.items()}
    imgs = tmp_path / "imgs"
    assert reasons == {
        "zero.png": "zero-byte file",
        "fake.jpg": "not an image (unreadable as .jpg)",
        "small.png": "24x24 is smaller than the 32x32 bucket and bucket_no_upscale is set; use a larger source, "
                     "lower `resolution`, set enable_bucket or unset bucket_no_upscale",
        "nocap.png": f"missing caption: none of {imgs / 'nocap.txt'}, {tmp_path / 'captions/nocap.txt'}, "
                     f"{imgs / 'captions/nocap.txt'} exists",
        "empty.png": f"caption {imgs / 'empty.txt'} is empty; write a caption (empty captions are added by "
                     "caption_dropout_rate, not by empty files)",
        "latin1.png": f"caption {imgs / 'latin1.txt'} is not UTF-8 text (unexpected end of data at byte 3); "
                      "re-save it as UTF-8",
        "corrupt.mp4": "cannot open as a video (corrupt or unsupported format)",
        "short.mp4": "3 frames at 16 fps (3 source frames at 16 fps), shorter than the smallest target frame "
                     "count 5; use a longer clip or smaller target_frames",
        **{f"trunc_{start:05d}-005_32x32": f"truncated or corrupt video: decoding stopped at frame 18, "
                                           f"frame {start + 4} was needed (the header promised more)"
           for start in range(15, 40, 5)},  # windows 0, 5 and 10 decode
        "clips.jsonl:2": "line 2 is not valid JSON (Expecting property name enclosed in double quotes)",
        "clips.jsonl:3": f"line 3 names {tmp_path / 'clips/gone.mp4'}, which does not exist",
    }
    assert summary.ok and summary.cached == 1 + 1 + 3 + 1  # good.png; good.mp4; trunc.avi's first 3 windows; ok.mp4
    names = sorted(p.name for p in (tmp_path / "cache").rglob("*.safetensors"))
    assert names == ["good_00000-005_32x32_wan21.safetensors", "good_32x32_wan21.safetensors",
                     "ok_00000-005_32x32_wan21.safetensors",
                     *[f"trunc_{s:05d}-005_32x32_wan21.safetensors" for s in (0, 5, 10)]]
    assert "skipped fake.jpg" not in summary.report() and "fake.jpg: not an image" in summary.report()


def test_training_side_leaves_out_what_the_cacher_skipped(tmp_path, tiny_models, caplog):
    config = _bad_tree(tmp_path)
    models = tiny_models["t2v-tiny"]
    cache_latents(config, models.vae, task="t2v-tiny", progress=False)
    cache_text_encoder_outputs(config, models.t5, tokenizer=models.tokenizer, dtype=torch.float32, progress=False)
    with caplog.at_level(logging.WARNING):
        datasets = build_train_datasets(config, "t2v-tiny")
    for dataset in datasets:
        dataset.check_caches()
    trunc = [f"trunc_{s:05d}-005_32x32" for s in (0, 5, 10)]
    assert [i.key for i in datasets[1].items] == ["good_00000-005_32x32", *trunc]
    assert "trunc.avi: truncated or corrupt video" in caplog.text  # left out, with the cacher's reason
    assert json.loads(cache.skip_list_path(tmp_path / "cache/vids", "2.1", 0).read_text()).keys() == {
        f"trunc_{s:05d}-005_32x32" for s in range(15, 40, 5)}


def test_strict_fails_on_the_first_skip(tmp_path, tiny_models):
    config = _bad_tree(tmp_path)
    with pytest.raises(CachingError) as info:
        cache_latents(config, tiny_models["t2v-tiny"].vae, task="t2v-tiny", strict=True, progress=False)
    assert str(info.value).startswith(f"--strict: {tmp_path / 'd.toml'}: [[datasets]] #0 ({tmp_path / 'imgs'}): "
                                      f"skipped {tmp_path / 'imgs/empty.png'}: caption")
    with pytest.raises(CachingError, match="--strict"):
        cache_text_encoder_outputs(config, tiny_models["t2v-tiny"].t5, tokenizer=tiny_models["t2v-tiny"].tokenizer,
                                   strict=True, progress=False)


def test_a_dataset_with_no_usable_item(tmp_path, tiny_models):
    write_image(tmp_path / "good/a.png")
    write_caption(tmp_path / "good/a.txt", "fine")
    write_image(tmp_path / "bad/b.png")  # no caption anywhere
    config = load_dataset_config(write_toml(tmp_path / "d.toml", """
[general]
resolution = 32
[[datasets]]
image_directory = "good"
cache_directory = "c1"
[[datasets]]
image_directory = "bad"
cache_directory = "c2"
"""))
    summary = cache_latents(config, tiny_models["t2v-tiny"].vae, task="t2v-tiny", progress=False)
    assert not summary.ok and summary.cached == 1
    assert summary.errors == [f"{tmp_path / 'd.toml'}: [[datasets]] #1 ({tmp_path / 'bad'}): no usable item "
                              "(see the skips above)"]
    with pytest.raises(DatasetError, match=r"\[\[datasets\]\] #1 .*: no usable item \(1 skipped\)"):
        build_train_datasets(config, "t2v-tiny")


def test_missing_directory_is_an_error_other_datasets_cached(tmp_path, tiny_models):
    write_image(tmp_path / "good/a.png")
    write_caption(tmp_path / "good/a.txt", "fine")
    config = load_dataset_config(write_toml(tmp_path / "d.toml", "[general]\nresolution = 32\n[[datasets]]\n"
                                            "image_directory = 'good'\n[[datasets]]\nimage_directory = 'nowhere'\n"))
    summary = cache_latents(config, tiny_models["t2v-tiny"].vae, task="t2v-tiny", progress=False)
    assert summary.cached == 1 and summary.errors == [
        f"{tmp_path / 'd.toml'}: [[datasets]] #1 ({tmp_path / 'nowhere'}): directory {tmp_path / 'nowhere'} "
        "does not exist"]

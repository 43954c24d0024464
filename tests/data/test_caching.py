"""Latent and text caches: contents, metadata, I2V / TI2V specifics, staleness, resuming, process split."""

from __future__ import annotations

import json
import logging
import os

import pytest
import torch

from library.data import cache
from library.data.dataset_config import load_dataset_config
from library.data.datasets import CacheError, build_train_datasets
from library.data.latent_caching import cache_latents, load_pixels, split_for_rank
from library.data.text_caching import cache_text_encoder_outputs

from .conftest import write_caption, write_image, write_toml, write_video

BODY = """
[general]
resolution = 64
enable_bucket = true
[[datasets]]
image_directory = "data/images"
cache_directory = "cache/images"
[[datasets]]
video_directory = "data/videos"
cache_directory = "cache/videos"
target_frames = [1, 5]
frame_extraction = "head"
"""


def make_tree(root, body: str = BODY):
    write_image(root / "data/images/a.png")
    write_caption(root / "data/captions/a.txt", "a red cat")
    write_image(root / "data/images/b.png", 48, 64)
    write_caption(root / "data/images/b.txt", "a blue dog")
    write_video(root / "data/videos/v.mp4", frames=12, fps=24.0)  # 8 frames at 16 fps
    write_caption(root / "data/videos/v.txt", "a red cat")  # same caption as a.png: encoded once
    return load_dataset_config(write_toml(root / "d.toml", body))


def _load_vae(path):
    from library.wan.loading import load_vae

    return load_vae(path)


def test_t2v_latents_and_metadata(tmp_path, tiny_models):
    config = make_tree(tmp_path)
    summary = cache_latents(config, tiny_models["t2v-tiny"].vae, task="t2v-tiny", progress=False)
    assert (summary.cached, summary.reused, summary.skipped, summary.errors) == (4, 0, [], [])
    (dataset,) = build_train_datasets(config, "t2v-tiny")[:1]
    item = dataset.items[0]
    path = dataset.latent_path(item)
    assert path == tmp_path / "cache/images" / "a_80x48_wan21.safetensors"
    tensors = cache.load_tensors(path)
    assert set(tensors) == {"latents"} and tensors["latents"].dtype == torch.bfloat16
    with torch.no_grad():
        expected = _load_vae(tiny_models["t2v-tiny"].vae).encode(load_pixels(item)[None])[0]
    torch.testing.assert_close(tensors["latents"].float(), expected, atol=0.02, rtol=0.02)
    meta = cache.read_metadata(path)
    assert meta["item_key"] == "a_80x48" and meta["caption_source"] == str(tmp_path / "data/captions/a.txt")
    assert json.loads(meta["source_fingerprint"])["size"] == (tmp_path / "data/images/a.png").stat().st_size
    assert json.loads(meta["settings"]) == {"vae_kind": "2.1", "bucket": [80, 48, 1], "frames": [0], "fps": None}
    assert meta["vae_sha256_1mb"] == cache.file_head_sha256(tiny_models["t2v-tiny"].vae)


def test_i2v_image_latents_condition_on_the_first_frame(tmp_path, tiny_models):
    config = make_tree(tmp_path)
    cache_latents(config, tiny_models["t2v-tiny"].vae, task="t2v-tiny", progress=False)
    with pytest.raises(CacheError, match="has no image_latents"):  # a T2V cache cannot serve an I2V task
        build_train_datasets(config, "i2v-tiny")[1].check_caches()
    summary = cache_latents(config, tiny_models["i2v-tiny"].vae, task="i2v-tiny", progress=False)
    assert (summary.cached, summary.reused) == (4, 0)
    video = build_train_datasets(config, "i2v-tiny")[1]
    item = next(i for i in video.items if i.bucket[2] == 5)
    tensors = cache.load_tensors(video.latent_path(item))
    assert tensors["latents"].shape == tensors["image_latents"].shape == (16, 2, 6, 10)
    pixels = load_pixels(item)[None]
    condition = torch.zeros_like(pixels)
    condition[:, :, 0] = pixels[:, :, 0]
    with torch.no_grad():
        expected = _load_vae(tiny_models["i2v-tiny"].vae).encode(condition)[0]
    torch.testing.assert_close(tensors["image_latents"].float(), expected, atol=0.02, rtol=0.02)


def test_ti2v_uses_the_22_vae_step_and_24_fps(tmp_path, tiny_models):
    config = make_tree(tmp_path)
    summary = cache_latents(config, tiny_models["ti2v-tiny"].vae, task="ti2v-tiny", progress=False)
    assert summary.cached == 4 and not summary.skipped
    images, videos = build_train_datasets(config, "ti2v-tiny")
    assert {i.bucket for i in images.items} == {(64, 64, 1)}  # steps of 32: no 80x48 bucket
    clip = next(i for i in videos.items if i.bucket[2] == 5)
    assert clip.frames == (0, 1, 2, 3, 4) and clip.fps == 24.0  # the clip is already 24 fps
    tensors = cache.load_tensors(videos.latent_path(clip))
    assert set(tensors) == {"latents"} and tensors["latents"].shape == (48, 2, 4, 4)


def test_task_and_vae_must_agree(tmp_path, tiny_models):
    from library.data.latent_caching import CachingError

    config = make_tree(tmp_path)
    with pytest.raises(CachingError, match="task ti2v-tiny uses the WAN 2.2 VAE but the VAE file is a WAN 2.1 VAE"):
        cache_latents(config, tiny_models["t2v-tiny"].vae, task="ti2v-tiny", progress=False)


def test_stale_caches_are_rebuilt_never_used(tmp_path, tiny_models):
    config = make_tree(tmp_path)
    vae = tiny_models["t2v-tiny"].vae
    cache_latents(config, vae, task="t2v-tiny", progress=False)
    write_image(tmp_path / "data/images/a.png", 64, 48, mode="L")  # the source changes
    with pytest.raises(CacheError) as info:
        build_train_datasets(config, "t2v-tiny")[0].check_caches()
    assert f"source {tmp_path / 'data/images/a.png'} changed since it was cached" in str(info.value)
    summary = cache_latents(config, vae, task="t2v-tiny", progress=False)
    assert (summary.cached, summary.reused) == (1, 3)
    os.utime(tmp_path / "data/images/b.png", ns=(1, 1))  # mtime only: same content, still fresh
    assert cache_latents(config, vae, task="t2v-tiny", progress=False).reused == 4
    other_vae = tmp_path / "other_vae.pth"
    from library.wan.vae import WanVAE

    torch.manual_seed(1)
    torch.save(WanVAE(dim=8, z_dim=16).state_dict(), other_vae)
    summary = cache_latents(config, other_vae, task="t2v-tiny", progress=False)
    assert (summary.cached, summary.reused) == (4, 0)


def test_settings_change_gives_new_items(tmp_path, tiny_models):
    config = make_tree(tmp_path)
    cache_latents(config, tiny_models["t2v-tiny"].vae, task="t2v-tiny", progress=False)
    changed = load_dataset_config(write_toml(tmp_path / "d2.toml", BODY.replace("resolution = 64", "resolution = 32")))
    with pytest.raises(CacheError, match="missing"):
        build_train_datasets(changed, "t2v-tiny")[0].check_caches()
    assert cache_latents(changed, tiny_models["t2v-tiny"].vae, task="t2v-tiny", progress=False).cached == 4


def test_resumes_after_a_killed_run(tmp_path, tiny_models):
    config = make_tree(tmp_path)
    vae = tiny_models["t2v-tiny"].vae
    cache_latents(config, vae, task="t2v-tiny", progress=False)
    files = sorted((tmp_path / "cache").rglob("*_wan21.safetensors"))
    files[0].unlink()  # never written
    files[1].write_bytes(files[1].read_bytes()[:100])  # torn file from a crash without atomic writes
    (files[2].parent / f".{files[2].name}.x.tmp").write_bytes(b"partial")  # an interrupted atomic write
    summary = cache_latents(config, vae, task="t2v-tiny", progress=False)
    assert (summary.cached, summary.reused) == (2, 2)
    for dataset in build_train_datasets(config, "t2v-tiny"):
        assert [p for p in dataset.cache_problems() if p.startswith("latents")] == []


def test_process_split(tmp_path, tiny_models):
    assert split_for_rank(list(range(7)), 1, 3) == [1, 4]
    with pytest.raises(ValueError, match="rank 2 is outside world size 2"):
        split_for_rank([1], 2, 2)
    config = make_tree(tmp_path)
    vae = tiny_models["t2v-tiny"].vae
    first = cache_latents(config, vae, task="t2v-tiny", rank=0, world_size=2, progress=False)
    written = {p.name for p in (tmp_path / "cache").rglob("*_wan21.safetensors")}
    assert first.cached == 2 and len(written) == 2
    second = cache_latents(config, vae, task="t2v-tiny", rank=1, world_size=2, progress=False)
    assert second.cached == 2 and len(list((tmp_path / "cache").rglob("*_wan21.safetensors"))) == 4


def test_text_cache(tmp_path, tiny_models, caplog):
    models = tiny_models["t2v-tiny"]
    config = make_tree(tmp_path, BODY + "caption_dropout_rate = 0.5\n")
    write_caption(tmp_path / "data/captions/a.txt", "a  red   cat ")  # cleans to the video's caption
    summary = cache_text_encoder_outputs(config, models.t5, tokenizer=models.tokenizer, dtype=torch.float32,
                                         progress=False)
    assert (summary.cached, summary.reused) == (3, 0)  # "a red cat", "a blue dog", "" (dropout)
    path = cache.text_cache_path(tmp_path / "cache/videos", "a red cat")
    assert path == cache.text_cache_path(tmp_path / "cache/videos", "a  red   cat ")
    stored = cache.load_tensors(path)["t5"]
    from library.wan.loading import load_text_encoder

    encoder = load_text_encoder(models.t5, models.tokenizer, dtype=torch.float32)
    expected = encoder.encode(["a red cat"])[0]
    assert stored.shape == expected.shape and stored.shape[1] == 64  # true length, not padded to 512
    torch.testing.assert_close(stored.float(), expected, atol=0.02, rtol=0.02)
    assert cache.text_cache_path(tmp_path / "cache/videos", "").exists()
    assert not cache.text_cache_path(tmp_path / "cache/images", "").exists()  # no dropout there
    again = cache_text_encoder_outputs(config, models.t5, tokenizer=models.tokenizer, dtype=torch.float32,
                                       progress=False)
    assert (again.cached, again.reused) == (0, 3)
    from library.wan.tiny import tiny_t5_state_dict

    torch.save(tiny_t5_state_dict(64, seed=1), tmp_path / "other_t5.pth")  # other weights: another fingerprint
    changed = cache_text_encoder_outputs(config, tmp_path / "other_t5.pth", tokenizer=models.tokenizer,
                                         dtype=torch.float32, progress=False)
    assert changed.cached == 3
    write_caption(tmp_path / "data/images/b.txt", " ".join(["walks"] * 600))
    with caplog.at_level(logging.WARNING):
        cache_text_encoder_outputs(config, models.t5, tokenizer=models.tokenizer, dtype=torch.float32, progress=False)
    assert f"{tmp_path / 'data/images/b.txt'}: caption has" in caplog.text and "truncated to 512" in caplog.text

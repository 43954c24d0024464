"""WAN 2.1 I2V caches: `clip_fea` of each item's first frame beside the latents, the CLIP file's fingerprint,
missing / stale checks, `collate`, and the `--clip` flag of tools/cache_latents.py."""

from __future__ import annotations

import pytest
import torch

from library.data import cache
from library.data.datasets import CacheError, build_train_datasets, collate
from library.data.latent_caching import CachingError, cache_latents, load_pixels

from .test_caching import make_tree
from .test_tools import _tool

TASK = "i2v-tiny-2.1"


@pytest.fixture(scope="module")
def clip_models(tmp_path_factory):
    from library.wan.tiny import write_tiny_model_set

    return write_tiny_model_set(tmp_path_factory.mktemp("clip_models"), TASK)


def _tree_with_text(root, models):
    from library.data.text_caching import cache_text_encoder_outputs

    config = make_tree(root)
    cache_text_encoder_outputs(config, models.t5, tokenizer=models.tokenizer, dtype=torch.float32, progress=False)
    return config


def test_clip_fea_is_the_first_frame_through_clip(tmp_path, clip_models):
    from library.wan.loading import load_clip_vision

    config = _tree_with_text(tmp_path, clip_models)
    with pytest.raises(CachingError, match=r"task i2v-tiny-2.1 \(WAN 2.1 I2V\) also caches the CLIP image tokens "
                                           r"of each item's first frame: pass the CLIP vision file with --clip"):
        cache_latents(config, clip_models.vae, task=TASK, progress=False)
    summary = cache_latents(config, clip_models.vae, task=TASK, clip_path=clip_models.clip, progress=False)
    assert (summary.cached, summary.errors) == (4, [])
    video = build_train_datasets(config, TASK)[1]
    video.check_caches()
    item = next(i for i in video.items if i.bucket[2] == 5)
    tensors = cache.load_tensors(video.latent_path(item))
    assert set(tensors) == {"latents", "image_latents", "clip_fea"} and tensors["clip_fea"].shape == (257, 40)
    expected = load_clip_vision(clip_models.clip, dtype=torch.float32).encode(load_pixels(item)[None, :, 0])[0]
    torch.testing.assert_close(tensors["clip_fea"].float(), expected, atol=0.02, rtol=0.02)
    meta = cache.read_metadata(video.latent_path(item))
    assert meta["clip_sha256_1mb"] == cache.file_head_sha256(clip_models.clip)
    batch = collate([video[i] for i in range(len(video)) if video.items[i].bucket == item.bucket])
    assert batch["clip_fea"].shape == (1, 257, 40) and batch["clip_fea"].dtype == torch.float32
    assert batch["image_latents"] is not None


def test_missing_or_changed_clip_marks_the_cache_stale(tmp_path, clip_models):
    config = _tree_with_text(tmp_path, clip_models)
    cache_latents(config, clip_models.vae, task="i2v-tiny", progress=False)  # WAN 2.2 I2V: no clip_fea
    with pytest.raises(CacheError) as info:
        build_train_datasets(config, TASK)[0].check_caches()
    message = str(info.value)
    assert "has no clip_fea (cached without --clip, which WAN 2.1 I2V needs)" in message
    assert f"--task {TASK} --clip <CLIP>" in message
    assert cache_latents(config, clip_models.vae, task=TASK, clip_path=clip_models.clip, progress=False).cached == 4
    assert cache_latents(config, clip_models.vae, task=TASK, clip_path=clip_models.clip, progress=False).reused == 4
    from library.wan.tiny import tiny_clip_state_dict

    other = tmp_path / "other_clip.pth"
    torch.save(tiny_clip_state_dict(seed=5), other)
    summary = cache_latents(config, clip_models.vae, task=TASK, clip_path=other, progress=False)
    assert (summary.cached, summary.reused) == (4, 0)  # "cached with a different CLIP file": rebuilt
    images = build_train_datasets(config, TASK)[0]
    path = images.latent_path(images.items[0])  # as if this item had been re-cached with a third CLIP file
    meta = {k: v for k, v in cache.read_metadata(path).items() if k != "__keys__"}
    cache.write_safetensors_atomic(cache.load_tensors(path), path, {**meta, "clip_sha256_1mb": "0" * 64})
    with pytest.raises(CacheError, match="come from 2 different CLIP files"):
        images.check_caches()
    assert build_train_datasets(config, "i2v-tiny")[0][0]["clip_fea"] is None  # WAN 2.2 I2V ignores it


def test_cache_tool_takes_clip(tmp_path, clip_models, capsys):
    make_tree(tmp_path)
    common = ["--dataset_config", str(tmp_path / "d.toml"), "--vae", str(clip_models.vae), "--no_progress"]
    assert _tool("cache_latents").main([*common, "--task", TASK]) == 2
    assert "pass the CLIP vision file with --clip" in capsys.readouterr().out
    assert _tool("cache_latents").main([*common, "--task", TASK, "--clip", str(clip_models.vae)]) == 2
    assert "this is a WAN VAE, not a CLIP vision model" in capsys.readouterr().out
    assert _tool("cache_latents").main([*common, "--task", TASK, "--clip", str(clip_models.clip)]) == 0
    assert "4 cached" in capsys.readouterr().out
    assert _tool("cache_latents").main([*common, "--clip", str(clip_models.clip)]) == 0  # no --task: 2.1 I2V
    assert "4 reused" in capsys.readouterr().out

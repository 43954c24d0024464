"""The training-side API: check_caches, make_batches, collate, caption dropout, the DataLoader path."""

from __future__ import annotations

from collections import Counter

import pytest
import torch

from library.data.dataset_config import load_dataset_config
from library.data.datasets import CacheError, batch_loader, build_train_datasets, collate, make_batches
from library.data.latent_caching import cache_latents
from library.data.text_caching import cache_text_encoder_outputs

from .conftest import write_caption, write_image, write_toml, write_video

BODY = """
[general]
resolution = 64
enable_bucket = true
[[datasets]]
image_directory = "imgs"
cache_directory = "cache/imgs"
batch_size = 2
num_repeats = 3
caption_dropout_rate = 0.3
[[datasets]]
video_directory = "vids"
cache_directory = "cache/vids"
target_frames = [1, 5]
[[validation_datasets]]
image_directory = "val"
cache_directory = "cache/val"
"""


@pytest.fixture(scope="module")
def cached(tmp_path_factory, tiny_models):
    """A cached I2V tree: 5 images in two buckets (batch 2, 3 repeats, dropout), one clip, one val image."""
    root = tmp_path_factory.mktemp("cached")
    for i in range(3):
        write_image(root / f"imgs/land{i}.png", 64, 48)
        write_caption(root / f"imgs/land{i}.txt", f"landscape {i}")
    for i in range(2):
        write_image(root / f"imgs/port{i}.png", 48, 64)
        write_caption(root / f"imgs/port{i}.txt", f"portrait {i}")
    write_video(root / "vids/clip.mp4", frames=9, fps=16.0)
    write_caption(root / "vids/clip.txt", "a clip")
    write_image(root / "val/v.png")
    write_caption(root / "val/v.txt", "held out")
    config = load_dataset_config(write_toml(root / "d.toml", BODY))
    models = tiny_models["i2v-tiny"]
    assert cache_latents(config, models.vae, task="i2v-tiny", progress=False).ok
    assert cache_text_encoder_outputs(config, models.t5, tokenizer=models.tokenizer, dtype=torch.float32,
                                      progress=False).ok
    return config


def test_check_caches_names_the_command(tmp_path):
    write_image(tmp_path / "imgs/a.png")
    write_caption(tmp_path / "imgs/a.txt", "x")
    body = "[[datasets]]\nimage_directory = 'imgs'\nresolution = 32\n"
    config = load_dataset_config(write_toml(tmp_path / "d.toml", body))
    (dataset,) = build_train_datasets(config, "t2v-A14B")
    with pytest.raises(CacheError) as info:
        dataset.check_caches()
    message = str(info.value)
    assert f"latents {tmp_path / 'imgs/a_32x32_wan21.safetensors'}: missing" in message
    assert message.endswith(
        f"Run:\npython tools/cache_latents.py --dataset_config {tmp_path / 'd.toml'} --vae <VAE> --task t2v-A14B\n"
        f"python tools/cache_text_encoder_outputs.py --dataset_config {tmp_path / 'd.toml'} --t5 <T5>")


def test_train_and_validation_datasets(cached):
    train = build_train_datasets(cached, "i2v-tiny")
    (val,) = build_train_datasets(cached, "i2v-tiny", validation=True)
    for dataset in (*train, val):
        dataset.check_caches()
    assert [len(d) for d in train] == [5, 2] and len(val) == 1
    assert (train[0].batch_size, train[0].num_repeats) == (2, 3)
    assert "" in train[0].captions_needed() and "" not in train[1].captions_needed()


def test_make_batches(cached):
    datasets = build_train_datasets(cached, "i2v-tiny")
    batches = make_batches(datasets, seed=1, epoch=0)
    assert batches == make_batches(datasets, seed=1, epoch=0)
    assert batches != make_batches(datasets, seed=1, epoch=1)
    counts = Counter(pair for batch in batches for pair in batch)
    assert all(counts[(0, i)] == 3 for i in range(5)) and all(counts[(1, i)] == 1 for i in range(2))
    for batch in batches:
        assert len({d for d, _ in batch}) == 1
        assert len({datasets[d].items[i].bucket for d, i in batch}) == 1  # bucket-pure
        assert len(batch) <= datasets[batch[0][0]].batch_size
    # 9 landscape and 6 portrait repeats in batches of 2 -> 5 + 3; the clip's 2 buckets -> 2
    assert len(batches) == 10


def test_collate_and_items(cached):
    datasets = build_train_datasets(cached, "i2v-tiny")
    batch = next(b for b in make_batches(datasets, 0, 0)
                 if len(b) == 2 and datasets[b[0][0]].items[b[0][1]].bucket == (80, 48, 1))
    out = collate([datasets[d][i] for d, i in batch])
    assert out["latents"].shape == (2, 16, 1, 6, 10) and out["latents"].dtype == torch.float32
    assert out["image_latents"].shape == out["latents"].shape
    assert len(out["context"]) == 2 and out["context"][0].dtype == torch.float32 and out["context"][0].shape[1] == 64
    assert out["bucket"] == (80, 48, 1) and out["is_image"] == [True, True] and len(out["keys"]) == 2
    clip = datasets[1][[i.bucket[2] for i in datasets[1].items].index(5)]
    assert clip["latents"].shape == (16, 2, 6, 10) and clip["is_image"] is False
    with pytest.raises(ValueError, match="a batch must hold one bucket"):
        collate([datasets[0][0], clip])
    t2v = build_train_datasets(cached, "t2v-tiny")[0]
    assert collate([t2v[0]])["image_latents"] is None


def test_caption_dropout_is_deterministic(cached):
    (images, _) = build_train_datasets(cached, "i2v-tiny", seed=7)
    decisions = [[images.drop_caption(item, epoch) for item in images.items] for epoch in range(40)]
    again = build_train_datasets(cached, "i2v-tiny", seed=7)[0]
    assert decisions == [[again.drop_caption(item, e) for item in again.items] for e in range(40)]
    rate = sum(map(sum, decisions)) / 200
    assert 0.2 < rate < 0.4
    epoch = next(e for e, row in enumerate(decisions) if row[0])
    item = images.get(0, epoch)
    assert item["caption"] == "" and item["context"].shape[0] == 1  # the cached empty caption (EOS only)
    images.set_epoch(epoch)
    assert images[0]["caption"] == ""


def test_dataloader_with_workers(cached):
    datasets = build_train_datasets(cached, "i2v-tiny")
    loader = batch_loader(datasets, seed=3, epoch=2, num_workers=2, timeout=120)  # a stuck worker fails, not hangs
    batches = list(loader)
    assert len(batches) == len(make_batches(datasets, 3, 2))
    assert sum(len(b["keys"]) for b in batches) == 5 * 3 + 2
    assert all(b["latents"].shape[0] == len(b["keys"]) for b in batches)


def test_tensor_memo_rereads_rebuilt_files_and_keeps_its_budget(tmp_path):
    import os
    import time

    import torch

    from library.data.cache import TensorMemo, write_safetensors_atomic

    def save_file(tensors, path):
        write_safetensors_atomic(tensors, path, {})

    memo = TensorMemo(budget_bytes=3 * 4 * 256)  # three 256-float files
    paths = []
    for i in range(4):
        paths.append(tmp_path / f"{i}.safetensors")
        save_file({"x": torch.full((256,), float(i))}, str(paths[-1]))
    for p in paths:
        memo.load(p)
    assert memo.used == 3 * 4 * 256 and len(memo._items) == 3  # the oldest was evicted
    assert memo.load(paths[3]) is memo.load(paths[3])  # served from memory
    time.sleep(0.01)
    save_file({"x": torch.full((256,), 9.0)}, str(paths[3]))  # the cache was rebuilt
    os.utime(paths[3], None)
    assert memo.load(paths[3])["x"][0].item() == 9.0
    off = TensorMemo(budget_bytes=0)
    assert off.load(paths[0]) is not off.load(paths[0])

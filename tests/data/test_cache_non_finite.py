"""The caches never hold NaN: an encoder output with NaN or infinity (a float16 overflow, a damaged model the
load screen cannot see) stops the caching with a UserError naming the cache file and tensor, and writes
nothing for that item (a NaN cache would carry a valid checksum and be trained on)."""

from __future__ import annotations

import pytest
import torch

from library.data import cache, latent_caching
from library.data.cache import NonFiniteOutputError
from library.data.latent_caching import cache_latents
from library.errors import UserError

from .test_caching import make_tree


def test_a_non_finite_tensor_is_never_written(tmp_path):
    path = tmp_path / "x_wan21.safetensors"
    latents = torch.zeros(4, 1, 2, 2)
    latents[0, 0, 1, 1] = float("inf")
    with pytest.raises(UserError, match=r"x_wan21\.safetensors: the encoder's output 'latents' holds 0 NaN and 1 "
                                        r"infinite values \(of 16\), so it was not cached: with --vae_dtype float16"):
        cache.write_safetensors_atomic({"latents": latents.bfloat16()}, path, {})
    assert not list(tmp_path.iterdir())
    cache.write_safetensors_atomic({"latents": torch.ones(2, 2)}, path, {})  # finite: written as ever
    assert cache.load_verified(path)[1]


def test_latent_caching_stops_at_a_nan_latent(tmp_path, tiny_models, monkeypatch):
    config = make_tree(tmp_path)
    encode = latent_caching.encode_batch

    def overflowing(vae, videos, *args, **kwargs):  # what a float16 overflow gives
        latents, image_latents = encode(vae, videos, *args, **kwargs)
        return latents * float("nan"), image_latents

    monkeypatch.setattr(latent_caching, "encode_batch", overflowing)
    with pytest.raises(NonFiniteOutputError, match=r"_wan21\.safetensors: the encoder's output 'latents' holds"):
        cache_latents(config, tiny_models["t2v-tiny"].vae, task="t2v-tiny", progress=False)
    assert not list(tmp_path.rglob("*.safetensors"))

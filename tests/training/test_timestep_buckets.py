"""num_timestep_buckets (musubi-tuner's stratified timesteps): the per-epoch pool and the quantile mapping."""

from __future__ import annotations

import pytest
import torch

from library.config import config_from_dict
from library.training.flow_matching import METHODS, TimestepSampler
from library.training.timestep_buckets import TimestepBuckets, epoch_pool


def test_pool_is_stratified_shuffled_and_reproducible():
    pool = epoch_pool(3, 0, 0, 10, 4)  # ceil(10 / 4) = 3 per bucket, trimmed to 10
    assert len(pool) == 10 and pool == epoch_pool(3, 0, 0, 10, 4) and pool != epoch_pool(3, 1, 0, 10, 4)
    full = epoch_pool(3, 0, 0, 12, 4)
    assert sorted(int(u * 4) for u in full) == [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3]
    buckets = TimestepBuckets(4, 3, 0, batches_per_epoch=6, batch_size=2)
    assert buckets.uniforms(0, 1, 2).tolist() == full[2:4] and buckets.uniforms(0, 5, 1).tolist() == full[10:11]


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("preserve", [False, True])
def test_quantiles_follow_the_sampled_distribution(method, preserve):
    sampler = TimestepSampler(method=method, shift=3.0, min_timestep=100 if preserve else 0,
                              max_timestep=800 if preserve else 1000, preserve_distribution_shape=preserve,
                              weighting_scheme="mode" if method == "sigma" else "none")
    n = 4000
    u = (torch.arange(n, dtype=torch.float64) + 0.5) / n  # evenly spread quantiles
    stratified = sampler.from_uniform(u, tokens=1024).sort().values
    drawn = sampler.sample(n, torch.Generator().manual_seed(0), tokens=1024).sort().values
    assert (stratified - drawn).abs().max() < 0.05, method  # the same distribution (max quantile gap)
    if preserve:
        assert stratified.min() >= 0.1 - 1e-6 and stratified.max() <= 0.8 + 1e-6


def test_config_key():
    assert config_from_dict({"num_timestep_buckets": 5}).timesteps.num_timestep_buckets == 5
    assert config_from_dict({}).timesteps.num_timestep_buckets is None

"""`num_timestep_buckets` as musubi-tuner defines it: stratified noise levels, for steadier training on small
datasets.

For each epoch, musubi-tuner draws one uniform number in (0, 1) per sample of the epoch (batches x batch size):
ceil(total / N) of them in each of the N equal buckets [i / N, (i + 1) / N), shuffled together, trimmed to the
total; batch i takes the i-th batch-sized slice. Each number replaces the uniform (or, through the normal's
inverse CDF, the Gaussian) draw of the timestep distribution (`TimestepSampler.from_uniform`), so every part of
the noise range is visited evenly while the distribution keeps its shape. None or 1 turns it off.

Here the pool is seeded by (seed, epoch, process): reproducible and resumable, one stratified pool per process;
a batch slice is taken at `batch index x the largest batch size` of the training datasets.
"""

from __future__ import annotations

import logging
import math
import random

import torch

logger = logging.getLogger(__name__)


def epoch_pool(seed: int, epoch: int, rank: int, total: int, buckets: int) -> list[float]:
    """The epoch's stratified uniforms, `total` of them."""
    rng = random.Random(f"wan-timestep-buckets:{seed}:{epoch}:{rank}")
    per_bucket = math.ceil(total / buckets)
    pool = [rng.uniform(i / buckets, (i + 1) / buckets) for i in range(buckets) for _ in range(per_bucket)]
    rng.shuffle(pool)
    return pool[:total]


class TimestepBuckets:
    """The uniforms of each batch of each epoch for `count` buckets."""

    def __init__(self, count: int, seed: int, rank: int, batches_per_epoch: int, batch_size: int):
        self.count, self.seed, self.rank = count, seed, rank
        self.batches, self.batch_size = batches_per_epoch, batch_size
        self._epoch, self._pool = None, []

    @classmethod
    def from_config(cls, cfg, data, rank: int) -> "TimestepBuckets | None":
        count = cfg.timesteps.num_timestep_buckets
        if count is None or count <= 1:
            return None
        if getattr(cfg.model, "dit_high_noise", None):
            logger.warning("num_timestep_buckets with two experts: each step's expert is drawn first and the bucketed "
                           "noise levels are taken within its range (musubi-tuner warns it works less well there)")
        size = max(ds.batch_size for ds in data.datasets)
        return cls(count, data.seed, rank, max(1, data.batches_per_epoch), size)

    def uniforms(self, epoch: int, batch: int, n: int) -> torch.Tensor:
        """The uniforms of batch `batch` (0-based within the epoch) of `n` samples."""
        if self._epoch != epoch:
            self._epoch = epoch
            self._pool = epoch_pool(self.seed, epoch, self.rank, self.batches * self.batch_size, self.count)
        start = (batch % self.batches) * self.batch_size
        return torch.tensor(self._pool[start:start + n], dtype=torch.float64)

"""Flow matching as WAN trains it: noise levels, noisy inputs, targets and loss weights.

    sigma ~ p(sigma) on (0, 1)                 (timestep_sampling, discrete_flow_shift, sigmoid_scale, ...)
    x_t    = (1 - sigma) * x0 + sigma * noise   (rectified flow: a straight line from data to noise)
    target = noise - x0                         (the velocity the DiT predicts)
    t      = sigma * 1000                       (what the DiT's timestep embedding sees)

Everything takes an explicit `torch.Generator`, so sampling is reproducible and independent of any other
random stream (samples, dropout).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

METHODS = ("sigma", "uniform", "sigmoid", "shift", "flux_shift", "logsnr", "logit_normal")
# flux_shift: the log of the shift grows with the tokens per frame, linearly from 0.5 at 256 to 1.15 at 4096
_FLUX_SLOPE = (1.15 - 0.5) / (4096 - 256)
_FLUX_BIAS = 0.5 - _FLUX_SLOPE * 256
WEIGHTINGS = ("none", "logit_normal", "mode", "cosmap", "sigma_sqrt")


@dataclass(frozen=True)
class TimestepSampler:
    """How noise levels are drawn. min/max are in 0..1000 like the Kohya flags."""

    method: str = "shift"
    shift: float = 3.0  # discrete_flow_shift
    sigmoid_scale: float = 1.0
    logit_mean: float = 0.0
    logit_std: float = 1.0
    mode_scale: float = 1.29
    weighting_scheme: str = "none"
    min_timestep: float = 0.0
    max_timestep: float = 1000.0
    preserve_distribution_shape: bool = False

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"timestep_sampling {self.method!r} is not one of {', '.join(METHODS)}")
        if self.weighting_scheme not in WEIGHTINGS:
            raise ValueError(f"weighting_scheme {self.weighting_scheme!r} is not one of {', '.join(WEIGHTINGS)}")
        if not 0 <= self.min_timestep < self.max_timestep <= 1000:
            raise ValueError(
                f"need 0 <= min_timestep < max_timestep <= 1000, got {self.min_timestep} and {self.max_timestep}"
            )

    # ---- the base distributions on (0, 1) -----------------------------------------------------------

    def _raw(self, n: int, gen: torch.Generator | None, tokens: int | None = None,
             u: torch.Tensor | None = None) -> torch.Tensor:
        """n draws; with `u` (uniforms in (0, 1), e.g. stratified by num_timestep_buckets) each draw is the
        distribution's quantile at u: the standard normal through its inverse CDF, uniforms as they are."""
        if u is not None:
            u = u.double().clamp(1e-7, 1 - 1e-7)
            gaussian = (math.sqrt(2.0) * torch.erfinv(2.0 * u - 1.0)).float()
            normal = lambda: gaussian  # noqa: E731
        else:
            normal = lambda: torch.randn(n, generator=gen)  # noqa: E731
        if self.method == "flux_shift":  # resolution-dependent shift: longer videos spend more time at high noise
            if tokens is None:
                raise ValueError("flux_shift sampling needs the token count of the batch")
            return shift_sigma(torch.sigmoid(self.sigmoid_scale * normal()), flux_shift_for(tokens))
        if self.method == "uniform":
            return u.float() if u is not None else torch.rand(n, generator=gen)
        if self.method == "sigmoid":
            return torch.sigmoid(self.sigmoid_scale * normal())
        if self.method == "shift":
            return shift_sigma(torch.sigmoid(self.sigmoid_scale * normal()), self.shift)
        if self.method == "logsnr":  # log-SNR ~ N(mean, std); sigma = sigmoid(-logsnr / 2)
            return torch.sigmoid(-(self.logit_mean + self.logit_std * normal()) / 2)
        if self.method == "logit_normal":
            return torch.sigmoid(self.logit_mean + self.logit_std * normal())
        # "sigma": the shifted inference-style schedule, with the density of `weighting_scheme`
        return shift_sigma(self._density(n, gen, u), self.shift)

    def _density(self, n: int, gen: torch.Generator | None, u: torch.Tensor | None = None) -> torch.Tensor:
        if self.weighting_scheme == "logit_normal":
            gaussian = torch.randn(n, generator=gen) if u is None else \
                (math.sqrt(2.0) * torch.erfinv(2.0 * u.double().clamp(1e-7, 1 - 1e-7) - 1.0)).float()
            return torch.sigmoid(self.logit_mean + self.logit_std * gaussian)
        u = torch.rand(n, generator=gen) if u is None else u.float()
        if self.weighting_scheme == "mode":
            return 1 - u - self.mode_scale * (torch.cos(math.pi * u / 2) ** 2 - 1 + u)
        return u

    # ---- public -------------------------------------------------------------------------------------

    def sample(self, n: int, gen: torch.Generator, tokens: int | None = None) -> torch.Tensor:
        """n noise levels sigma in [min_timestep/1000, max_timestep/1000], float32 [n]. `tokens` (the
        batch's tokens per frame) is needed by `flux_shift` only.

        Restricting the range either rescales the whole distribution into it (default, as musubi does) or,
        with `preserve_distribution_shape`, keeps the shape and rejects draws outside the range.
        """
        lo, hi = self.min_timestep / 1000.0, self.max_timestep / 1000.0
        if not self.preserve_distribution_shape or (lo == 0.0 and hi == 1.0):
            return (self._raw(n, gen, tokens) * (hi - lo) + lo).clamp(1e-5, 1.0).float()
        out = torch.empty(0)
        for _ in range(1000):  # rejection sampling; the range always has mass for these distributions
            draw = self._raw(max(64, 4 * n), gen, tokens)
            out = torch.cat([out, draw[(draw >= lo) & (draw <= hi)]])
            if out.numel() >= n:
                return out[:n].clamp(1e-5, 1.0).float()
        raise RuntimeError(
            f"timestep range {self.min_timestep}-{self.max_timestep} has almost no probability under "
            f"{self.method}; widen it or turn off preserve_distribution_shape"
        )

    def from_uniform(self, u: torch.Tensor, tokens: int | None = None) -> torch.Tensor:
        """Noise levels at the quantiles `u` [n] (num_timestep_buckets): the distribution `sample` draws from,
        u mapped through its quantile function. With `preserve_distribution_shape` the quantiles are taken
        within the part of the distribution that lies in [min, max] (the same shape `sample` keeps by
        rejection), else the whole distribution is rescaled into the range as `sample` does."""
        lo, hi = self.min_timestep / 1000.0, self.max_timestep / 1000.0
        if not self.preserve_distribution_shape or (lo == 0.0 and hi == 1.0):
            return (self._raw(len(u), None, tokens, u) * (hi - lo) + lo).clamp(1e-5, 1.0).float()
        grid = torch.linspace(1e-6, 1 - 1e-6, 20001, dtype=torch.float64)
        inside = ((values := self._raw(len(grid), None, tokens, grid)) >= lo) & (values <= hi)
        if not bool(inside.any()):
            raise RuntimeError(f"timestep range {self.min_timestep}-{self.max_timestep} has almost no probability "
                               f"under {self.method}; widen it or turn off preserve_distribution_shape")
        where = inside.nonzero()
        a, b = grid[where.min()], grid[where.max()]  # every method maps u monotonically
        return self._raw(len(u), None, tokens, a + u.double() * (b - a)).clamp(lo, hi).clamp(1e-5, 1.0).float()

    def loss_weight(self, sigma: torch.Tensor) -> torch.Tensor:
        """Per-sample loss weights [n] (SD3-style); ones for schemes that only shape the sampling."""
        if self.weighting_scheme == "sigma_sqrt":
            return (sigma**-2.0).float()
        if self.weighting_scheme == "cosmap":
            return (2.0 / (math.pi * (1 - 2 * sigma + 2 * sigma**2))).float()
        return torch.ones_like(sigma, dtype=torch.float32)


def flux_shift_for(tokens: int) -> float:
    """The `flux_shift` flow shift for `tokens` tokens per frame (832x480 -> 1560 tokens -> shift 2.05)."""
    return math.exp(_FLUX_SLOPE * tokens + _FLUX_BIAS)


def shift_sigma(sigma: torch.Tensor, shift: float) -> torch.Tensor:
    """The flow shift s*sigma / (1 + (s-1)*sigma): s > 1 spends more steps at high noise."""
    return shift * sigma / (1 + (shift - 1) * sigma)


def add_noise(x0: torch.Tensor, noise: torch.Tensor, sigma: torch.Tensor):
    """x0, noise [B, C, F, H, W], sigma [B] -> (x_t, target), both [B, C, F, H, W]."""
    s = sigma.view(-1, *([1] * (x0.dim() - 1))).to(x0.dtype)
    return (1 - s) * x0 + s * noise, noise - x0

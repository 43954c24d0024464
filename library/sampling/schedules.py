"""Flow-matching inference schedules: the noise levels (sigmas) a sampler walks and the timesteps the DiT sees.

A rectified-flow sample at noise level sigma is x = (1 - sigma) * x0 + sigma * noise and the DiT, given
t = sigma * 1000, predicts the flow v = noise - x0. A schedule is N decreasing sigmas plus a final 0, each
passed through the shift sigma' = s * sigma / (1 + (s - 1) * sigma) that spends more steps at high noise.

Two conventions are offered:
- "wan" (default): the official WAN code. UniPC starts from sigma 0.999 (linspace(0.999, 0, N+1)[:-1]),
  DPM++ and Euler from 1.0 (linspace(1, 0, N+1)[:-1]); the model sees int(sigma' * 1000).
- "diffusers": what diffusers' schedulers compute, so outputs can be compared with a diffusers pipeline.
  UniPC (use_flow_sigmas) uses linspace(1, 1/1000, N+1)[:-1] with the first sigma nudged below 1,
  DPM++ uses linspace(0.999, 0, N+1)[:-1], both with integer timesteps; FlowMatchEuler takes N points
  from 1 to shift(1/1000), shifts them again, and feeds float timesteps sigma * 1000.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

SAMPLERS = ("unipc", "euler", "dpm++")
CONVENTIONS = ("wan", "diffusers")
NUM_TRAIN_TIMESTEPS = 1000


@dataclass(frozen=True)
class FlowSchedule:
    """sigmas [N + 1] (float64, decreasing, last 0) and timesteps [N] (float32, what the DiT is given)."""

    sigmas: torch.Tensor
    timesteps: torch.Tensor

    @property
    def steps(self) -> int:
        return int(self.timesteps.numel())


def shift_sigmas(sigma: torch.Tensor, shift: float) -> torch.Tensor:
    """sigma' = s * sigma / (1 + (s - 1) * sigma): s > 1 moves every noise level up."""
    return shift * sigma / (1 + (shift - 1) * sigma)


def _as_schedule(sigmas: torch.Tensor, integer_timesteps: bool) -> FlowSchedule:
    sigmas = sigmas.to(torch.float32).to(torch.float64)  # the reference implementations keep fp32 sigmas
    timesteps = sigmas * NUM_TRAIN_TIMESTEPS
    if integer_timesteps:
        timesteps = timesteps.trunc()  # the official code casts to int64 (truncation)
    final = torch.zeros(1, dtype=torch.float64)
    return FlowSchedule(sigmas=torch.cat([sigmas, final]), timesteps=timesteps.to(torch.float32))


def flow_schedule(steps: int, shift: float, sampler: str = "unipc", convention: str = "wan") -> FlowSchedule:
    """The schedule `sampler` runs for `steps` steps at flow shift `shift` (see the module docstring)."""
    if steps < 1:
        raise ValueError(f"steps must be at least 1, got {steps}")
    if shift <= 0:
        raise ValueError(f"flow shift must be positive, got {shift}")
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}; choose one of {', '.join(SAMPLERS)}")
    if convention not in CONVENTIONS:
        raise ValueError(f"unknown schedule convention {convention!r}; choose one of {', '.join(CONVENTIONS)}")
    n, dt = steps, 1.0 / NUM_TRAIN_TIMESTEPS
    if convention == "wan":
        start = 1.0 - dt if sampler == "unipc" else 1.0
        return _as_schedule(shift_sigmas(torch.linspace(start, 0.0, n + 1, dtype=torch.float64)[:-1], shift), True)
    if sampler == "unipc":
        sigmas = shift_sigmas(torch.linspace(1.0, dt, n + 1, dtype=torch.float64)[:-1], shift)
        if abs(sigmas[0].item() - 1.0) < 1e-6:
            sigmas[0] -= 1e-6  # keeps log(1 - sigma) finite in the first update
        return _as_schedule(sigmas, True)
    if sampler == "dpm++":
        return _as_schedule(shift_sigmas(torch.linspace(1.0 - dt, 0.0, n + 1, dtype=torch.float64)[:-1], shift), True)
    low = shift_sigmas(torch.tensor(dt, dtype=torch.float64), shift).item()
    return _as_schedule(shift_sigmas(torch.linspace(1.0, low, n, dtype=torch.float64), shift), False)

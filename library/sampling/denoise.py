"""The denoising loop: classifier-free guidance, the A14B expert switch, I2V and TI2V conditioning.

    for each step i:  t = timesteps[i]
        expert = high-noise if t >= boundary * 1000 else low-noise       (A14B; else the only DiT)
        v = uncond + g_expert * (cond - uncond)                           (CFG with the negative prompt)
        x = solver.step(i, x, v)
        TI2V with an image: frame 0 <- the clean image latent             (re-applied after every step)

I2V (A14B, 2.1 I2V): the DiT also gets y = [4 mask channels | image latent] (`library.wan.conditioning.i2v_condition`), unchanged all along.
TI2V: frame 0 holds the clean image latent and its tokens get timestep 0 (per-token timesteps [B, L]).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from library.wan.conditioning import pick_expert

from .schedules import FlowSchedule
from .solvers import make_solver


@dataclass
class Expert:
    """One DiT that denoises part of the schedule, with its CFG scale."""

    name: str  # "high_noise", "low_noise" or "dit"
    model: torch.nn.Module
    guidance: float


@dataclass
class Conditioning:
    """Text and image inputs of one sample (batch 1)."""

    context: Sequence[torch.Tensor]  # [L, d] prompt embedding(s), one per batch item
    negative: Sequence[torch.Tensor] | None = None  # negative prompt embedding(s); None: no CFG
    y: torch.Tensor | None = None  # I2V: [B, 4 + z, T, h, w]
    first_frame: torch.Tensor | None = None  # TI2V: clean latent of frame 0, [B, z, 1, h, w]
    clip_fea: torch.Tensor | None = None  # WAN 2.1 I2V CLIP tokens


def _token_timesteps(t: torch.Tensor, latents: torch.Tensor, patch: tuple[int, int, int]) -> torch.Tensor:
    """TI2V: one timestep per token [B, L], 0 on frame 0 (the clean image), t elsewhere (f-major order)."""
    b, _, frames, h, w = latents.shape
    per_frame = (h // patch[1]) * (w // patch[2])
    ts = t.to(torch.float32).expand(b, frames // patch[0], per_frame).clone()
    ts[:, 0] = 0.0
    return ts.flatten(1)


def _flow(model, x, t, cond: Conditioning, guidance: float) -> torch.Tensor:
    """The guided flow: uncond + g * (cond - uncond); g == 1 or no negative prompt skips the uncond pass."""
    v = model(x, t, list(cond.context), y=cond.y, clip_fea=cond.clip_fea)
    if cond.negative is None or guidance == 1.0:
        return v
    v_neg = model(x, t, list(cond.negative), y=cond.y, clip_fea=cond.clip_fea)
    return v_neg + guidance * (v - v_neg)


@torch.no_grad()
def denoise(latents: torch.Tensor, schedule: FlowSchedule, experts: Sequence[Expert], cond: Conditioning,
            sampler: str = "unipc", boundary: float | None = None,
            progress: Callable[[int, int, str], None] | None = None) -> torch.Tensor:
    """Run the sampler from pure noise `latents` [B, z, T, h, w] (fp32) to clean latents."""
    solver = make_solver(sampler, schedule)
    x = latents.float()
    keep = None
    if cond.first_frame is not None:  # TI2V: frame 0 is the clean image latent, never noise
        keep = torch.ones_like(x)
        keep[:, :, :1] = 0.0
        x = (1 - keep) * cond.first_frame.to(x) + keep * x
    b = x.shape[0]
    for i in range(schedule.steps):
        t = schedule.timesteps[i].to(x.device)
        expert = pick_expert(experts, float(t), boundary)
        patch = getattr(getattr(expert.model, "variant", None), "patch_size", (1, 2, 2))
        t_in = _token_timesteps(t, x, patch) if keep is not None else t.expand(b)
        flow = _flow(expert.model, x, t_in, cond, expert.guidance)
        x = solver.step(i, x, flow.float())
        if keep is not None:
            x = (1 - keep) * cond.first_frame.to(x) + keep * x
        if progress is not None:
            progress(i + 1, schedule.steps, expert.name)
    return x

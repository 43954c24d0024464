"""The denoising loop: classifier-free guidance, the A14B expert switch, I2V and TI2V conditioning.

    for each step i:  t = timesteps[i]
        expert = high-noise if t >= boundary * 1000 else low-noise       (A14B; else the only DiT)
        v = uncond + g_expert * (cond - uncond)                           (CFG with the negative prompt)
            (on the steps `guidance.cfg_steps` keeps; skip-layer guidance where `guidance.slg_steps` says)
        x = solver.step(i, x, v)
        TI2V with an image: frame 0 <- the clean image latent             (re-applied after every step)

I2V (A14B, 2.1 I2V): the DiT also gets y = [4 mask channels | image latent]
(`library.wan.conditioning.i2v_condition`), unchanged all along.
TI2V: frame 0 holds the clean image latent and its tokens get timestep 0 (per-token timesteps [B, L]).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from library.wan.conditioning import pick_expert

from .guidance import GuidanceOptions, skipping_blocks
from .schedules import FlowSchedule
from .solvers import make_solver


@dataclass
class GuidedExpert:
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
    frame_positions: list[int] | None = None  # one-frame inference: the RoPE time index of each latent frame
    reference_frames: int = 0  # VACE: leading latent frames that hold reference images (y is the VACE context)
    full_ref: torch.Tensor | None = None  # Fun-Control with `ref_conv`: the reference image's latent [B, z, h, w]

    def extra(self) -> dict:
        return ({} if self.frame_positions is None else {"frame_positions": self.frame_positions}) | \
            ({} if self.full_ref is None else {"full_ref": self.full_ref})


def _token_timesteps(t: torch.Tensor, latents: torch.Tensor, patch: tuple[int, int, int]) -> torch.Tensor:
    """TI2V: one timestep per token [B, L], 0 on frame 0 (the clean image), t elsewhere (f-major order)."""
    b, _, frames, h, w = latents.shape
    per_frame = (h // patch[1]) * (w // patch[2])
    ts = t.to(torch.float32).expand(b, frames // patch[0], per_frame).clone()
    ts[:, 0] = 0.0
    return ts.flatten(1)


def _flow(model, x, t, cond: Conditioning, guidance: float, cfg: bool = True, slg: GuidanceOptions | None = None):
    """The guided flow: uncond + g * (cond - uncond). No negative prompt, a CFG-skipped step or g == 1 (without
    skip-layer guidance) skip the uncond pass; `slg` (on this step) adds skip-layer guidance."""
    v = model(x, t, list(cond.context), y=cond.y, clip_fea=cond.clip_fea, **cond.extra())
    if cond.negative is None or not cfg or (guidance == 1.0 and slg is None):
        return v

    def uncond(skip: tuple[int, ...] = ()) -> torch.Tensor:
        with skipping_blocks(model, skip):
            return model(x, t, list(cond.negative), y=cond.y, clip_fea=cond.clip_fea, **cond.extra())

    if slg is not None and slg.slg_mode == "uncond":  # Wan2GP: the skip-layer flow is the uncond
        v_skip = uncond(slg.slg_layers)
        return v_skip + guidance * (v - v_skip)
    v_neg = uncond()
    out = v_neg + guidance * (v - v_neg)
    if slg is not None:  # SD 3.5: push away from the skip-layer flow as well
        out = out + slg.slg_scale * (v - uncond(slg.slg_layers))
    return out


@torch.no_grad()
def denoise(latents: torch.Tensor, schedule: FlowSchedule, experts: Sequence[GuidedExpert], cond: Conditioning,
            sampler: str = "unipc", boundary: float | None = None,
            progress: Callable[[int, int, str], None] | None = None, guidance: GuidanceOptions | None = None,
            activate: Callable[[GuidedExpert], None] | None = None) -> torch.Tensor:
    """Run the sampler from pure noise `latents` [B, z, T, h, w] (fp32) to clean latents. `activate` is
    called with each expert before its first step (offloading the inactive one)."""
    solver = make_solver(sampler, schedule)
    guidance = guidance or GuidanceOptions()
    cfg_steps, slg_steps = guidance.cfg_steps(schedule.steps), guidance.slg_steps(schedule.steps)
    active = None
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
        if activate is not None and expert is not active:
            activate(expert)
            active = expert
        patch = getattr(getattr(expert.model, "variant", None), "patch_size", (1, 2, 2))
        t_in = _token_timesteps(t, x, patch) if keep is not None else t.expand(b)
        flow = _flow(expert.model, x, t_in, cond, expert.guidance, cfg_steps[i], guidance if slg_steps[i] else None)
        x = solver.step(i, x, flow.float())
        if keep is not None:
            x = (1 - keep) * cond.first_frame.to(x) + keep * x
        if progress is not None:
            progress(i + 1, schedule.steps, expert.name)
    return x

"""Facts of the WAN model family's inputs shared by training and generation: the I2V conditioning
tensor `y` and which A14B expert owns a timestep.

- I2V (A14B, 2.1 I2V): the DiT also gets y = [4 mask channels | image latent]. The official mask is 1 on
  all 4 channels of latent frame 0 (the 4 video frames folded into it) and 0 on the other frames.
- WAN 2.2 A14B: the high-noise expert owns t >= boundary * 1000, the low-noise expert t below it.
"""

from __future__ import annotations

from typing import Protocol, Sequence, TypeVar

import torch

HIGH_NOISE, LOW_NOISE = "high_noise", "low_noise"


def i2v_condition(image_latents: torch.Tensor) -> torch.Tensor:
    """[B, z, T, h, w] encoding of (image, zero frames) -> y [B, 4 + z, T, h, w] (mask channels first)."""
    b, _, t, h, w = image_latents.shape
    mask = torch.zeros(b, 4, t, h, w, dtype=image_latents.dtype, device=image_latents.device)
    mask[:, :, 0] = 1.0
    return torch.cat([mask, image_latents], dim=1)


class _Named(Protocol):
    name: str


E = TypeVar("E", bound=_Named)


def expert_owning(timestep: float, boundary: float | None) -> str:
    """The name of the A14B expert that owns `timestep` (0..1000) for a boundary fraction in (0, 1)."""
    if boundary is None:
        raise ValueError("two experts need a boundary (timestep_boundary) to switch between them")
    return HIGH_NOISE if timestep >= boundary * 1000.0 else LOW_NOISE


def pick_expert(experts: Sequence[E], timestep: float, boundary: float | None) -> E:
    """The expert of `experts` (objects with a `name`) that owns `timestep`; a single DiT owns every one.
    With two experts loaded and the owner missing, that is an error, never a silent fallback."""
    if len(experts) == 1:
        return experts[0]
    name = expert_owning(timestep, boundary)
    for expert in experts:
        if expert.name == name:
            return expert
    raise ValueError(f"timestep {timestep:g} belongs to the {name} expert, which is not loaded")

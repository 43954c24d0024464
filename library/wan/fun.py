"""The Fun-InP and Fun-Control conditioning (alibaba-pai VideoX-Fun models), shared by training and generation.

Fun-InP (WAN 2.1 1.3B / 14B, WAN 2.2 A14B) is conditioned exactly like the official I2V models:
y = [4 mask channels | image latents] (`library.wan.conditioning.i2v_condition`), so its variants need
nothing here. Fun-Control puts the control video's latents right after the noisy latents:

    DiT input = [noisy latents z | control latents z | tail]         (channels, in this order)
    WAN 2.1 (in_dim 48, tail z):      the start image's latent in frame 0, zeros elsewhere; all zeros
                                      without a start image (t2v-*-FC). CLIP tokens of the start image,
                                      or zeros [257, 1280] without one.
    WAN 2.2 A14B (in_dim 52, tail 4 + z): the I2V conditioning [mask | image latents] with a start image,
                                      all zeros without one; no CLIP.

Models with `ref_conv` (Fun-Control V1.1 and 2.2) also embed a reference frame as an extra first frame of
tokens (see `WanModel.forward`): a user's reference image (library/data/fun_reference.py), or zeros without
one, as VideoX-Fun passes. Sources and
the comparison with musubi-tuner are in docs/variants.md.
"""

from __future__ import annotations

from dataclasses import replace

import torch

from .checkpoint_files import CheckpointError
from .conditioning import i2v_condition
from .variants import WanVariant


class FunConditionError(ValueError):
    """Inputs that do not fit a Fun variant's channels."""


def control_tail_channels(variant: WanVariant) -> int:
    """Channels after the control latents: 16 on WAN 2.1 (image latents), 20 on WAN 2.2 (mask + latents)."""
    return variant.in_dim - 2 * variant.latent_channels


def fun_control_condition(variant: WanVariant, control_latents: torch.Tensor,
                          image_latents: torch.Tensor | None = None) -> torch.Tensor:
    """y [B, in_dim - z, T, h, w] for a Fun-Control model from the control latents [B, z, T, h, w] and, with a
    start image, the latents [B, z, T, h, w] of (start image, black frames) as the I2V cache holds them."""
    z = variant.latent_channels
    if control_latents.shape[1] != z:
        raise FunConditionError(f"{variant.name}: control latents have {control_latents.shape[1]} channels, "
                                f"expected {z}")
    tail = control_tail_channels(variant)
    b, _, t, h, w = control_latents.shape
    if image_latents is None:
        rest = control_latents.new_zeros(b, tail, t, h, w)
    elif image_latents.shape[2:] != control_latents.shape[2:]:
        raise FunConditionError(f"{variant.name}: image latents {tuple(image_latents.shape)} and control latents "
                                f"{tuple(control_latents.shape)} differ in frames or size")
    elif tail == z:  # WAN 2.1 Fun-Control: the start image latent in frame 0 only
        rest = torch.zeros_like(image_latents)
        rest[:, :, :1] = image_latents[:, :, :1]
    elif tail == z + 4:  # WAN 2.2 Fun-Control: the full I2V conditioning
        rest = i2v_condition(image_latents)
    else:
        raise FunConditionError(f"{variant.name}: {variant.in_dim} input channels fit no known Fun-Control layout")
    return torch.cat([control_latents, rest.to(control_latents.dtype)], dim=1)


def inpaint_condition(latents: torch.Tensor, end_frame: bool) -> torch.Tensor:
    """Fun-InP: [B, z, T, h, w] latents of (start image, black frames[, end image]) -> y [B, 4 + z, T, h, w].

    The mask is the pixel mask (1 on the kept frames) folded 4 frames per latent frame with frame 0 counted
    4 times, as VideoX-Fun builds `mask_latents`: all 4 channels of latent frame 0, and with an end image
    channel 3 of the last latent frame (the last pixel frame is the 4th of its group)."""
    y = i2v_condition(latents)
    if end_frame:
        y[:, 3, -1] = 1.0
    return y


def zero_clip_features(variant: WanVariant, batch: int, device=None, dtype=torch.float32) -> torch.Tensor:
    """The CLIP tokens a WAN 2.1 Fun model gets without a start image: zeros [B, 257, clip_dim]."""
    return torch.zeros(batch, variant.clip_tokens, variant.clip_dim, device=device, dtype=dtype)


def with_file_features(variant: WanVariant, has_ref_conv: bool, source: str) -> WanVariant:
    """The variant as the checkpoint file has it: Fun-Control V1.1 and 2.2 files carry `ref_conv`. A
    `ref_conv` on anything but a Fun-Control task is an error naming the file."""
    if not has_ref_conv:
        return variant
    if not variant.control:
        raise CheckpointError(
            f"{source}: the checkpoint has `ref_conv` weights (a Fun-Control V1.1 / WAN 2.2 Fun-Control model) but "
            f"the task is {variant.describe()}; set `task` to the Fun-Control task of this model (t2v-1.3B-FC, "
            "t2v-14B-FC, i2v-14B-FC, t2v-A14B-FC or i2v-A14B-FC)")
    return replace(variant, ref_conv=True)

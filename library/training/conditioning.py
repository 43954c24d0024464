"""Image-to-video conditioning built exactly as the official samplers build it.

I2V-A14B (and WAN 2.1 I2V): the DiT input is 36 channels, [16 noisy | 4 mask | 16 image latent]; the mask
is 1 on latent frame 0 and 0 elsewhere, the image latent is the VAE encoding of the first frame followed
by zero frames (cached by the data pipeline as `image_latents`).
TI2V-5B: the clean first-frame latent replaces frame 0 of the noisy latent, its tokens get timestep 0
(per-token timesteps), and the loss is not taken on it.
"""

from __future__ import annotations

import torch

from library.errors import UserError
from library.wan import flf2v
from library.wan.fun import fun_control_condition, zero_clip_features


def ti2v_condition(x0: torch.Tensor, x_t: torch.Tensor, sigma: torch.Tensor, use_image: torch.Tensor,
                   patch: tuple[int, int, int] = (1, 2, 2)):
    """Apply first-frame conditioning to the samples where `use_image` [B] is True.

    Returns (x_t with clean frame 0 where conditioned, per-token timesteps [B, L], loss mask [B, 1, T, 1, 1]).
    """
    b, _, t, h, w = x0.shape
    cond = use_image.view(b, 1, 1, 1, 1).to(x0.dtype)
    first = torch.zeros_like(x_t)
    first[:, :, :1] = 1.0
    x_t = x_t * (1 - first * cond) + x0 * first * cond  # frame 0 <- clean latent
    tokens_per_frame = (h // patch[1]) * (w // patch[2])
    timestep = (sigma * 1000.0).view(b, 1, 1).expand(b, t // patch[0], tokens_per_frame).clone()
    timestep[use_image.bool(), 0] = 0.0  # conditioned first-frame tokens are clean: t = 0
    loss_mask = torch.ones(b, 1, t, 1, 1, dtype=torch.float32, device=x0.device)
    loss_mask[use_image.bool(), :, 0] = 0.0
    return x_t, timestep.flatten(1), loss_mask


def frame_positions(batch: dict) -> list[int] | None:
    """One-frame batches: the RoPE frame positions, one list for the batch (a batch is from one dataset)."""
    positions = batch.get("frame_positions")
    if positions is None:
        return None
    if not bool((positions == positions[:1]).all()):
        raise ValueError("a one-frame batch mixes items with different fp_1f indices")
    return [int(p) for p in positions[0]]


def extra_inputs(variant, batch: dict, dev) -> dict:
    """The DiT's keyword inputs beyond (y, clip_fea): `frame_positions` of one-frame batches, and `full_ref`
    [B, z, h, w], the cached reference latents of a Fun-Control batch, for a model with `ref_conv` (`variant`
    is the loaded model's, as the file has it)."""
    out = {} if (positions := frame_positions(batch)) is None else {"frame_positions": positions}
    if batch.get("fun_reference") is not None:
        if not variant.ref_conv:
            raise UserError(f"{variant.name}: the dataset has reference images (reference_directory / "
                            "reference_path), and this checkpoint has no `ref_conv` layer to take them (only "
                            "Fun-Control V1.1 and WAN 2.2 Fun-Control models have one): remove the reference "
                            "images from the dataset config and cache again, or train a model with `ref_conv`")
        out["full_ref"] = batch["fun_reference"].to(dev, torch.float32)
    return out


def model_inputs(variant, batch: dict, dev) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(y, clip_fea) of a batch for the DiT: the I2V / FLF2V / one-frame mask and image latents, the Fun-Control
    control latents, or the VACE context as `y`; the WAN 2.1 CLIP tokens (zeros for a Fun-Control model
    without a start image)."""
    y = None
    if variant.control:  # Fun-Control: [control | start image or zeros] (library/wan/fun.py)
        image = batch["image_latents"].to(dev, torch.float32) if variant.is_i2v else None
        y = fun_control_condition(variant, batch["control_latents"].to(dev, torch.float32), image)
    elif variant.is_i2v and batch.get("frame_mask") is not None:  # one-frame: the known control frames
        y = flf2v.known_frames_condition(batch["image_latents"].to(dev, torch.float32), batch["frame_mask"].to(dev))
    elif variant.is_i2v:
        y = flf2v.condition(batch["image_latents"].to(dev, torch.float32), variant.end_frame)
    elif variant.is_vace:  # the VACE context goes in as `y` (library/wan/vace.py)
        y = batch["vace_context"].to(dev, torch.float32)  # [B, 96, R + T, h, w]
    clip_fea = batch.get("clip_fea")  # WAN 2.1 I2V: [B, 257, 1280] CLIP tokens of the first frame (FLF2V: 2 frames)
    clip_fea = None if clip_fea is None else clip_fea.to(dev, torch.float32)
    if clip_fea is None and variant.image_embedding and variant.control:  # WAN 2.1 Fun-Control, no start image
        clip_fea = zero_clip_features(variant, batch["latents"].shape[0], dev)
    return y, clip_fea

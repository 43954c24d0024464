"""Image-to-video conditioning built exactly as the official samplers build it.

I2V-A14B (and WAN 2.1 I2V): the DiT input is 36 channels, [16 noisy | 4 mask | 16 image latent]; the mask
is 1 on latent frame 0 and 0 elsewhere, the image latent is the VAE encoding of the first frame followed
by zero frames (cached by the data pipeline as `image_latents`).
TI2V-5B: the clean first-frame latent replaces frame 0 of the noisy latent, its tokens get timestep 0
(per-token timesteps), and the loss is not taken on it.
"""

from __future__ import annotations

import torch


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

"""WAN 2.1 FLF2V (first-last-frame-to-video): what the first and last frames give the DiT.

The official FLF2V-14B model is the I2V-14B architecture plus a learned position embedding of its CLIP
tokens (`img_emb.emb_pos` [1, 514, 1280]: 257 tokens of the first frame, then 257 of the last). Its inputs:

- y = [4 mask channels | latents of the conditioning video], as for I2V, but the conditioning video is
  (first frame, F - 2 black frames, last frame) and the pixel mask is 1 on frames 0 and F - 1. Folded into
  latent frames the way WAN folds pixel frames (frame 0 repeated 4 times, then groups of 4), the mask is 1 on
  all 4 channels of latent frame 0 and on channel 3 only of the last latent frame (pixel frame F - 1 is the
  4th of its group, for F = 4k + 1). With one latent frame (F = 1) the first frame is the last one.
- clip_fea = the CLIP tokens of the first and the last frame, [B, 2, 257, 1280] (the model adds emb_pos).
"""

from __future__ import annotations

import torch

from .conditioning import i2v_condition


def flf2v_condition(image_latents: torch.Tensor) -> torch.Tensor:
    """[B, z, T, h, w] encoding of (first, black frames, last) -> y [B, 4 + z, T, h, w] (mask channels first)."""
    y = i2v_condition(image_latents)
    if y.shape[2] > 1:
        y[:, 3, -1] = 1.0  # pixel frame F - 1: the 4th frame folded into the last latent frame
    return y


def condition(image_latents: torch.Tensor, end_frame: bool) -> torch.Tensor:
    """y for an I2V model: FLF2V's mask when the model takes an end frame, else the I2V mask."""
    return flf2v_condition(image_latents) if end_frame else i2v_condition(image_latents)


def known_frames_condition(image_latents: torch.Tensor, frame_mask: torch.Tensor) -> torch.Tensor:
    """One-frame mode: image latents [B, z, T, h, w] and frame_mask [B, T] (1 where the latent frame is a known
    control image) -> y [B, 4 + z, T, h, w] with all 4 mask channels set on the known frames."""
    mask = frame_mask.to(image_latents)[:, None, :, None, None].expand(-1, 4, -1, *image_latents.shape[3:])
    return torch.cat([mask, image_latents], dim=1)


def conditioning_video(first: torch.Tensor, frames: int, last: torch.Tensor | None = None) -> torch.Tensor:
    """first / last [B, 3, 1, H, W] -> [B, 3, frames, H, W]: first, black frames, then last (when given) as
    the final frame: what the VAE encodes into the image latents of `y`."""
    video = torch.zeros(first.shape[0], first.shape[1], frames, *first.shape[3:], dtype=first.dtype,
                        device=first.device)
    video[:, :, :1] = first
    if last is not None and frames > 1:
        video[:, :, -1:] = last
    return video

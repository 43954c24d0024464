"""The VACE context: what VACE models get beside the noisy latents, built as the official VACE code builds it
(`WanVace.vace_encode_frames` / `vace_encode_masks`; diffusers' `WanVACEPipeline.prepare_video_latents` /
`prepare_masks` do the same).

Inputs, in pixels: a control video [3, F, H, W] in [-1, 1] (absent: zeros), a mask [1, F, H, W] in [0, 1]
(1 = generate, 0 = keep; absent: ones) and reference images (each [3, H, W] in [-1, 1], letterboxed onto a
white canvas of the video's size).

    m = (mask > 0.5)
    inactive = VAE(control * (1 - m)),  reactive = VAE(control * m)          [16, T, h, w] each
    mask channels: each 8x8 pixel block of `mask` (unthresholded) -> 64 channels, frames resized F -> T
                   by nearest-exact interpolation                            [64, T, h, w]
    reference r:   [VAE(image r) | zeros]  (32 channels, 1 latent frame), zero mask channels
    context = [refs..., video frames] along time, [inactive | reactive | mask] along channels   [96, R + T, h, w]

With R reference frames the latents being denoised also have R extra leading frames: the references'
latents (`reference_latents`) in training, noise in generation, cut off before decoding.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.nn.functional as F

Encode = Callable[[torch.Tensor], torch.Tensor]  # [B, 3, F, H, W] in [-1, 1] -> normalised latents [B, z, T, h, w]


def letterbox_reference(image: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """A reference image [3, h, w] in [-1, 1] scaled to fit (H, W) = `size` (bilinear), centred on a white
    canvas [3, H, W] (the official preparation of `src_ref_images`)."""
    height, width = size
    if tuple(image.shape[-2:]) == (height, width):
        return image
    scale = min(height / image.shape[-2], width / image.shape[-1])
    new_h, new_w = int(image.shape[-2] * scale), int(image.shape[-1] * scale)
    resized = F.interpolate(image[None].float(), size=(new_h, new_w), mode="bilinear", align_corners=False)[0]
    canvas = torch.ones(3, height, width, dtype=resized.dtype, device=image.device)
    top, left = (height - new_h) // 2, (width - new_w) // 2
    canvas[:, top:top + new_h, left:left + new_w] = resized
    return canvas


def mask_latent(mask: torch.Tensor, stride: tuple[int, int, int] = (4, 8, 8), patch: int = 2) -> torch.Tensor:
    """A pixel mask [1, F, H, W] -> [stride_h * stride_w, T, h, w]: channel (i * 8 + j) holds pixel (i, j) of
    every 8x8 block, frames resized to T = (F + 3) // 4 by nearest-exact interpolation; h and w are
    rounded down to a multiple of the DiT patch (as the official code does)."""
    _, frames, height, width = mask.shape
    st, sh, sw = stride
    h, w = height // (sh * patch) * patch, width // (sw * patch) * patch
    m = mask[0, :, : h * sh, : w * sw].reshape(frames, h, sh, w, sw)
    m = m.permute(2, 4, 0, 1, 3).reshape(sh * sw, frames, h, w)
    return F.interpolate(m[None], size=((frames + st - 1) // st, h, w), mode="nearest-exact")[0]


def vace_context(encode: Encode, control: torch.Tensor | None, mask: torch.Tensor | None,
                 references: Sequence[torch.Tensor] = (), *, frames: int | None = None,
                 size: tuple[int, int] | None = None, stride: tuple[int, int, int] = (4, 8, 8),
                 dtype: torch.dtype = torch.float32, device=None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One sample's VACE context [96, R + T, h, w] and the reference latents [16, R, h, w] (None without
    references). `control` [3, F, H, W] in [-1, 1] and `mask` [1, F, H, W] in [0, 1] may be None (then
    `frames` and `size` = (H, W) give the shape); `references` are [3, h, w] images in [-1, 1] of any size."""
    if control is None and mask is None and (frames is None or size is None):
        raise ValueError("without a control video or a mask, give the frame count and size")
    shape = (control if control is not None else mask).shape[1:] if control is not None or mask is not None \
        else (frames, *size)
    control = torch.zeros(3, *shape, dtype=dtype, device=device) if control is None else control.to(device, dtype)
    mask = torch.ones(1, *shape, dtype=dtype, device=device) if mask is None else mask.to(device, dtype)
    if tuple(mask.shape[1:]) != tuple(control.shape[1:]):
        raise ValueError(f"the mask has {list(mask.shape[1:])} frames x pixels, the control video "
                         f"{list(control.shape[1:])}; they must match")
    keep = (mask > 0.5).to(dtype)
    both = encode(torch.stack([control * (1 - keep), control * keep]))  # [2, z, T, h, w]
    video = torch.cat([both[0], both[1]], dim=0)  # [2z, T, h, w]
    masks = mask_latent(mask, stride).to(video)
    refs = None
    if references:
        canvas = torch.stack([letterbox_reference(r.to(device, dtype), tuple(shape[1:])) for r in references])
        refs = encode(canvas[:, :, None])[:, :, 0].transpose(0, 1)  # [z, R, h, w], in the given order
        video = torch.cat([torch.cat([refs, torch.zeros_like(refs)], dim=0).to(video), video], dim=1)
        masks = torch.cat([masks.new_zeros(masks.shape[0], refs.shape[1], *masks.shape[2:]), masks], dim=1)
    return torch.cat([video, masks], dim=0), refs

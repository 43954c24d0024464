"""The WAN 2.1 video VAE (z 16, 4x8x8): its latent statistics, its encoder and decoder levels, `WanVAE`.

The causal blocks, the chunk cache and the encode/decode driver it is built from are in `vae_blocks.py`
(shared with the 2.2 VAE); diffusers key names are mapped in `vae_formats.py`. `state_dict()` keys are
the official `Wan2.1_VAE.pth` names, which ComfyUI files use too, so those files load with
`load_state_dict` as they are.
"""

from __future__ import annotations

from typing import Sequence

import torch.nn as nn

from .vae_blocks import CausalConv3d, CausalVideoVAE, Decoder, Encoder, Resample, ResidualBlock, check_vae_config

# Per-channel statistics of WAN 2.1 latents: z_normalised = (mu - mean) / std.
WAN21_LATENTS_MEAN = (
    -0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
    0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921,
)
WAN21_LATENTS_STD = (
    2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
    3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160,
)


def _encoder21_levels(dims: Sequence[int], num_res_blocks: int, temporal: Sequence[bool]) -> nn.Sequential:
    """Flat list: per level `num_res_blocks` residual blocks, then a downsample (not after the last)."""
    layers: list[nn.Module] = []
    for i, (d_in, d_out) in enumerate(zip(dims[:-1], dims[1:])):
        for _ in range(num_res_blocks):
            layers.append(ResidualBlock(d_in, d_out))
            d_in = d_out
        if i < len(dims) - 2:
            layers.append(Resample(d_out, "downsample3d" if temporal[i] else "downsample2d"))
    return nn.Sequential(*layers)


def _decoder21_levels(dims: Sequence[int], num_res_blocks: int, temporal: Sequence[bool]) -> nn.Sequential:
    """Flat list: per level `num_res_blocks + 1` residual blocks, then an upsample (not after the last)."""
    layers: list[nn.Module] = []
    for i, (d_in, d_out) in enumerate(zip(dims[:-1], dims[1:])):
        if i > 0:
            d_in //= 2  # the previous level's upsample conv halved the channels
        for _ in range(num_res_blocks + 1):
            layers.append(ResidualBlock(d_in, d_out))
            d_in = d_out
        if i < len(dims) - 2:
            layers.append(Resample(d_out, "upsample3d" if temporal[i] else "upsample2d"))
    return nn.Sequential(*layers)


class WanVAE(CausalVideoVAE):
    """The WAN 2.1 VAE: RGB video <-> 16-channel latents, 4x temporal and 8x8 spatial compression."""

    temporal_stride = 4
    spatial_stride = 8

    def __init__(
        self, dim: int = 96, z_dim: int = 16, dim_mult: Sequence[int] = (1, 2, 4, 4), num_res_blocks: int = 2,
        temporal_downsample: Sequence[bool] = (False, True, True),
        latents_mean: Sequence[float] | None = None, latents_std: Sequence[float] | None = None,
    ):
        super().__init__()
        check_vae_config(dim_mult, temporal_downsample)
        self.z_dim = z_dim
        # 1. encoder: channels dim * (1, *dim_mult); the head emits mu and log-variance (2z channels)
        enc_dims = [dim * m for m in (1, *dim_mult)]
        self.encoder = Encoder(3, enc_dims, 2 * z_dim, _encoder21_levels(enc_dims, num_res_blocks, temporal_downsample))
        # 2. the 1x1x1 latent convs
        self.conv1 = CausalConv3d(2 * z_dim, 2 * z_dim, 1)
        self.conv2 = CausalConv3d(z_dim, z_dim, 1)
        # 3. decoder: the encoder mirrored, temporal upsampling in reverse order
        dec_dims = [dim * m for m in (dim_mult[-1], *reversed(dim_mult))]
        upsamples = _decoder21_levels(dec_dims, num_res_blocks, tuple(reversed(temporal_downsample)))
        self.decoder = Decoder(z_dim, dec_dims, 3, upsamples)
        # 4. latent statistics (non-persistent buffers: never in state_dict)
        self._register_latent_stats(latents_mean, latents_std, (WAN21_LATENTS_MEAN, WAN21_LATENTS_STD))

"""The WAN 2.2 video VAE (z 48, 4x16x16; used by TI2V-5B).

What lives here: what 2.2 adds on top of the shared causal blocks in `vae_blocks.py`, namely the 2x2
patchify around the network, the level blocks with parameter-free shortcuts (`DownResidualBlock`
averages space and time into channels, `UpResidualBlock` duplicates channels back out), the 2.2 latent
statistics and `Wan22VAE`. Causal convs, norms, residual and attention blocks, resampling and the chunk
cache are the ones the 2.1 VAE uses; diffusers key names are mapped in `vae_formats.py`.
`state_dict()` keys are the official `Wan2.2_VAE.pth` names (ComfyUI files use the same).
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange

from .vae_blocks import (
    CachedBlock,
    CausalConv3d,
    CausalVideoVAE,
    ChunkCache,
    Decoder,
    Encoder,
    Resample,
    ResidualBlock,
    check_vae_config,
    run_layers,
)

# Per-channel statistics of WAN 2.2 latents (official `Wan2_2_VAE`, diffusers' 2.2 config).
WAN22_LATENTS_MEAN = (
    -0.2289, -0.0052, -0.1323, -0.2339, -0.2799, 0.0174, 0.1838, 0.1557,
    -0.1382, 0.0542, 0.2813, 0.0891, 0.1570, -0.0098, 0.0375, -0.1825,
    -0.2246, -0.1207, -0.0698, 0.5109, 0.2665, -0.2108, -0.2158, 0.2502,
    -0.2055, -0.0322, 0.1109, 0.1567, -0.0729, 0.0899, -0.2799, -0.1230,
    -0.0313, -0.1649, 0.0117, 0.0723, -0.2839, -0.2083, -0.0520, 0.3748,
    0.0152, 0.1957, 0.1433, -0.2944, 0.3573, -0.0548, -0.1681, -0.0667,
)
WAN22_LATENTS_STD = (
    0.4765, 1.0364, 0.4514, 1.1677, 0.5313, 0.4990, 0.4818, 0.5013,
    0.8158, 1.0344, 0.5894, 1.0901, 0.6885, 0.6165, 0.8454, 0.4978,
    0.5759, 0.3523, 0.7135, 0.6804, 0.5833, 1.4146, 0.8986, 0.5659,
    0.7069, 0.5338, 0.4889, 0.4917, 0.4069, 0.4999, 0.6866, 0.4093,
    0.5709, 0.6065, 0.6415, 0.4944, 0.5726, 1.2042, 0.5458, 1.6887,
    0.3971, 1.0600, 0.3943, 0.5537, 0.5444, 0.4089, 0.7468, 0.7744,
)
PATCH = 2  # pixels -> (3 * 2 * 2) channels before the encoder, and back after the decoder


def space_time_to_channels(x: torch.Tensor, out_channels: int, factor_t: int, factor_s: int) -> torch.Tensor:
    """Parameter-free downsampling shortcut: fold time/space blocks into channels, average channel groups.

    [B, C, T, H, W] -> [B, out, ceil(T/ft), H/fs, W/fs]; T is zero-padded at the front to a multiple of ft.
    """
    pad_t = -x.shape[2] % factor_t
    if pad_t:
        x = F.pad(x, (0, 0, 0, 0, pad_t, 0))
    x = rearrange(x, "b c (t ft) (h fh) (w fw) -> b (c ft fh fw) t h w", ft=factor_t, fh=factor_s, fw=factor_s)
    return x.unflatten(1, (out_channels, -1)).mean(dim=2)


def channels_to_space_time(x: torch.Tensor, out_channels: int, factor_t: int, factor_s: int) -> torch.Tensor:
    """Parameter-free upsampling shortcut: repeat each channel, unfold the copies into time/space blocks.

    [B, C, T, H, W] -> [B, out, T*ft, H*fs, W*fs].
    """
    x = x.repeat_interleave(out_channels * factor_t * factor_s * factor_s // x.shape[1], dim=1)
    return rearrange(x, "b (c ft fh fw) t h w -> b c (t ft) (h fh) (w fw)", ft=factor_t, fh=factor_s, fw=factor_s)


class DownResidualBlock(CachedBlock):
    """Encoder level: residual blocks and an optional downsample (`downsamples`), plus the averaging shortcut."""

    def __init__(self, in_dim: int, out_dim: int, num_res_blocks: int, temporal: bool, spatial: bool):
        super().__init__()
        self.out_dim, self.factor_t, self.factor_s = out_dim, 2 if temporal else 1, 2 if spatial else 1
        if (in_dim * self.factor_t * self.factor_s**2) % out_dim:
            raise ValueError(f"down block {in_dim}->{out_dim}: channels do not fold by its downsampling factor")
        layers: list[nn.Module] = [ResidualBlock(in_dim if j == 0 else out_dim, out_dim) for j in range(num_res_blocks)]
        if spatial:
            layers.append(Resample(out_dim, "downsample3d" if temporal else "downsample2d"))
        self.downsamples = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor, cache: ChunkCache) -> torch.Tensor:
        # the shortcut sees only this chunk: on a 1-frame chunk a temporal fold averages it with a zero frame
        shortcut = space_time_to_channels(x, self.out_dim, self.factor_t, self.factor_s)
        return run_layers(self.downsamples, x, cache) + shortcut


class UpResidualBlock(CachedBlock):
    """Decoder level: residual blocks and an optional upsample (`upsamples`), plus the duplicating shortcut."""

    def __init__(self, in_dim: int, out_dim: int, num_res_blocks: int, temporal: bool, spatial: bool):
        super().__init__()
        self.out_dim, self.factor_t, self.spatial = out_dim, 2 if temporal else 1, spatial
        if spatial and (out_dim * self.factor_t * 4) % in_dim:
            raise ValueError(f"up block {in_dim}->{out_dim}: channels do not unfold by its upsampling factor")
        layers: list[nn.Module] = [ResidualBlock(in_dim if j == 0 else out_dim, out_dim) for j in range(num_res_blocks)]
        if spatial:
            layers.append(Resample(out_dim, "upsample3d" if temporal else "upsample2d", halve_up=False))
        self.upsamples = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor, cache: ChunkCache) -> torch.Tensor:
        out = run_layers(self.upsamples, x, cache)
        if not self.spatial:  # the last level has no shortcut at all
            return out
        shortcut = channels_to_space_time(x, self.out_dim, self.factor_t, 2)
        if cache.first_chunk:  # the main path does not double the first chunk's frames; match it
            shortcut = shortcut[:, :, self.factor_t - 1 :]
        return out + shortcut


class Wan22VAE(CausalVideoVAE):
    """The WAN 2.2 VAE: RGB video <-> 48-channel latents, 4x temporal and 16x16 spatial compression."""

    temporal_stride = 4
    spatial_stride = 16

    def __init__(
        self, dim: int = 160, decoder_dim: int = 256, z_dim: int = 48, dim_mult: Sequence[int] = (1, 2, 4, 4),
        num_res_blocks: int = 2, temporal_downsample: Sequence[bool] = (False, True, True),
        latents_mean: Sequence[float] | None = None, latents_std: Sequence[float] | None = None,
    ):
        super().__init__()
        check_vae_config(dim_mult, temporal_downsample)
        self.z_dim = z_dim
        last = len(dim_mult) - 1
        # 1. encoder on 2x2-patchified frames (12 channels); every level but the last halves H and W
        enc = [dim * m for m in (1, *dim_mult)]
        down = nn.Sequential(*(
            DownResidualBlock(enc[i], enc[i + 1], num_res_blocks, temporal=i < last and temporal_downsample[i],
                              spatial=i < last)
            for i in range(len(dim_mult))
        ))
        self.encoder = Encoder(3 * PATCH * PATCH, enc, 2 * z_dim, down)
        # 2. the 1x1x1 latent convs
        self.conv1 = CausalConv3d(2 * z_dim, 2 * z_dim, 1)
        self.conv2 = CausalConv3d(z_dim, z_dim, 1)
        # 3. decoder (its own width), mirrored, emitting 12 channels to unpatchify
        dec = [decoder_dim * m for m in (dim_mult[-1], *reversed(dim_mult))]
        temporal_up = tuple(reversed(temporal_downsample))
        up = nn.Sequential(*(
            UpResidualBlock(dec[i], dec[i + 1], num_res_blocks + 1, temporal=i < last and temporal_up[i],
                            spatial=i < last)
            for i in range(len(dim_mult))
        ))
        self.decoder = Decoder(z_dim, dec, 3 * PATCH * PATCH, up)
        # 4. latent statistics (non-persistent buffers: never in state_dict)
        self._register_latent_stats(latents_mean, latents_std, (WAN22_LATENTS_MEAN, WAN22_LATENTS_STD))

    def _to_encoder_input(self, video: torch.Tensor) -> torch.Tensor:
        # [B, 3, F, H, W] -> [B, 12, F, H/2, W/2]; channel order (c, w-offset, h-offset) as in the official code
        return rearrange(video, "b c f (h q) (w r) -> b (c r q) f h w", q=PATCH, r=PATCH)

    def _from_decoder_output(self, x: torch.Tensor) -> torch.Tensor:
        return rearrange(x, "b (c r q) f h w -> b c f (h q) (w r)", q=PATCH, r=PATCH)

"""The causal machinery both WAN VAEs (2.1 in `vae.py`, 2.2 in `vae22.py`) are built from.

What lives here:
- the blocks: `CausalConv3d`, `RMSNorm`, `ResidualBlock`, `AttentionBlock`, `Resample`, and the
  `Encoder` / `Decoder` shells that run a VAE's level blocks between `conv1` and the head;
- `ChunkCache`, the one place that knows how causal context is carried from one time chunk to the next;
- `CausalVideoVAE`, the encode/decode driver both VAEs subclass (chunking, latent normalisation, dtypes),
  and `check_vae_config`.
What does not: a particular VAE's levels, widths and latent statistics (`vae.py`, `vae22.py`) and key
names of other formats (`vae_formats.py`). Only the encoder's mean (mu) is used; encoding is deterministic.
"""

from __future__ import annotations

from fractions import Fraction
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange

from .vae_tiling import TILE_HALO, tiled

CACHE_FRAMES = 2  # a 3-tap causal time conv needs the two frames before its chunk


# ---- Building blocks ------------------------------------------------------------------------------
class CausalConv3d(nn.Conv3d):
    """Conv3d padded causally in time (2*p frames in front, none behind) and symmetrically in space."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0):
        super().__init__(in_channels, out_channels, kernel_size, stride=stride, padding=0)
        pad_t, pad_h, pad_w = (padding,) * 3 if isinstance(padding, int) else padding
        self.front_pad = 2 * pad_t
        self.space_pad = (pad_w, pad_w, pad_h, pad_h)

    def forward(self, x: torch.Tensor, history: torch.Tensor | None = None) -> torch.Tensor:
        # x [B, C, T, H, W]; history [B, C, <=2, H, W]: real frames that precede x, replacing front zeros
        front = self.front_pad
        if history is not None and front > 0:
            x = torch.cat([history.to(x.device), x], dim=2)
            front -= history.shape[2]
        if front or any(self.space_pad):
            x = F.pad(x, (*self.space_pad, front, 0))
        return super().forward(x)


class RMSNorm(nn.Module):
    """Channel RMS norm: x / ||x||_C * sqrt(C) * gamma. gamma is [C,1,1,1] for video, [C,1,1] per frame."""

    def __init__(self, dim: int, images: bool = False):
        super().__init__()
        self.scale = dim**0.5
        self.gamma = nn.Parameter(torch.ones(dim, *((1, 1) if images else (1, 1, 1))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # the norm itself in fp32, so a bf16 model does not lose precision in the sum of squares
        return F.normalize(x.float(), dim=1).to(x.dtype) * self.scale * self.gamma


class ChunkCache:
    """Causal context carried between the time chunks of ONE encode or decode call.

    Each causal layer (keyed by the layer itself) remembers the last frames of the input it saw in the
    previous chunk, so running chunk after chunk gives what one causal pass over the whole clip gives
    while only one chunk's activations are alive. Every call makes a fresh cache. The rules follow the
    official WAN code exactly (they decide the numbers, so they must match bit for bit):
    - `conv`: a 3-tap causal conv sees up to 2 remembered frames instead of zero padding;
    - `time_downsample`: the stride-2 time conv is skipped on the first chunk (1 frame stays 1 frame);
      later chunks get the previous chunk's last frame in front;
    - `time_upsample`: the frame-doubling time conv is skipped on the first chunk; the next chunk sees
      zeros, not the first chunk, as its past (the official 'Rep' marker).
    """

    def __init__(self, store_device: str | torch.device | None = None):
        self._past: dict[nn.Module, torch.Tensor] = {}
        self.chunk_index = 0
        # `vae_cache_cpu`: the remembered frames wait in host memory between chunks (less VRAM, some copies)
        self.store = None if store_device is None else torch.device(store_device)

    def _keep(self, layer: nn.Module, t: torch.Tensor) -> None:
        self._past[layer] = t if self.store is None else t.to(self.store)

    def _get(self, layer: nn.Module, device: torch.device) -> torch.Tensor | None:
        past = self._past.get(layer)
        return None if past is None else past.to(device)

    @property
    def first_chunk(self) -> bool:
        return self.chunk_index == 0

    def next_chunk(self) -> None:
        self.chunk_index += 1

    def conv(self, conv: CausalConv3d, x: torch.Tensor) -> torch.Tensor:
        past = self._get(conv, x.device)
        tail = x[:, :, -CACHE_FRAMES:].clone()  # [B, C, <=2, H, W]
        if tail.shape[2] < CACHE_FRAMES and past is not None:
            tail = torch.cat([past[:, :, -1:], tail], dim=2)
        out = conv(x, past)
        self._keep(conv, tail)
        return out

    def time_downsample(self, conv: CausalConv3d, x: torch.Tensor) -> torch.Tensor:
        # x [B, C, T, H, W] -> [B, C, T, ...] on the first chunk, else [B, C, T/2, ...]
        past = self._get(conv, x.device)
        self._keep(conv, x[:, :, -1:].clone())
        if past is None:
            return x
        return conv(torch.cat([past, x], dim=2))

    def time_upsample(self, conv: CausalConv3d, x: torch.Tensor) -> torch.Tensor:
        # x [B, C, T, H, W] -> [B, C, T, ...] on the first chunk, else [B, C, 2T, ...]
        if conv not in self._past:
            self._keep(conv, torch.zeros_like(x[:, :, -1:]))  # the official 'Rep': zeros as the past
            return x
        x = self.conv(conv, x)  # [B, 2C, T, H, W]: two output frames per input frame
        return rearrange(x, "b (two c) t h w -> b c (t two) h w", two=2)


class CachedBlock(nn.Module):
    """A block whose forward takes `(x, cache)` because it holds causal time layers."""


def run_layers(layers: nn.Sequential, x: torch.Tensor, cache: ChunkCache) -> torch.Tensor:
    """Run layers in order; causal convs and cached blocks go through the chunk cache."""
    for layer in layers:
        if isinstance(layer, CausalConv3d):
            x = cache.conv(layer, x)
        elif isinstance(layer, CachedBlock):
            x = layer(x, cache)
        else:
            x = layer(x)
    return x


class ResidualBlock(CachedBlock):
    """RMS, SiLU, conv3, RMS, SiLU, dropout, conv3 (indices 0-6) plus a 1x1x1 `shortcut` if dims differ."""

    def __init__(self, in_dim: int, out_dim: int, dropout: float = 0.0):
        super().__init__()
        self.residual = nn.Sequential(
            RMSNorm(in_dim), nn.SiLU(), CausalConv3d(in_dim, out_dim, 3, padding=1),
            RMSNorm(out_dim), nn.SiLU(), nn.Dropout(dropout), CausalConv3d(out_dim, out_dim, 3, padding=1),
        )
        self.shortcut = CausalConv3d(in_dim, out_dim, 1) if in_dim != out_dim else nn.Identity()

    def forward(self, x: torch.Tensor, cache: ChunkCache) -> torch.Tensor:
        return run_layers(self.residual, x, cache) + self.shortcut(x)


class AttentionBlock(nn.Module):
    """Single-head self-attention over the pixels of each frame; frames do not see each other."""

    def __init__(self, dim: int):
        super().__init__()
        self.norm = RMSNorm(dim, images=True)
        self.to_qkv = nn.Conv2d(dim, dim * 3, 1)
        self.proj = nn.Conv2d(dim, dim, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, _, _, h, _ = x.shape  # [B, C, T, H, W]
        y = self.to_qkv(self.norm(rearrange(x, "b c t h w -> (b t) c h w")))  # [BT, 3C, H, W]
        q, k, v = rearrange(y, "n (three c) h w -> three n 1 (h w) c", three=3)  # each [BT, 1, HW, C]
        y = F.scaled_dot_product_attention(q, k, v)  # [BT, 1, HW, C]
        y = self.proj(rearrange(y, "n 1 (h w) c -> n c h w", h=h))
        return x + rearrange(y, "(b t) c h w -> b c t h w", b=b)


class NearestUp2x(nn.Module):
    """2x nearest-exact spatial upsampling, run in fp32 (bf16 nearest kernels are missing on some builds)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.interpolate(x.float(), scale_factor=2.0, mode="nearest-exact").to(x.dtype)


class Resample(CachedBlock):
    """2x spatial resampling of each frame (`resample.1` conv), optionally with a 2x causal `time_conv`.

    mode is upsample2d, upsample3d, downsample2d or downsample3d. The upsampling Conv2d halves the
    channels in 2.1 and keeps them in 2.2 (`halve_up=False`).
    """

    def __init__(self, dim: int, mode: str, halve_up: bool = True):
        super().__init__()
        self.mode = mode
        if mode in ("upsample2d", "upsample3d"):
            self.resample = nn.Sequential(NearestUp2x(), nn.Conv2d(dim, dim // 2 if halve_up else dim, 3, padding=1))
        elif mode in ("downsample2d", "downsample3d"):
            self.resample = nn.Sequential(nn.ZeroPad2d((0, 1, 0, 1)), nn.Conv2d(dim, dim, 3, stride=2))
        else:
            raise ValueError(f"unknown resample mode {mode!r}")
        if mode == "upsample3d":
            self.time_conv = CausalConv3d(dim, dim * 2, (3, 1, 1), padding=(1, 0, 0))
        elif mode == "downsample3d":
            self.time_conv = CausalConv3d(dim, dim, (3, 1, 1), stride=(2, 1, 1))

    def forward(self, x: torch.Tensor, cache: ChunkCache) -> torch.Tensor:
        if self.mode == "upsample3d":
            x = cache.time_upsample(self.time_conv, x)  # frames first, then space
        t = x.shape[2]
        x = self.resample(rearrange(x, "b c t h w -> (b t) c h w"))
        x = rearrange(x, "(b t) c h w -> b c t h w", t=t)
        if self.mode == "downsample3d":
            x = cache.time_downsample(self.time_conv, x)  # space first, then frames
        return x


def _middle(dim: int) -> nn.Sequential:
    return nn.Sequential(ResidualBlock(dim, dim), AttentionBlock(dim), ResidualBlock(dim, dim))


def _head(dim: int, out_channels: int) -> nn.Sequential:
    return nn.Sequential(RMSNorm(dim), nn.SiLU(), CausalConv3d(dim, out_channels, 3, padding=1))


class Encoder(nn.Module):
    """conv1 -> downsamples -> middle (res, attention, res) -> head; dims[0] after conv1, dims[-1] at the end."""

    def __init__(self, in_channels: int, dims: Sequence[int], out_channels: int, downsamples: nn.Sequential):
        super().__init__()
        self.conv1 = CausalConv3d(in_channels, dims[0], 3, padding=1)
        self.downsamples = downsamples
        self.middle = _middle(dims[-1])
        self.head = _head(dims[-1], out_channels)

    def forward(self, x: torch.Tensor, cache: ChunkCache) -> torch.Tensor:
        x = cache.conv(self.conv1, x)
        for layers in (self.downsamples, self.middle, self.head):
            x = run_layers(layers, x, cache)
        return x


class Decoder(nn.Module):
    """conv1 -> middle (res, attention, res) -> upsamples -> head; dims[0] after conv1, dims[-1] at the end."""

    def __init__(self, z_dim: int, dims: Sequence[int], out_channels: int, upsamples: nn.Sequential):
        super().__init__()
        self.conv1 = CausalConv3d(z_dim, dims[0], 3, padding=1)
        self.middle = _middle(dims[0])
        self.upsamples = upsamples
        self.head = _head(dims[-1], out_channels)

    def forward(self, x: torch.Tensor, cache: ChunkCache) -> torch.Tensor:
        x = cache.conv(self.conv1, x)
        for layers in (self.middle, self.upsamples, self.head):
            x = run_layers(layers, x, cache)
        return x


# ---- The shared encode / decode driver ------------------------------------------------------------
def check_vae_config(dim_mult: Sequence[int], temporal_downsample: Sequence[bool]) -> None:
    """The chunking (1, 4, 4, ... frames) and the strides assume 3 spatial and 2 temporal halvings."""
    if len(dim_mult) != 4 or len(temporal_downsample) != 3 or sum(map(bool, temporal_downsample)) != 2:
        raise ValueError(
            f"WAN VAE needs 4 levels (dim_mult) with 2 of the 3 downsamples temporal; got dim_mult={dim_mult}, "
            f"temporal_downsample={temporal_downsample}"
        )


class CausalVideoVAE(nn.Module):
    """Encode/decode driver shared by both WAN VAEs.

    Subclasses build `encoder`, `conv1` (2z -> 2z), `conv2` (z -> z) and `decoder`, call
    `_register_latent_stats`, and may override `_to_encoder_input` / `_from_decoder_output` (2.2 patchifies).
    Computation runs in the module's dtype; latent (de)normalisation runs in fp32.
    """

    z_dim: int
    temporal_stride = 4
    spatial_stride = 8
    cache_device: torch.device | None = None  # set to "cpu" to keep the causal chunk cache in host memory
    tile_sample_min_size: int | None = None  # spatial tiling: the tile side in pixels (None: off)

    def _register_latent_stats(self, mean: Sequence[float] | None, std: Sequence[float] | None, default) -> None:
        # explicit CPU tensors: built under `torch.device("meta")` they must still hold the real numbers,
        # because load_state_dict(assign=True) only fills the persistent state
        for name, values, fallback in (("latents_mean", mean, default[0]), ("latents_std", std, default[1])):
            values = torch.as_tensor(fallback if values is None else values, dtype=torch.float32, device="cpu")
            if values.shape != (self.z_dim,):
                raise ValueError(f"{name} must have {self.z_dim} values, got shape {list(values.shape)}")
            self.register_buffer(name, values.clone(), persistent=False)

    def _apply(self, fn, recurse=True):
        # keep the latent statistics exact in fp32 when the weights are cast (vae.to(torch.bfloat16));
        # device moves still apply to them
        saved = {name: getattr(self, name) for name in ("latents_mean", "latents_std")}
        super()._apply(fn, recurse)
        for name, old in saved.items():
            if not old.is_meta:
                setattr(self, name, old.to(device=getattr(self, name).device, dtype=torch.float32))
        return self

    def _latent_stats(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        shape = (1, self.z_dim, 1, 1, 1)
        return self.latents_mean.to(device).view(shape), self.latents_std.to(device).view(shape)

    def _to_encoder_input(self, video: torch.Tensor) -> torch.Tensor:
        return video

    def _from_decoder_output(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def _check_video(self, video: torch.Tensor) -> None:
        if video.dim() != 5 or video.shape[1] != 3:
            raise ValueError(f"video must be [B, 3, F, H, W] in [-1, 1], got shape {list(video.shape)}")
        frames, height, width = video.shape[2:]
        if (frames - 1) % self.temporal_stride:
            raise ValueError(f"video has {frames} frames; WAN VAEs need 1 + 4k frames (1, 5, 9, ..., 81)")
        if height % self.spatial_stride or width % self.spatial_stride:
            raise ValueError(
                f"video is {height}x{width}; height and width must be multiples of {self.spatial_stride} "
                "for this VAE: crop or resize first"
            )

    def _tile_pixels(self) -> int | None:
        """The tile side in pixels when spatial tiling is on (a multiple of the spatial stride, at least four
        latent pixels so neighbours overlap), else None."""
        if not self.tile_sample_min_size:
            return None
        s = self.spatial_stride
        return max(4 * s, int(self.tile_sample_min_size) // s * s)

    def encode(self, video: torch.Tensor) -> torch.Tensor:
        """[B, 3, F, H, W] in [-1, 1], F = 1+4k -> normalised mu [B, z, 1+(F-1)//4, H/s, W/s] (float32).
        With `tile_sample_min_size` set, frames larger than a tile are encoded tile by tile (`vae_tiling`)."""
        self._check_video(video)
        weight = self.conv1.weight
        video = video.to(device=weight.device, dtype=weight.dtype)
        tile = self._tile_pixels()
        if tile and max(video.shape[-2:]) > tile:
            s = self.spatial_stride
            return tiled(self._encode_frames, video, tile, s, Fraction(1, s), halo=TILE_HALO * s)
        return self._encode_frames(video)

    def _encode_frames(self, video: torch.Tensor) -> torch.Tensor:
        x = self._to_encoder_input(video)
        cache = ChunkCache(self.cache_device)
        bounds = [(0, 1)] + [(s, s + 4) for s in range(1, x.shape[2], 4)]  # frame 0 alone, then 4 at a time
        chunks = []
        for start, end in bounds:
            chunks.append(self.encoder(x[:, :, start:end], cache))  # [B, 2z, 1, h, w]
            cache.next_chunk()
        moments = self.conv1(torch.cat(chunks, dim=2))  # [B, 2z, T, h, w]: mu then log-variance
        mean, std = self._latent_stats(moments.device)
        return (moments[:, : self.z_dim].float() - mean) / std

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Normalised latents [B, z, T, h, w] -> video [B, 3, 1+4(T-1), h*s, w*s] clamped to [-1, 1] (float32).
        With `tile_sample_min_size` set, latents larger than a tile are decoded tile by tile (`vae_tiling`)."""
        if latents.dim() != 5 or latents.shape[1] != self.z_dim:
            raise ValueError(f"latents must be [B, {self.z_dim}, T, h, w], got shape {list(latents.shape)}")
        tile, s = self._tile_pixels(), self.spatial_stride
        if tile and max(latents.shape[-2:]) * s > tile:
            video = tiled(self._decode_latents, latents, tile // s, 1, Fraction(s), halo=TILE_HALO)
        else:
            video = self._decode_latents(latents)
        return video.clamp(-1.0, 1.0).float()

    def _decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        weight = self.conv2.weight
        mean, std = self._latent_stats(weight.device)
        z = latents.to(device=weight.device, dtype=torch.float32) * std + mean
        x = self.conv2(z.to(weight.dtype))  # [B, z, T, h, w]
        cache = ChunkCache(self.cache_device)
        frames = []
        for t in range(x.shape[2]):  # one latent frame at a time: 1 frame first, then 4 each
            frames.append(self.decoder(x[:, :, t : t + 1], cache))
            cache.next_chunk()
        return self._from_decoder_output(torch.cat(frames, dim=2))

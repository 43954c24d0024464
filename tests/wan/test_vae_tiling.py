"""Spatial VAE tiling (`--vae_tiling` / `--vae_spatial_tile_sample_min_size`, library/wan/vae_tiling.py).

The stated tolerance, checked here on the tiny VAEs with random weights (whose tile-border effects are far
larger than a trained VAE's), with the smallest tiles (4 latent pixels) so every tile is cut on both sides:
tiled and untiled results differ by less than 0.02 mean and 0.25 max absolute error, for a decode (pixels in
[-1, 1]) and for an encode (normalised latents, |z| up to about 1.5). Measured when written (mean / max):
decode 0.003 / 0.074 (2.1) and 0.007 / 0.059 (2.2); encode 0.004 / 0.021 (2.1) and 0.017 / 0.150 (2.2).
Without the 8-latent-pixel halo around each tile the 2.1 decode was off by up to 0.41. The tiling geometry
itself (starts, crops, halos, blend weights) is exact: a per-pixel function gives the untiled result to
rounding, and a frame no larger than a tile is not tiled at all.
"""

from __future__ import annotations

from fractions import Fraction

import pytest
import torch

from library.wan.vae import WanVAE
from library.wan.vae22 import Wan22VAE
from library.wan.vae_tiling import edge_weights, tile_starts, tiled


def _video(height: int, width: int, frames: int = 1) -> torch.Tensor:
    """A smooth coloured pattern [1, 3, F, H, W] in [-1, 1] (a random field would be all border)."""
    yy, xx = torch.meshgrid(torch.linspace(0, 3, height), torch.linspace(0, 3, width), indexing="ij")
    clip = [torch.stack([torch.sin(yy + t * 0.3 + c) * torch.cos(xx * 1.3 - c) for c in range(3)])
            for t in range(frames)]
    return torch.stack(clip, 1)[None] * 0.8


def test_tile_starts_cover_the_frame_and_end_flush():
    assert tile_starts(10, 16, 12) == [0]
    assert tile_starts(32, 16, 12) == [0, 12, 16]
    starts = tile_starts(100, 16, 12)
    assert starts[-1] + 16 == 100 and all(b > a for a, b in zip(starts, starts[1:]))
    weights = edge_weights(starts, 16, Fraction(1))
    total = torch.zeros(100)
    for start, w in zip(starts, weights):
        total[start:start + 16] += w
    assert (total > 0).all()  # every position has weight; inner tile edges ramp, frame edges do not
    assert weights[0][0] == 1 and weights[-1][-1] == 1 and weights[1][0] < 0.2


@pytest.mark.parametrize("scale", [Fraction(8), Fraction(1, 8)])
def test_a_per_pixel_function_is_tiled_exactly(scale):
    """Starts, crops, halos and normalised blend weights: any per-pixel map comes back unchanged."""
    x = torch.randn(1, 2, 3, 48, 80)

    def per_pixel(t):  # a 1x1 function at the output's scale: up by repetition, or down by picking
        t = torch.tanh(t) * 3 + 1
        if scale > 1:
            return t.repeat_interleave(8, -1).repeat_interleave(8, -2)
        return t[..., ::8, ::8]

    multiple = 1 if scale > 1 else 8
    out = tiled(per_pixel, x, 16 if scale > 1 else 32, multiple, scale, halo=4 * multiple)
    torch.testing.assert_close(out, per_pixel(x), rtol=0, atol=1e-5)


@pytest.mark.parametrize("version", ["2.1", "2.2"])
def test_tiled_vae_is_within_the_stated_tolerance(version):
    torch.manual_seed(0)
    if version == "2.1":  # 32 x 256 pixels, 4 x 32 latents; tiles of 4 latents (32 px), halo 8 latents
        vae, video, tile = WanVAE(dim=8, z_dim=16).eval(), _video(32, 256), 32
    else:  # 32 x 384 pixels, 2 x 24 latents; tiles of 4 latents (64 px), halo 8 latents (128 px)
        vae, video, tile = Wan22VAE(dim=8, decoder_dim=12, z_dim=48).eval(), _video(32, 384), 64
    with torch.no_grad():
        latents = vae.encode(video)
        full = vae.decode(latents)
        vae.tile_sample_min_size = tile  # a window (tile + halo) is narrower than the frame: both calls tile
        tiled_latents, tiled_video = vae.encode(video), vae.decode(latents)
    enc, dec = (tiled_latents - latents).abs(), (tiled_video - full).abs()
    assert tiled_latents.shape == latents.shape and tiled_video.shape == full.shape
    assert enc.mean() < 0.02 and enc.max() < 0.25, (enc.mean(), enc.max())
    assert dec.mean() < 0.02 and dec.max() < 0.25, (dec.mean(), dec.max())
    assert tiled_video.abs().max() <= 1.0


def test_a_frame_no_larger_than_a_tile_is_not_tiled():
    torch.manual_seed(0)
    vae = WanVAE(dim=8, z_dim=16).eval()
    video = _video(64, 64)
    with torch.no_grad():
        latents, decoded = vae.encode(video), vae.decode(vae.encode(video))
        vae.tile_sample_min_size = 256
        assert torch.equal(vae.encode(video), latents) and torch.equal(vae.decode(latents), decoded)

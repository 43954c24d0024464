"""Spatial tiling for the WAN VAEs: encode or decode a large frame as overlapping tiles, blended at the seams.

A memory feature (`--vae_tiling`, `--vae_spatial_tile_sample_min_size`): each tile runs the whole causal
time pass on its own, so the activations alive at once are a tile's, not a frame's. A tile is computed with
a halo of `TILE_HALO` latent pixels of its surroundings on each inner side (64 px for the 2.1 VAE, 128 px
for 2.2), which is then cropped away, so its convolutions see what they see in the whole frame. Neighbouring
tiles overlap by a quarter of a tile; in the overlap the two results are mixed with linear ramps (each
tile's weight rises from its inner edge), then normalised by the summed weights, so no seam shows. The
result is close to, not equal to, the untiled one: context beyond the halo and the per-frame attention of
the middle block are cut at the tile. The tolerance is stated and checked in `tests/wan/test_vae_tiling.py`.

Imports nothing of `library.wan`: the VAE driver (`vae_blocks.CausalVideoVAE`) calls `tiled` with its own
per-tile encode or decode.
"""

from __future__ import annotations

from fractions import Fraction
from typing import Callable

import torch

OVERLAP = Fraction(1, 4)  # of a tile; the stride between tile starts is the remaining three quarters
TILE_HALO = 8  # latent pixels of context computed around each tile's inner sides, then cropped away
DEFAULT_TILE = 256  # pixels: musubi-tuner's `vae_spatial_tile_sample_min_size` when only `vae_tiling` is given


def tile_starts(length: int, tile: int, stride: int) -> list[int]:
    """Starts of tiles of `tile` every `stride` that cover [0, length), the last one flush with the end."""
    if length <= tile:
        return [0]
    return list(range(0, length - tile, stride)) + [length - tile]


def edge_weights(starts: list[int], size: int, scale: Fraction) -> list[torch.Tensor]:
    """One axis: each tile's weights (output units), linear ramps over its overlaps with its neighbours."""
    n = int(size * scale)
    weights = []
    for i, start in enumerate(starts):
        w = torch.ones(n)
        if i > 0:  # the overlap with the previous tile, at this tile's front
            overlap = int((starts[i - 1] + size - start) * scale)
            w[:overlap] *= (torch.arange(overlap) + 0.5) / overlap
        if i < len(starts) - 1:  # the overlap with the next tile, at this tile's back
            overlap = int((start + size - starts[i + 1]) * scale)
            w[n - overlap:] *= ((torch.arange(overlap) + 0.5) / overlap).flip(0)
        weights.append(w)
    return weights


def tiled(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, tile: int, multiple: int,
          scale: Fraction, halo: int = 0) -> torch.Tensor:
    """fn over overlapping spatial tiles of x [B, C, T, H, W], blended -> [B, C', T', H*scale, W*scale].

    `tile` is the tile side in x's units, a multiple of `multiple` (what fn needs of its input's size), as
    is the stride and `halo` (the surroundings computed with each tile, then cropped); `scale` turns x's
    units into the output's (8 for a 2.1 decode, 1/8 for its encode)."""
    height, width = x.shape[-2:]
    stride = max(multiple, int(tile * (1 - OVERLAP)) // multiple * multiple)
    tile_h, tile_w = min(tile, height), min(tile, width)
    rows, cols = tile_starts(height, tile_h, stride), tile_starts(width, tile_w, stride)
    row_w, col_w = edge_weights(rows, tile_h, scale), edge_weights(cols, tile_w, scale)
    out = total = None
    for top, wr in zip(rows, row_w):
        for left, wc in zip(cols, col_w):
            y0, x0 = max(0, top - halo), max(0, left - halo)
            y1, x1 = min(height, top + tile_h + halo), min(width, left + tile_w + halo)
            part = fn(x[..., y0:y1, x0:x1]).float()  # [B, C', T', h', w'] with the halo
            oy, ox = int((top - y0) * scale), int((left - x0) * scale)
            part = part[..., oy:oy + int(tile_h * scale), ox:ox + int(tile_w * scale)]
            if out is None:
                out = part.new_zeros(*part.shape[:3], int(height * scale), int(width * scale))
                total = part.new_zeros(out.shape[-2:])
            weight = (wr[:, None] * wc[None, :]).to(part.device)  # [h', w']
            ys, xs = int(top * scale), int(left * scale)
            out[..., ys:ys + weight.shape[0], xs:xs + weight.shape[1]] += part * weight
            total[ys:ys + weight.shape[0], xs:xs + weight.shape[1]] += weight
    return out / total

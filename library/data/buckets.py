"""Aspect-ratio buckets: sizes at the area of `resolution`, in steps of the VAE stride times the DiT
patch size (16 for the WAN 2.1 VAE, 32 for the WAN 2.2 VAE), and the choice of a bucket per item. A
`resolution` whose sides are not multiples of that step is refused (`resolution_problem`), not rounded:
the user chose an area and an aspect, and a rounded one would train another size than the TOML says.

A bucket is (W, H) for the spatial part; datasets add the frame count F, and a batch only ever holds
items of one (W, H, F) bucket. Media are resized to cover the bucket, then centre-cropped.
"""

from __future__ import annotations

import math
from functools import lru_cache

from .video_io import MediaError

PATCH_SIZE = 2  # the DiT's spatial patch (1, 2, 2) for every WAN variant
MAX_ASPECT = 4.0  # no bucket is more elongated than 4:1


def bucket_step(vae_kind: str) -> int:
    """Spatial granularity of bucket sizes: VAE stride (8 or 16) times the patch size 2."""
    stride = {"2.1": 8, "2.2": 16}.get(vae_kind)
    if stride is None:
        raise ValueError(f"unknown VAE kind {vae_kind!r}; expected '2.1' or '2.2'")
    return stride * PATCH_SIZE


def resolution_problem(resolution: tuple[int, int], step: int) -> str | None:
    """Why `resolution` (W, H) cannot be used with bucket step `step`, else None. Every side must be a
    multiple of the step: then the resolution is itself a bucket, and media of its aspect are never cropped.
    Otherwise the buckets at its area skip that aspect ([60, 60] with step 16 has no square bucket: square
    images land in 64x48 and lose a quarter of their height), and a fixed bucket shrinks."""
    if all(side % step == 0 for side in resolution):
        return None
    down = [max(step, side // step * step) for side in resolution]
    up = [-(-side // step) * step for side in resolution]
    vae = {16: "the WAN 2.1 VAE's stride 8", 32: "the WAN 2.2 VAE's stride 16"}.get(step, f"stride {step // 2}")
    choices = f"{down} or {up}" if down != up else f"{up}"
    return (f"resolution = {list(resolution)} is not a multiple of {step} ({vae} x the DiT patch 2): buckets would "
            f"silently crop or shrink every item; use {choices}")


@lru_cache(maxsize=64)
def make_buckets(resolution: tuple[int, int], step: int) -> tuple[tuple[int, int], ...]:
    """Every (W, H) with sides multiples of `step`, area <= resolution's area, and maximal H for its W."""
    area = resolution[0] * resolution[1]
    buckets = []
    width = step
    while width * step <= area:
        height = area // width // step * step
        if height >= step and max(width / height, height / width) <= MAX_ASPECT:
            buckets.append((width, height))
        width += step
    return tuple(buckets)


def fixed_bucket(resolution: tuple[int, int], step: int) -> tuple[int, int]:
    """`resolution` rounded down to the step (the one bucket used when `enable_bucket` is off)."""
    return max(step, resolution[0] // step * step), max(step, resolution[1] // step * step)


def _own_size_bucket(width: int, height: int, area: int, step: int, name: str) -> tuple[int, int]:
    """The media's own aspect, scaled down to `area` if larger, rounded down to the step."""
    scale = min(1.0, math.sqrt(area / (width * height)))
    bucket = int(width * scale) // step * step, int(height * scale) // step * step
    if min(bucket) < step:
        raise MediaError(
            f"{name}: {width}x{height} is smaller than the smallest bucket side {step} and "
            "bucket_no_upscale is set; use a larger source or unset bucket_no_upscale")
    return bucket


def select_bucket(width: int, height: int, resolution: tuple[int, int], step: int, *,
                  enable_bucket: bool, no_upscale: bool, name: str = "media") -> tuple[int, int]:
    """The (W, H) bucket for media of `width` x `height`; raises MediaError when `no_upscale` forbids it."""
    if not enable_bucket:
        bucket = fixed_bucket(resolution, step)
        if no_upscale and (width < bucket[0] or height < bucket[1]):
            raise MediaError(
                f"{name}: {width}x{height} is smaller than the {bucket[0]}x{bucket[1]} bucket and "
                "bucket_no_upscale is set; use a larger source, lower `resolution`, set enable_bucket "
                "or unset bucket_no_upscale")
        return bucket
    area = resolution[0] * resolution[1]
    if no_upscale and width * height <= area:
        return _own_size_bucket(width, height, area, step, name)
    aspect = math.log(width / height)
    bucket = min(make_buckets(tuple(resolution), step), key=lambda b: abs(math.log(b[0] / b[1]) - aspect))
    if no_upscale and (bucket[0] > width or bucket[1] > height):
        return _own_size_bucket(width, height, area, step, name)
    return bucket

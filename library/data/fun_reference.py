"""Fun-Control reference images: the `ref_conv` input of Fun-Control V1.1 (WAN 2.1) and WAN 2.2 Fun-Control.

As VideoX-Fun passes `ref_image` (sources in docs/variants.md): the image is resized to exactly the video's
width x height (bicubic, the aspect ratio is not kept, no crop), scaled to [-1, 1], encoded by the VAE as a
1-frame video, and its one latent frame [z, h, w] goes to the DiT as `full_ref`.

Datasets name the reference like VACE's (`reference_directory`, JSONL `reference_path`, matched by
`conditions.ConditionFinder`); a Fun-Control task caches its latent as `fun_reference_latent` beside the
clip's latents, with the file's path, size and mtime in the cache settings (a changed image is re-cached).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from .video_io import MediaError, load_image

REFERENCE_KEY = "fun_reference_latent"


def reference_file(item) -> Path | None:
    """The item's reference image (from `reference_directory` / `reference_path`), or None."""
    return dict(item.conditions).get("reference")


def reference_pixels(path: str | Path, width: int, height: int) -> torch.Tensor:
    """A reference image resized to width x height like VideoX-Fun's `get_image_latent` -> [3, 1, H, W] in
    [-1, 1]."""
    from PIL import Image

    image = Image.fromarray(load_image(path)).resize((width, height), Image.Resampling.BICUBIC)
    pixels = torch.from_numpy(np.array(image)).permute(2, 0, 1)[:, None]
    return pixels.float().div_(127.5).sub_(1.0)


@torch.no_grad()
def encode_reference(vae, path: str | Path, width: int, height: int) -> torch.Tensor:
    """The reference latent [z, h, w]: the image encoded as a 1-frame video."""
    device, dtype = next(vae.parameters()).device, next(vae.parameters()).dtype
    return vae.encode(reference_pixels(path, width, height)[None].to(device=device, dtype=dtype))[0, :, 0]


def reference_settings(item) -> dict:
    """What decides an item's reference latent besides the VAE: the file's path, size and mtime."""
    path = reference_file(item)
    if path is None:
        return {}
    try:
        stat = path.stat()
    except OSError as exc:
        raise MediaError(f"{item.media_path}: its reference image {path} cannot be read ({exc})") from None
    return {"fun_reference": [str(path), stat.st_size, stat.st_mtime_ns]}

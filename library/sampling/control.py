"""Fun-Control generation input: the control video read for one request, as musubi-tuner's
`wan_generate_video.py --control_path` reads it.

The control is read from its frame 0 on, one control frame per output frame at the control's own frame
rate (no resampling), each frame scaled to cover the output size and centre-cropped, like the training
items. A folder of frames works like a video; a still image serves every frame. A control with fewer
frames than the request is an error (musubi-tuner's too), never a silent repeat.

A reference image (`--ref_image_path`, prompt `--ri`) goes to the `ref_conv` layer of Fun-Control V1.1 and
WAN 2.2 Fun-Control models as VideoX-Fun passes `ref_image` (library/data/fun_reference.py); a model without
`ref_conv` cannot take one (an error, not a silent drop).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from library.data.fun_reference import encode_reference
from library.data.video_io import MediaError, is_image_file, load_image, probe, read_video_frames, resize_and_crop

from .prompts import PromptError


def load_control_video(path: str, frames: int, width: int, height: int, source: str = "prompt") -> torch.Tensor:
    """The first `frames` frames of the control at width x height -> [1, 3, frames, H, W] in [-1, 1]."""
    control = Path(path).expanduser()
    if not control.exists():
        raise PromptError(f"{source}: the control video {control} does not exist")
    try:
        if is_image_file(control):
            pixels = np.repeat(resize_and_crop(load_image(control), (width, height))[None], frames, axis=0)
        else:
            count = probe(control).frame_count
            if count < frames:
                raise PromptError(f"{source}: the control video {control} has {count} frames and {frames} are "
                                  "rendered: give a longer control video or render fewer frames (--f / --frames)")
            pixels = read_video_frames(control, list(range(frames)), (width, height))
    except MediaError as exc:
        raise PromptError(f"{source}: the control video cannot be read: {exc}") from None
    video = torch.from_numpy(np.ascontiguousarray(pixels)).permute(3, 0, 1, 2)[None]  # [1, 3, F, H, W] uint8
    return video.float() / 127.5 - 1.0


def fun_reference_latent(variant, vae, settings: dict, source: str = "prompt") -> torch.Tensor:
    """The request's one reference image encoded for `ref_conv` -> [1, z, h, w]."""
    refs = settings["references"]
    if not variant.ref_conv:
        raise PromptError(f"{source}: {variant.name}: this checkpoint has no `ref_conv` layer, so it takes no "
                          "reference image (--ref_image_path / --ri); only Fun-Control V1.1 and WAN 2.2 Fun-Control "
                          "models have one: drop the reference image or load such a model")
    if len(refs) != 1:
        raise PromptError(f"{source}: a Fun-Control model takes one reference image, got {len(refs)} "
                          f"({', '.join(refs)})")
    path = Path(refs[0]).expanduser()
    if not path.is_file():
        raise PromptError(f"{source}: the reference image {path} does not exist")
    try:
        return encode_reference(vae, path, settings["width"], settings["height"])[None].float()
    except MediaError as exc:
        raise PromptError(f"{source}: the reference image cannot be read: {exc}") from None

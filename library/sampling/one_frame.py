"""One-frame inference (musubi-tuner's `--one_frame_inference target_index=1,control_index=0`, prompt option
`--of`): one image rendered as the target frame among control images, each latent frame at its RoPE time index.

`control_index` holds one index per control image (`--control_image_path A B`, prompt `--ci A --ci B`),
separated by `;`; f_indices = sorted(control indices + [target_index]) are the latent frames, in order. Each
control image is VAE-encoded on its own; y has mask 1 (all 4 channels) and the control latent at each control
frame, mask 0 and the latent of a black image at the target frame. The CLIP tokens come from the start image
(`--image_path`, prompt `--i`; FLF2V: and the end image). After denoising, the target frame alone is decoded.
WAN 2.1 I2V (i2v-14B) and FLF2V (flf2v-14B) only, as in musubi-tuner.
"""

from __future__ import annotations

import torch


def parse(text: str) -> tuple[int, list[int], list[int], int]:
    """`target_index=1,control_index=0;2` -> (target, controls, f_indices, position of the target in f_indices).
    Unknown or malformed parts are ValueErrors."""
    target, controls = None, None
    for part in (p.strip() for p in str(text).split(",") if p.strip()):
        name, _, value = part.partition("=")
        try:
            if name == "target_index":
                target = int(value)
            elif name == "control_index":
                controls = [int(v) for v in value.split(";") if v.strip()]
            else:
                raise ValueError(f"unknown part {part!r}")
        except ValueError as exc:
            raise ValueError(f"{text!r}: {exc} (expected target_index=N,control_index=A;B)") from None
    if target is None or not controls:
        raise ValueError(f"{text!r}: give target_index=N and control_index=A (or A;B), e.g. "
                         "target_index=1,control_index=0")
    if min([target, *controls]) < 0 or target in controls or len(set(controls)) != len(controls):
        raise ValueError(f"{text!r}: the indices must be 0 or more and all differ")
    positions = sorted([*controls, target])
    return target, controls, positions, positions.index(target)


def problems(variant, one_frame: str, controls: int) -> list[str]:
    """What keeps a one-frame request from rendering on `variant` with `controls` control images."""
    try:
        _, indices, _, _ = parse(one_frame)
    except ValueError as exc:
        return [f"--of / --one_frame_inference {exc}"]
    out = []
    if not variant.image_embedding:
        out.append(f"one-frame inference is for the WAN 2.1 I2V and FLF2V models (i2v-14B, flf2v-14B), not "
                   f"{variant.name}")
    if controls != len(indices):
        out.append(f"one-frame inference with control_index {';'.join(map(str, indices))} needs {len(indices)} control "
                   f"image(s) (--ci / --control_image_path), got {controls}")
    return out


@torch.no_grad()
def condition(vae, one_frame: str, controls: list[torch.Tensor]) -> tuple[torch.Tensor, list[int], int]:
    """Control images [1, 3, 1, H, W] in [-1, 1] -> (y [1, 4 + z, F, h, w], f_indices, target position)."""
    target, indices, positions, index = parse(one_frame)
    latents = [vae.encode(image).float() for image in controls]  # each [1, z, 1, h, w]
    black = vae.encode(torch.zeros_like(controls[0])).float()
    frames = []
    for position in positions:
        if position == target:
            frames.append(torch.cat([torch.zeros_like(black[:, :4]), black], dim=1))
        else:
            latent = latents[indices.index(position)]
            frames.append(torch.cat([torch.ones_like(latent[:, :4]), latent], dim=1))
    return torch.cat(frames, dim=2), positions, index

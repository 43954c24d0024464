"""diffusers `AutoencoderKLWan` key names -> the official WAN VAE key names, for the 2.1 and 2.2 VAEs.

What lives here: the renames both VAEs share (`rename_diffusers_vae_keys`, `count_resnets`) and each
VAE's level renames (`vae21_state_dict_from_diffusers`, `vae22_state_dict_from_diffusers`). Only key
names change; the values ride along untouched (tensors or, for the loader, file keys). Telling the two
VAEs apart and inferring their constructor arguments from shapes is `loading.py`'s job.
"""

from __future__ import annotations

import re
from typing import Callable

_RESNET_PARTS = {"norm1": "residual.0", "conv1": "residual.2", "norm2": "residual.3", "conv2": "residual.6",
                 "conv_shortcut": "shortcut"}
_RESNET_PART = re.compile(r"^(.*\.(?:downsamples|upsamples|middle)\.\d+\.)(norm1|conv1|norm2|conv2|conv_shortcut)\.")
_COMMON_RENAMES = [
    (r"^quant_conv\.", "conv1."),
    (r"^post_quant_conv\.", "conv2."),
    (r"^(encoder|decoder)\.conv_in\.", r"\1.conv1."),
    (r"^(encoder|decoder)\.norm_out\.", r"\1.head.0."),
    (r"^(encoder|decoder)\.conv_out\.", r"\1.head.2."),
    (r"^(encoder|decoder)\.mid_block\.resnets\.0\.", r"\1.middle.0."),
    (r"^(encoder|decoder)\.mid_block\.attentions\.0\.", r"\1.middle.1."),
    (r"^(encoder|decoder)\.mid_block\.resnets\.1\.", r"\1.middle.2."),
]
Rename = tuple[str, str | Callable[[re.Match], str]]  # (pattern, replacement)


def count_resnets(sd: dict, block_prefix: str) -> int:
    """Residual blocks per level in a diffusers VAE state dict, e.g. block_prefix 'decoder.up_blocks'."""
    found = [int(m.group(1)) for k in sd if (m := re.match(rf"^{re.escape(block_prefix)}\.\d+\.resnets\.(\d+)\.", k))]
    if not found:
        raise ValueError(f"not a diffusers WAN VAE state dict: no '{block_prefix}.N.resnets.M' keys")
    return max(found) + 1


def rename_diffusers_vae_keys(sd: dict, level_renames: list[Rename]) -> dict:
    """Apply the level renames of one VAE, then the renames both VAEs share; values are kept as they are."""
    out = {}
    for key, value in sd.items():
        for pattern, repl in level_renames + _COMMON_RENAMES:
            key = re.sub(pattern, repl, key)
        key = _RESNET_PART.sub(lambda m: m.group(1) + _RESNET_PARTS[m.group(2)] + ".", key)
        out[key] = value
    return out



def vae21_state_dict_from_diffusers(sd: dict) -> dict:
    """diffusers `AutoencoderKLWan` (2.1) key names -> official names; the tensors are not copied."""
    per_level = count_resnets(sd, "decoder.up_blocks") + 1  # residual blocks plus the upsampler
    renames: list[Rename] = [
        (r"^encoder\.down_blocks\.", "encoder.downsamples."),  # already one flat list in both
        (r"^decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.",
         lambda m: f"decoder.upsamples.{int(m.group(1)) * per_level + int(m.group(2))}."),
        (r"^decoder\.up_blocks\.(\d+)\.upsamplers\.0\.",
         lambda m: f"decoder.upsamples.{int(m.group(1)) * per_level + per_level - 1}."),
    ]
    return rename_diffusers_vae_keys(sd, renames)


def vae22_state_dict_from_diffusers(sd: dict) -> dict:
    """diffusers `AutoencoderKLWan` (2.2, is_residual) key names -> official names; tensors are not copied."""
    n_down = count_resnets(sd, "encoder.down_blocks")  # the downsampler follows the residual blocks
    n_up = count_resnets(sd, "decoder.up_blocks")
    renames: list[Rename] = [
        (r"^encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.", r"encoder.downsamples.\1.downsamples.\2."),
        (r"^encoder\.down_blocks\.(\d+)\.downsampler\.", rf"encoder.downsamples.\1.downsamples.{n_down}."),
        (r"^decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.", r"decoder.upsamples.\1.upsamples.\2."),
        (r"^decoder\.up_blocks\.(\d+)\.upsampler\.", rf"decoder.upsamples.\1.upsamples.{n_up}."),
    ]
    return rename_diffusers_vae_keys(sd, renames)

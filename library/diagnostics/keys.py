"""What a LoRA file's keys say: its key format (Kohya / musubi, ComfyUI, diffusers, peft), whether ComfyUI
maps its names, the model family of a LoRA that is not for WAN, and the split of its tensors into complete
WAN modules, foreign modules, incomplete modules and keys that are no LoRA tensor."""

from __future__ import annotations

import re

import torch

from networks.convert import official_name
from networks.lora import _MODULE_PREFIXES, _PARTS, group_lora_keys
from networks.lora_wan import diffusers_module_to_official

LORA_SUFFIXES = tuple(_PARTS)
# key prefix -> format name, and how the report spells it
FORMATS = {"kohya": (("lora_unet_",), "Kohya / musubi (lora_unet_*)"),
           "comfyui": (("diffusion_model.", "model.diffusion_model."), "ComfyUI (diffusion_model.*.lora_A/B)"),
           "diffusers": (("transformer.",), "diffusers (transformer.*)"),
           "peft": (("base_model.model.",), "peft (base_model.model.*)")}
# a regex over a file's keys -> the model family a non-WAN LoRA is for (first match wins)
FAMILIES = (
    (r"^lora_te[12]_|^lora_unet_(input|output)_blocks_|^lora_unet_middle_block_", "SDXL"),
    (r"^lora_unet_(down|up)_blocks_|^lora_unet_mid_block_|^unet\.", "Stable Diffusion (SD 1.x / 2.x / SDXL UNet)"),
    (r"individual_token_refiner", "HunyuanVideo"),
    (r"double_blocks|single_blocks|single_transformer_blocks", "Flux or HunyuanVideo (double / single-stream blocks)"),
    (r"joint_blocks", "Stable Diffusion 3"),
    (r"^lora_te_|^text_encoder", "a Stable Diffusion text encoder"),
    (r"transformer_blocks", "another diffusers transformer (WAN's blocks are `blocks.N`)"),
)
EXTRA_TENSORS = {"dora_scale": "DoRA magnitudes", "hada_": "LyCORIS LoHa", "lokr_": "LyCORIS LoKr",
                 ".diff": "full weight differences", "lora_mid": "LoCon mid weights"}


def format_counts(keys) -> dict[str, int]:
    """{format name: number of LoRA tensors} by key prefix ("unknown" for prefixes no WAN format uses)."""
    counts: dict[str, int] = {}
    for key in keys:
        if key.endswith(LORA_SUFFIXES):
            name = next((n for n, (prefixes, _) in FORMATS.items() if key.startswith(prefixes)), "unknown")
            counts[name] = counts.get(name, 0) + 1
    return counts


def key_format(keys) -> str:
    counts = format_counts(keys)
    if len(counts) == 1:
        return next(iter(counts))
    return "mixed (" + ", ".join(f"{n} {c}" for n, c in counts.items()) + ")" if counts else "unknown"


def uses_diffusers_names(keys) -> bool:
    """True when a LoRA key names its module the diffusers way (ComfyUI does not map those names)."""
    for key in keys:
        suffix = next((s for s in LORA_SUFFIXES if key.endswith(s)), None)
        if suffix:
            stem = key[: -len(suffix)]
            stem = next((stem[len(p):] for p in _MODULE_PREFIXES if stem.startswith(p)), stem)
            if diffusers_module_to_official(stem) != stem:
                return True
    return False


def guess_family(keys) -> str | None:
    """The model family a LoRA's key names suggest, when it is obviously not WAN."""
    for pattern, family in FAMILIES:
        if any(re.search(pattern, k) for k in keys):
            if family.startswith("Flux"):
                doubles = {int(m[1]) for k in keys if (m := re.search(r"double_blocks[._](\d+)", k))}
                family = {19: "Flux.1", 20: "HunyuanVideo"}.get(max(doubles, default=-1) + 1, family)
            return family
    return None


def split_modules(sd: dict[str, torch.Tensor]):
    """({official name: parts} of complete WAN modules, foreign module stems, incomplete, not-LoRA keys)."""
    grouped, unknown = group_lora_keys(sd, diffusers_module_to_official)
    modules, foreign, incomplete = {}, [], []
    for kohya, parts in grouped.items():
        try:
            name = official_name(kohya)
        except ValueError:
            foreign.append(kohya)
            continue
        if "down" in parts and "up" in parts:
            modules[name] = parts
        else:
            incomplete.append(f"{name} (no {'down' if 'down' not in parts else 'up'})")
    for key in unknown:  # LoRA tensors under a prefix no WAN format uses (lora_te_, unet., ...)
        suffix = next((s for s in LORA_SUFFIXES if key.endswith(s)), None)
        if suffix and key[: -len(suffix)] not in foreign:
            foreign.append(key[: -len(suffix)])
    return modules, foreign, incomplete, [k for k in unknown if not k.endswith(LORA_SUFFIXES)]


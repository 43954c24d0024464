"""Convert WAN LoRA files between the key formats users' tools read, without loading any model.

    kohya     lora_unet_blocks_0_self_attn_q.lora_down.weight / .lora_up.weight / .alpha  (musubi, Kohya)
    comfyui   diffusion_model.blocks.0.self_attn.q.lora_A.weight / .lora_B.weight / .alpha
    diffusers transformer.blocks.0.attn1.to_q.lora_A.weight / .lora_B.weight        (alpha folded in)

LyCORIS LoHa / LoKr files keep their part names (`.hada_w1_a`, `.lokr_w1`, ...) under the kohya or comfyui
stems (ComfyUI loads both); to diffusers they are written as their exact LoRA equivalent.
Any of the three (and peft's `.default` spelling) is read; the WAN module-name grammar below turns
Kohya's underscored names back into official dotted names. The metadata is kept, with the format noted.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from .lora import group_lora_keys
from .lora_files import LoraInputError, read_lora_file
from .lora_wan import diffusers_module_to_official
from .lycoris_weights import as_lora, group_lycoris, is_lycoris, lycoris_keys

FORMATS = ("kohya", "comfyui", "diffusers")

# Kohya name (without `lora_unet_`) -> official name, for every Linear a WAN LoRA can target.
_KOHYA_TO_OFFICIAL = [
    (re.compile(r"^blocks_(\d+)_(self_attn|cross_attn)_(q|k|v|o|k_img|v_img)$"), r"blocks.\1.\2.\3"),
    (re.compile(r"^blocks_(\d+)_ffn_(0|2)$"), r"blocks.\1.ffn.\2"),
    (re.compile(r"^vace_blocks_(\d+)_(self_attn|cross_attn)_(q|k|v|o)$"), r"vace_blocks.\1.\2.\3"),  # VACE
    (re.compile(r"^vace_blocks_(\d+)_(ffn_0|ffn_2|before_proj|after_proj)$"),
     lambda m: f"vace_blocks.{m[1]}.{m[2].replace('ffn_', 'ffn.')}"),
    (re.compile(r"^(text_embedding|time_embedding)_(0|2)$"), r"\1.\2"),
    (re.compile(r"^time_projection_1$"), "time_projection.1"),
    (re.compile(r"^head_head$"), "head.head"),
    (re.compile(r"^img_emb_proj_(1|3)$"), r"img_emb.proj.\1"),
]
# official -> diffusers module names (the inverse of lora_wan.diffusers_module_to_official)
_OFFICIAL_TO_DIFFUSERS = [
    (re.compile(r"\.self_attn\."), ".attn1."), (re.compile(r"\.cross_attn\."), ".attn2."),
    (re.compile(r"\.(attn[12])\.q$"), r".\1.to_q"), (re.compile(r"\.(attn[12])\.k$"), r".\1.to_k"),
    (re.compile(r"\.(attn[12])\.v$"), r".\1.to_v"), (re.compile(r"\.(attn[12])\.o$"), r".\1.to_out.0"),
    (re.compile(r"\.k_img$"), ".add_k_proj"), (re.compile(r"\.v_img$"), ".add_v_proj"),
    (re.compile(r"\.ffn\.0$"), ".ffn.net.0.proj"), (re.compile(r"\.ffn\.2$"), ".ffn.net.2"),
    (re.compile(r"^(vace_blocks\.\d+)\.before_proj$"), r"\1.proj_in"),
    (re.compile(r"^(vace_blocks\.\d+)\.after_proj$"), r"\1.proj_out"),
    (re.compile(r"^text_embedding\.0$"), "condition_embedder.text_embedder.linear_1"),
    (re.compile(r"^text_embedding\.2$"), "condition_embedder.text_embedder.linear_2"),
    (re.compile(r"^time_embedding\.0$"), "condition_embedder.time_embedder.linear_1"),
    (re.compile(r"^time_embedding\.2$"), "condition_embedder.time_embedder.linear_2"),
    (re.compile(r"^time_projection\.1$"), "condition_embedder.time_proj"),
    (re.compile(r"^head\.head$"), "proj_out"),
    (re.compile(r"^img_emb\.proj\.1$"), "condition_embedder.image_embedder.ff.net.0.proj"),
    (re.compile(r"^img_emb\.proj\.3$"), "condition_embedder.image_embedder.ff.net.2"),
]


def official_name(kohya: str) -> str:
    """`lora_unet_blocks_0_self_attn_q` -> `blocks.0.self_attn.q`; a clear error for names WAN has not."""
    stem = kohya.removeprefix("lora_unet_")
    for pattern, repl in _KOHYA_TO_OFFICIAL:
        if pattern.match(stem):
            return pattern.sub(repl, stem)
    raise LoraInputError(f"LoRA module {kohya!r} is not a WAN DiT Linear layer; is this a LoRA for another model? "
                         "(tools/check_lora.py tells which)")


def diffusers_name(official: str) -> str:
    for pattern, repl in _OFFICIAL_TO_DIFFUSERS:
        official = pattern.sub(repl, official)
    return official


def read_modules(path, native: bool = False) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, str]]:
    """{official module name: {"down", "up", "alpha"}} and the metadata, from a file in any format. A LyCORIS
    LoHa / LoKr file gives its exact LoRA equivalent (`networks.lycoris_weights`), or with `native` its own
    parts (hada_* / lokr_* / alpha)."""
    sd, meta = read_lora_file(path)
    if is_lycoris(sd):
        grouped, unknown = group_lycoris(sd, diffusers_module_to_official)
        if unknown:
            raise LoraInputError(f"{path}: {len(unknown)} keys are not LoHa / LoKr tensors (e.g. {unknown[:3]})")
        modules = {official_name(kohya): parts for kohya, parts in grouped.items()}
        return (modules if native else {n: as_lora(n, p) for n, p in modules.items()}), meta
    grouped, unknown = group_lora_keys(sd, diffusers_module_to_official)
    if unknown:
        raise LoraInputError(f"{path}: {len(unknown)} keys are not LoRA down / up / alpha tensors (e.g. "
                             f"{unknown[:3]}); it is not a LoRA file (tools/check_lora.py tells what it is)")
    modules = {}
    for kohya, parts in grouped.items():
        if "down" not in parts or "up" not in parts:
            raise LoraInputError(f"{path}: module {kohya} lacks its {'down' if 'down' not in parts else 'up'} "
                                 "weight; the file is incomplete: export it again")
        modules[official_name(kohya)] = parts
    return modules, meta


def to_format(modules: dict[str, dict[str, torch.Tensor]], fmt: str) -> dict[str, torch.Tensor]:
    """The tensors of `modules` under one format's keys (diffusers: alpha / rank folded into lora_B)."""
    if fmt not in FORMATS:
        raise LoraInputError(f"unknown LoRA format {fmt!r}; choose one of {', '.join(FORMATS)}")
    out = {}
    for name, parts in sorted(modules.items()):
        down, up = parts["down"], parts["up"]
        alpha = parts.get("alpha", torch.tensor(float(down.shape[0])))
        if fmt == "kohya":
            stem = "lora_unet_" + name.replace(".", "_")
            out |= {f"{stem}.lora_down.weight": down, f"{stem}.lora_up.weight": up, f"{stem}.alpha": alpha}
        elif fmt == "comfyui":
            stem = f"diffusion_model.{name}"
            out |= {f"{stem}.lora_A.weight": down, f"{stem}.lora_B.weight": up, f"{stem}.alpha": alpha}
        else:
            scale = float(alpha) / down.shape[0]
            stem = f"transformer.{diffusers_name(name)}"
            out |= {f"{stem}.lora_A.weight": down, f"{stem}.lora_B.weight": (up.float() * scale).to(up.dtype)}
    return {k: v.contiguous() for k, v in out.items()}


def convert_lora(src, dst, fmt: str, dtype: torch.dtype | None = None) -> Path:
    """Read a WAN LoRA in any format and write it (atomically) in `fmt`, optionally cast to `dtype`."""
    from .lora import write_lora_file

    modules, meta = read_modules(src, native=True)
    lycoris = any(kind in part for parts in modules.values() for part in parts for kind in ("hada_", "lokr_"))
    if lycoris and fmt == "diffusers":  # no LoHa / LoKr keys there: the exact LoRA equivalent
        tensors = to_format({n: as_lora(n, p) for n, p in modules.items()}, fmt)
    else:
        tensors = lycoris_keys(modules, fmt) if lycoris else to_format(modules, fmt)
    if dtype is not None:
        tensors = {k: v.to(dtype) for k, v in tensors.items()}
    meta = {**meta, "ss_lora_format": fmt, "ss_converted_from": Path(str(src)).name}
    return write_lora_file(tensors, dst, meta, hashes=False)

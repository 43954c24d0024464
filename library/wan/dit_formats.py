"""DiT checkpoint formats: from whatever names a file uses to the official names our model uses.

Handles the official / ComfyUI names (optionally behind `model.diffusion_model.` or `diffusion_model.`),
diffusers names, and fp8 files: plain float8 weights, and ComfyUI `fp8_scaled` weights with a per-tensor
(or per-channel) scale under either spelling (`scale_weight` or `weight_scale`). Also tells what a file
is when it is not a DiT at all, and which variant its tensor shapes describe.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from .checkpoint_files import Checkpoint, CheckpointError
from .fun import with_file_features
from .variants import WanVariant, variants_matching

FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)
_PREFIXES = ("model.diffusion_model.", "diffusion_model.", "transformer.", "model.")
_SCALE_SUFFIXES = ("scale_weight", "weight_scale")
_DROPPED_SUFFIXES = ("scale_input", "input_scale", "comfy_quant")
_DROPPED_KEYS = ("scaled_fp8",)

# diffusers -> official, applied in order (regex, replacement); verified bijective for WAN.
_DIFFUSERS_TO_OFFICIAL = [
    (r"^condition_embedder\.time_embedder\.linear_1\.", "time_embedding.0."),
    (r"^condition_embedder\.time_embedder\.linear_2\.", "time_embedding.2."),
    (r"^condition_embedder\.text_embedder\.linear_1\.", "text_embedding.0."),
    (r"^condition_embedder\.text_embedder\.linear_2\.", "text_embedding.2."),
    (r"^condition_embedder\.time_proj\.", "time_projection.1."),
    (r"^condition_embedder\.image_embedder\.norm1\.", "img_emb.proj.0."),
    (r"^condition_embedder\.image_embedder\.ff\.net\.0\.proj\.", "img_emb.proj.1."),
    (r"^condition_embedder\.image_embedder\.ff\.net\.2\.", "img_emb.proj.3."),
    (r"^condition_embedder\.image_embedder\.norm2\.", "img_emb.proj.4."),
    (r"^condition_embedder\.image_embedder\.pos_embed$", "img_emb.emb_pos"),
    (r"^proj_out\.", "head.head."),
    (r"^scale_shift_table$", "head.modulation"),
    (r"^((?:vace_)?blocks\.\d+)\.scale_shift_table$", r"\1.modulation"),
    (r"^((?:vace_)?blocks\.\d+)\.norm2\.", r"\1.norm3."),
    (r"^((?:vace_)?blocks\.\d+)\.ffn\.net\.0\.proj\.", r"\1.ffn.0."),
    (r"^((?:vace_)?blocks\.\d+)\.ffn\.net\.2\.", r"\1.ffn.2."),
    (r"^(vace_blocks\.\d+)\.proj_in\.", r"\1.before_proj."),  # diffusers WanVACETransformer3DModel
    (r"^(vace_blocks\.\d+)\.proj_out\.", r"\1.after_proj."),
    (r"\.attn1\.", ".self_attn."),
    (r"\.attn2\.", ".cross_attn."),
    (r"\.to_q\.", ".q."),
    (r"\.to_k\.", ".k."),
    (r"\.to_v\.", ".v."),
    (r"\.to_out\.0\.", ".o."),
    (r"\.add_k_proj\.", ".k_img."),
    (r"\.add_v_proj\.", ".v_img."),
    (r"\.norm_added_k\.", ".norm_k_img."),
]
_DIFFUSERS_RULES = [(re.compile(p), r) for p, r in _DIFFUSERS_TO_OFFICIAL]


def diffusers_to_official(key: str) -> str:
    """One diffusers WanTransformer3DModel key -> the official name."""
    for pattern, repl in _DIFFUSERS_RULES:
        key = pattern.sub(repl, key)
    return key


def _other_architecture(has) -> str | None:
    """Other model families, by names only they use; checked first, because their full checkpoints also
    hold VAE and text-encoder tensors whose names look like WAN's."""
    if has("conditioner.embedders.", "label_emb.0.0.", "add_embedding.linear_1."):
        return "a Stable Diffusion XL checkpoint (SDXL UNet)"
    if has("input_blocks.", "cond_stage_model.", "down_blocks.0.attentions.0.transformer_blocks."):
        return "a Stable Diffusion 1.x / 2.x checkpoint (UNet)"
    if has("token_refiner.") or has("double_blocks.") and has("img_attn_qkv"):
        return "a HunyuanVideo DiT"
    if has("double_blocks.", "single_transformer_blocks."):
        return "a Flux DiT"
    if has("joint_blocks.", "context_embedder.") and has("pos_embed", "x_embedder."):
        return "a Stable Diffusion 3 DiT (MMDiT)"
    if has("adaln_single.", "patchify_proj."):
        return "a PixArt / LTX-Video DiT"
    if has("encoder.down.0.block.", "decoder.up.0.block.") or (
            has("decoder.conv_in", "post_quant_conv") and has(".norm1.weight") and not has(".gamma")):
        return "a Stable Diffusion / Flux VAE (2D, not WAN's video VAE)"
    if has("text_model.encoder.layers."):
        return "a CLIP text encoder (Stable Diffusion / Flux), not umT5"
    if has("block.0.layer.0.SelfAttention.relative_attention_bias") and has("block.1.layer.0.SelfAttention.q") \
            and not has("block.1.layer.0.SelfAttention.relative_attention_bias"):
        return "a T5 text encoder (T5-XXL v1.1, as Flux and SD3 use), not umT5"
    return None


def describe_checkpoint(keys: list[str]) -> str:
    """A short human name for what a checkpoint holds, from its key names alone."""
    ks = set(keys)
    has = lambda *subs: any(any(s in k for s in subs) for k in ks)  # noqa: E731
    if has("lora_down", "lora_up", "lora_A", "lora_B"):
        return "a LoRA"
    other = _other_architecture(has)
    if other:
        return other
    if has("decoder.middle.0.residual", "decoder.conv_in", "encoder.downsamples", "post_quant_conv"):
        return "a WAN VAE"
    if has("visual.transformer", "vision_model.", "textual.", "pre_layrnorm.") and \
            not has("head.modulation", "condition_embedder.", "scale_shift_table"):
        # official WAN / open_clip / transformers names; tested before umT5 because the official WAN
        # CLIP file also holds an XLM-RoBERTa text tower (`textual.token_embedding`)
        return "a CLIP model"
    if has("token_embedding.weight", "encoder.final_layer_norm", "SelfAttention.relative_attention_bias"):
        return "a umT5 text encoder"
    if has("head.modulation", "condition_embedder.", "patch_embedding.weight"):
        return "a WAN DiT"
    return "an unknown model"


_WHERE = {  # what a file is -> where it goes
    "a WAN DiT": "pass it as `dit` (or `dit_high_noise`)", "a WAN VAE": "pass it as `vae`",
    "a umT5 text encoder": "pass it as `t5`", "a CLIP model": "pass it as `clip` (WAN 2.1 I2V only)",
    "a LoRA": "a LoRA goes in `network_weights` or `base_weights` (training) or --lora (generation)",
}
_WANTED = {  # what was asked for -> the files that are that
    "a WAN DiT": "the WAN DiT (wan2.2_t2v_low_noise_14B_fp16.safetensors, an official folder of shards, ...)",
    "a WAN VAE": "the WAN VAE (Wan2.1_VAE.pth or wan_2.1_vae.safetensors; Wan2.2_VAE.pth for ti2v-5B)",
    "a umT5 text encoder": "the umT5-XXL encoder (models_t5_umt5-xxl-enc-bf16.pth or umt5_xxl_fp16.safetensors)",
}


def wrong_model(source, what: str, wanted: str) -> CheckpointError:
    """The error for a file that holds `what` (a `describe_checkpoint` name) where `wanted` belongs: it
    names both and says where this file goes, or which file goes here."""
    advice = _WHERE.get(what) or f"pass {_WANTED[wanted]} instead"
    return CheckpointError(f"{source}: this is {what}, not {wanted}; {advice}")


@dataclass
class DitLayout:
    """How a checkpoint's keys map onto the official names."""

    prefix: str
    diffusers: bool
    key_map: dict[str, str]  # official name -> key in the file
    scales: dict[str, str]  # official weight name -> key of its fp8 scale
    dropped: list[str]  # quantisation extras that are not weights


def _strip_prefix(keys: list[str]) -> str:
    for prefix in _PREFIXES:
        inner = [k[len(prefix):] for k in keys if k.startswith(prefix)]
        if any(k in ("head.modulation", "patch_embedding.weight", "scale_shift_table") for k in inner):
            return prefix
    return ""


def plan_dit_layout(ckpt: Checkpoint) -> DitLayout:
    """Work out prefix, naming and fp8 scales from the header alone; nothing is read yet."""
    keys = ckpt.keys()
    what = describe_checkpoint(keys)
    if what != "a WAN DiT":
        raise wrong_model(ckpt.source, what, "a WAN DiT")
    prefix = _strip_prefix(keys)
    inner = {k[len(prefix):]: k for k in keys if k.startswith(prefix)}
    diffusers = any(k.startswith("condition_embedder.") for k in inner)
    key_map, scales, dropped = {}, {}, []
    for name, file_key in inner.items():
        leaf = name.rsplit(".", 1)[-1]
        if name in _DROPPED_KEYS or leaf in _DROPPED_SUFFIXES:
            dropped.append(file_key)
            continue
        official = diffusers_to_official(name) if diffusers else name
        if leaf in _SCALE_SUFFIXES:
            scales[official.rsplit(".", 1)[0] + ".weight"] = file_key
        else:
            key_map[official] = file_key
    return DitLayout(prefix, diffusers, key_map, scales, dropped)


def _read_config_json(ckpt: Checkpoint) -> dict:
    path = Path(ckpt.source)
    folder = path if path.is_dir() else path.parent
    cfg = folder / "config.json"
    try:
        return json.loads(cfg.read_text()) if cfg.is_file() else {}
    except json.JSONDecodeError:
        return {}


def detect_variant(ckpt: Checkpoint, layout: DitLayout, task_variant: WanVariant | None) -> WanVariant:
    """The variant that the tensor shapes describe, checked against the configured task."""
    shape = lambda k: ckpt.shape(layout.key_map[k])  # noqa: E731
    if "patch_embedding.weight" not in layout.key_map and "vace_patch_embedding.weight" in layout.key_map:
        raise CheckpointError(f"{ckpt.source}: this holds only the VACE blocks (a 'VACE module' file), not the DiT "
                              "they extend; pass a whole VACE model (the official Wan2.1-VACE-14B / -1.3B folder, "
                              "ComfyUI's wan2.1_vace_14B_fp16.safetensors, Wan2.2-VACE-Fun-A14B's expert folders)")
    try:
        dim, in_dim = shape("patch_embedding.weight")[:2]
        ffn_dim = shape("blocks.0.ffn.0.weight")[0]
        out_dim = shape("head.head.weight")[0] // 4
    except KeyError as exc:
        raise CheckpointError(f"{ckpt.source}: WAN DiT key {exc} is missing; the file is incomplete: download it "
                              "again") from None
    layers = len({k.split(".")[1] for k in layout.key_map if k.startswith("blocks.")})
    image = any(k.startswith("img_emb.") for k in layout.key_map)
    end_frame = "img_emb.emb_pos" in layout.key_map  # WAN 2.1 FLF2V: positions of the first + last frame tokens
    vace_blocks = len({k.split(".")[1] for k in layout.key_map if k.startswith("vace_blocks.")})
    vace_in = shape("vace_patch_embedding.weight")[1] if "vace_patch_embedding.weight" in layout.key_map else 0
    signature = (dim, ffn_dim, layers, in_dim, out_dim, image, end_frame, vace_blocks, vace_in)
    found = variants_matching(signature)
    ref_conv = "ref_conv.weight" in layout.key_map  # Fun-Control V1.1 / 2.2 (library/wan/fun.py)
    if ref_conv:
        found = [v for v in found if v.control]
    if task_variant is not None:
        if task_variant.shape_signature() == signature:
            return with_file_features(task_variant, ref_conv, str(ckpt.source))
        what = " or ".join(v.describe() for v in found) or f"an unknown WAN DiT (dim {dim}, {in_dim} input channels)"
        raise CheckpointError(
            f"{ckpt.source}: checkpoint is {what}, but the configured task is {task_variant.describe()}; "
            "set `task` to match the checkpoint, or pass the checkpoint for this task"
        )
    if found:
        return with_file_features(found[0], ref_conv, str(ckpt.source))
    return _custom_variant(ckpt, signature)


def _custom_variant(ckpt: Checkpoint, signature: tuple) -> WanVariant:
    """A DiT whose shapes match no named variant: heads from config.json, else head dim 128."""
    dim, ffn_dim, layers, in_dim, out_dim, image, end_frame, vace_blocks, vace_in = signature
    cfg = _read_config_json(ckpt)
    heads = cfg.get("num_heads") or cfg.get("num_attention_heads")
    if not heads:
        if dim % 128:
            raise CheckpointError(
                f"{ckpt.source}: shapes (dim {dim}, {layers} layers, {in_dim} input channels) match no known "
                "WAN variant and there is no config.json with num_heads beside it"
            )
        heads = dim // 128
    model_type = "i2v" if in_dim == 36 else ("ti2v" if in_dim == 48 else "t2v")
    vace_layers = ()
    if vace_blocks:  # diffusers' config.json names them; else evenly spaced from 0 (ComfyUI's rule)
        model_type = "vace"
        vace_layers = tuple(cfg.get("vace_layers") or range(0, layers, layers // vace_blocks))[:vace_blocks]
    return WanVariant(
        name=f"custom-{model_type}-{dim}x{layers}", version="2.1" if image else "2.2", model_type=model_type,
        dim=dim, ffn_dim=ffn_dim, num_heads=int(heads), num_layers=layers, in_dim=in_dim, out_dim=out_dim,
        vae="2.2" if out_dim == 48 else "2.1", image_embedding=image, end_frame=end_frame, vace_layers=vace_layers,
        vace_in_dim=vace_in,
    )


def dequantize(weight: torch.Tensor, scale: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    """fp8 weight (with an optional per-tensor or per-output-channel scale) -> `dtype`."""
    if scale is None:
        return weight.to(dtype)
    scale = scale.to(device=weight.device, dtype=torch.float32)
    if scale.numel() > 1:
        scale = scale.reshape(-1, *([1] * (weight.dim() - 1)))
    return (weight.to(torch.float32) * scale).to(dtype)

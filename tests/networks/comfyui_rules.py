"""How ComfyUI reads a WAN DiT file, as key and dtype rules of our own (no ComfyUI code is used or needed).

Written from ComfyUI v0.3.64 (tag commit 637221995f7424a561bd825de3e61ea117dfe1e3), read for this purpose:
- `comfy/sd.py` load_diffusion_model_state_dict: the prefix `model_detection.unet_prefix_from_state_dict`
  finds (`model.diffusion_model.`, `model.model.` or `net.`, used when more than 5 keys carry it) is
  stripped; then `model.load_state_dict(sd, strict=False)` (`comfy/model_base.py` load_model_weights)
  logs "unet missing" / "unet unexpected" keys.
- `comfy/model_detection.py` model_config_from_unet: a `scaled_fp8` key is popped; its dtype becomes the
  weight dtype of every Linear (float32 means e4m3fn); two elements turn fp8 optimizations off, any other
  count turns them on.
- `comfy/ops.py` scaled_fp8_ops / pick_operations: each Linear is built with that fp8 dtype for its
  weight and its bias, and gets a `scale_weight` parameter (ones when the file has none); with fp8
  optimizations on it also gets a `scale_input` parameter. The effective weight is
  `weight.float() * scale_weight`.
- `comfy/ldm/wan/model.py` WanModel: the Linear layers are the blocks' `self_attn` / `cross_attn`
  q, k, v, o (plus k_img, v_img for model_type "i2v", which `img_emb.proj.0.bias` selects), `ffn.0`,
  `ffn.2`, and `text_embedding.0/2`, `time_embedding.0/2`, `time_projection.1`, `head.head`,
  `img_emb.proj.1/3`; norms, modulation and the patch embedding are other modules.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch

UNET_PREFIXES = ("model.diffusion_model.", "model.model.", "net.")
_BLOCK_LINEARS = ("self_attn.q", "self_attn.k", "self_attn.v", "self_attn.o", "cross_attn.q", "cross_attn.k",
                  "cross_attn.v", "cross_attn.o", "ffn.0", "ffn.2")
_TOP_LINEARS = ("text_embedding.0", "text_embedding.2", "time_embedding.0", "time_embedding.2",
                "time_projection.1", "head.head")


@dataclass
class ComfyLoad:
    """What ComfyUI would make of a state dict."""

    linears: list[str]
    scaled_fp8: torch.dtype | None = None
    fp8_optimizations: bool = False
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    weights: dict[str, torch.Tensor] = field(default_factory=dict)  # effective fp32 Linear weights and biases


def unet_prefix(keys) -> str:
    counts = {c: 0 for c in UNET_PREFIXES}
    for k in keys:
        for c in UNET_PREFIXES:
            if k.startswith(c):
                counts[c] += 1
                break
    top = max(counts, key=counts.get)
    return top if counts[top] > 5 else ""


def wan_linears(sd: dict) -> list[str]:
    """The Linear module names of ComfyUI's WanModel for this state dict (prefix already stripped)."""
    blocks = sorted({int(m[1]) for k in sd if (m := re.match(r"blocks\.(\d+)\.", k))})
    i2v = "img_emb.proj.0.bias" in sd
    per_block = _BLOCK_LINEARS + (("cross_attn.k_img", "cross_attn.v_img") if i2v else ())
    names = [f"blocks.{b}.{n}" for b in blocks for n in per_block] + list(_TOP_LINEARS)
    return names + (["img_emb.proj.1", "img_emb.proj.3"] if i2v else [])


def load_like_comfyui(state: dict, model_keys: set[str]) -> ComfyLoad:
    """Apply ComfyUI's rules to `state` (a file's tensors). `model_keys`: the parameter names of the
    non-Linear modules plus the Linear weights and biases (official names, e.g. our WanModel's
    state_dict keys); ComfyUI's extra scale parameters are added here."""
    prefix = unet_prefix(state)
    sd = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)} if prefix else dict(state)
    load = ComfyLoad(linears=wan_linears(sd))
    marker = sd.pop("scaled_fp8", None)
    expected = set(model_keys)
    if marker is not None:
        load.scaled_fp8 = torch.float8_e4m3fn if marker.dtype == torch.float32 else marker.dtype
        load.fp8_optimizations = marker.numel() != 2
        for name in load.linears:
            expected.add(f"{name}.scale_weight")
            if load.fp8_optimizations:
                expected.add(f"{name}.scale_input")
    load.missing = sorted(expected - set(sd))
    load.unexpected = sorted(set(sd) - expected)
    for name in load.linears:
        for leaf in ("weight", "bias"):
            value = sd.get(f"{name}.{leaf}")
            if value is None:
                continue
            if load.scaled_fp8 is not None:  # copied into a parameter of the marker's fp8 dtype
                value = value.to(load.scaled_fp8)
            value = value.float()
            if leaf == "weight" and load.scaled_fp8 is not None:
                value = value * sd.get(f"{name}.scale_weight", torch.ones(())).float()
            load.weights[f"{name}.{leaf}"] = value
    return load

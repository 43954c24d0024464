"""Which WAN model a LoRA is for: the Linear shapes of every named variant (built on `meta`), the fit of a
LoRA's modules against them, the variant its metadata names, the facts its shapes tell (dim, ffn, blocks,
k_img), and a DiT checkpoint to compare with (its header, then only the weights the LoRA touches)."""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from library.wan.dit_formats import dequantize
from library.wan.variants import VARIANTS, WanVariant, get_variant
from networks.lora import is_linear
from networks.lora_wan import wan_architecture


def known_variants() -> list[WanVariant]:
    """Every named variant once, in registration order (2.2 first; the tiny test variants last, whose
    shapes no real LoRA has)."""
    return list(dict.fromkeys(VARIANTS.values()))


@functools.lru_cache(maxsize=None)
def variant_linears(name: str) -> dict[str, tuple[int, int]]:
    """{official name: (in, out)} of every Linear of a variant's DiT (built on `meta`: no memory)."""
    from library.wan.vace import build_dit

    with torch.device("meta"):
        model = build_dit(get_variant(name))
    return {n: (m.in_features, m.out_features) for n, m in model.named_modules() if n and is_linear(m)}


def fit(modules: dict, linears: dict[str, tuple[int, int]]) -> tuple[int, list[str], list[str]]:
    """As the sampler's fit check: (modules that fit, 'name (LoRA i -> o, model i -> o)', modules absent)."""
    fitting, mismatched, absent = 0, [], []
    for name, parts in modules.items():
        lora = (parts["down"].shape[-1], parts["up"].shape[0])
        if name not in linears:
            absent.append(name)
        elif lora != linears[name]:
            mismatched.append(f"{name} (LoRA {lora[0]} -> {lora[1]}, model {linears[name][0]} -> {linears[name][1]})")
        else:
            fitting += 1
    return fitting, mismatched, absent


def named_variant(meta: dict[str, str]) -> tuple[str | None, WanVariant | None]:
    """The base model the metadata names (`modelspec.architecture`, `ss_base_model_version`) and its variant."""
    said = None
    for key in ("modelspec.architecture", "ss_base_model_version"):
        text = (meta.get(key) or "").strip().lower().removesuffix("/lora")
        if not text:
            continue
        said = said or text
        exact = [v for v in known_variants() if text in (wan_architecture(v.name, v.version).removesuffix("/lora"),
                                                          f"wan{v.version}_{v.name.lower()}")]
        hits = exact or [v for v in known_variants() if v.name.lower() in text]
        if hits:
            return text, max(hits, key=lambda v: len(v.name))
    return said, None


def shape_facts(modules: dict) -> dict[str, Any]:
    """What a LoRA's shapes tell of its model: dim, ffn dim, blocks, and the 2.1 I2V k_img / v_img."""

    def first(suffixes, pick):
        return next((pick(p) for n, p in modules.items() if n.endswith(suffixes)), None)

    blocks = sorted({int(n.split(".")[1]) for n in modules if n.startswith("blocks.")})
    return {"dim": first(("self_attn.q", "self_attn.k", "self_attn.o", "cross_attn.q", "ffn.0"),
                         lambda p: p["down"].shape[-1]) or first(("ffn.2",), lambda p: p["up"].shape[0]),
            "ffn_dim": first(("ffn.0",), lambda p: p["up"].shape[0])
            or first(("ffn.2",), lambda p: p["down"].shape[-1]),
            "blocks": len(blocks), "last_block": blocks[-1] if blocks else None,
            "k_img": any(n.endswith(("k_img", "v_img")) for n in modules)}


@dataclass
class DitReference:
    """A DiT checkpoint's Linear shapes (from its header) and, on demand, the norms of its weights."""

    path: Path
    variant: str
    linears: dict[str, tuple[int, int]]
    ckpt: Any
    layout: Any
    norms: dict[str, float] = field(default_factory=dict)

    def weight_norm(self, name: str) -> float:
        """||W||_F of one Linear, read (and dequantised) alone, its mapped pages released after."""
        if name not in self.norms:
            key = self.layout.key_map[name + ".weight"]
            scale_key = self.layout.scales.get(name + ".weight")
            weight = dequantize(self.ckpt.read(key), self.ckpt.read(scale_key) if scale_key else None, torch.float32)
            self.norms[name] = float(torch.linalg.vector_norm(weight))
            self.ckpt.release(key)
        return self.norms[name]


def open_dit(path, task: str | None = None) -> DitReference:
    """Header-only: the DiT's layout, variant (checked against `task`) and Linear shapes."""
    from library.wan.loading import open_dit_checkpoint

    ckpt, layout, variant = open_dit_checkpoint(path, task)
    linears = {}
    for name, key in layout.key_map.items():
        shape = ckpt.shape(key)
        if name.endswith(".weight") and len(shape) == 2:
            linears[name[: -len(".weight")]] = (shape[1], shape[0])
    return DitReference(Path(path), variant.name, linears, ckpt, layout)


"""LyCORIS LoHa and LoKr files (as `lycoris.kohya` saves them, and as ComfyUI loads them) read as exact LoRAs.

Key names: a module stem (`lora_unet_blocks_0_self_attn_q`, or ComfyUI's `diffusion_model.blocks.0.self_attn.q`)
plus one of
    LoHa  .hada_w1_a [out, r]  .hada_w1_b [r, in]  .hada_w2_a [out, r]  .hada_w2_b [r, in]   (.alpha)
    LoKr  .lokr_w1 [a_out, a_in] or .lokr_w1_a [a_out, r] + .lokr_w1_b [r, a_in],
          .lokr_w2 [b_out, b_in] or .lokr_w2_a [b_out, r] + .lokr_w2_b [r, b_in]               (.alpha)
The weight delta, by ComfyUI's rules (`comfy/weight_adapter/loha.py`, `lokr.py`):
    LoHa  dW = (w1_a @ w1_b) * (w2_a @ w2_b) * alpha / r          (r = w1_b rows; no alpha: scale 1)
    LoKr  dW = kron(w1, w2) * alpha / r   with w1 = w1_a @ w1_b and w2 = w2_a @ w2_b where decomposed; r = the
          rows of w2_b when w2 is decomposed, else of w1_b; both full (or no alpha): scale 1.
Tucker factors (`hada_t1/t2`, `lokr_t2`) belong to convolutions with a kernel, which WAN's adapted layers are
not; DoRA scales are not read either: both are clear errors.

Both are exactly a LoRA of a higher rank, which is how every LoRA tool here (generation, merging into a DiT
or into one LoRA, resizing, checks) uses them:
    LoHa: (A1 B1) * (A2 B2) = U V with U[i] = kron(A1[i], A2[i]) (rows) and V[:, j] = kron(B1[:, j], B2[:, j]),
          rank r1 * r2;
    LoKr: kron(U1 V1, U2 V2) = kron(U1, U2) kron(V1, V2), rank k1 * k2 (a full factor is itself times I).
"""

from __future__ import annotations

from typing import Callable, Mapping

import torch

from .lora import KOHYA_PREFIX, _MODULE_PREFIXES, kohya_name
from .lora_files import LoraInputError

LOHA_PARTS = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")
LOKR_PARTS = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b")
UNSUPPORTED_PARTS = ("hada_t1", "hada_t2", "lokr_t1", "lokr_t2", "dora_scale")
_ALL = LOHA_PARTS + LOKR_PARTS + UNSUPPORTED_PARTS + ("alpha",)


def is_lycoris(keys) -> bool:
    """True when a file's keys hold LoHa or LoKr tensors."""
    return any(key.rsplit(".", 1)[-1] in LOHA_PARTS + LOKR_PARTS for key in keys)


def group_lycoris(sd: Mapping[str, torch.Tensor], name_map: Callable[[str], str] | None = None,
                  prefix: str = KOHYA_PREFIX) -> tuple[dict[str, dict[str, torch.Tensor]], list[str]]:
    """{Kohya module name: {part: tensor}} and the keys that are no LoHa / LoKr tensor."""
    grouped: dict[str, dict[str, torch.Tensor]] = {}
    unknown: list[str] = []
    for key, tensor in sd.items():
        stem, _, part = key.rpartition(".")
        if part not in _ALL or not stem:
            unknown.append(key)
            continue
        if stem.startswith(prefix):
            name = prefix + stem[len(prefix):].lstrip("_")  # Wan-Fun's `lora_unet__blocks_...` as well
        else:
            module_prefix = next((p for p in _MODULE_PREFIXES if stem.startswith(p)), None)
            if module_prefix is None:
                unknown.append(key)
                continue
            official = stem[len(module_prefix):]
            name = kohya_name(name_map(official) if name_map else official, prefix)
        grouped.setdefault(name, {})[part] = tensor
    return grouped, unknown


def kind_of(parts: Mapping[str, torch.Tensor]) -> str:
    return "loha" if any(p in parts for p in LOHA_PARTS) else "lokr"


def _check(name: str, parts: Mapping[str, torch.Tensor]) -> None:
    extra = [p for p in UNSUPPORTED_PARTS if p in parts]
    if extra:
        raise LoraInputError(f"LyCORIS module {name} has {', '.join(extra)}: Tucker factors (convolutions with a "
                             "kernel) and DoRA scales are not read; WAN's adapted layers are Linear: train without "
                             "use_tucker / dora_wd")
    if kind_of(parts) == "loha":
        missing = [p for p in LOHA_PARTS if p not in parts]
    else:
        missing = [f"lokr_{w} or lokr_{w}_a / _b" for w in ("w1", "w2")
                   if f"lokr_{w}" not in parts and not (f"lokr_{w}_a" in parts and f"lokr_{w}_b" in parts)]
    if missing:
        raise LoraInputError(f"LyCORIS module {name} lacks {', '.join(missing)}; the file is incomplete: save it again")


def _factor(parts, w: str) -> tuple[torch.Tensor, torch.Tensor, int | None]:
    """(U, V, rank of the decomposition or None) with lokr_<w> = U @ V (a full factor: itself and I)."""
    if f"lokr_{w}" in parts:
        full = parts[f"lokr_{w}"].float()
        if full.dim() != 2:
            raise LoraInputError(f"lokr_{w} has shape {list(full.shape)}; only Linear (2-D) factors are read")
        if full.shape[0] <= full.shape[1]:
            return torch.eye(full.shape[0]), full, None
        return full, torch.eye(full.shape[1]), None
    a, b = parts[f"lokr_{w}_a"].float(), parts[f"lokr_{w}_b"].float()
    return a, b, b.shape[0]


def scale_of(parts: Mapping[str, torch.Tensor]) -> float:
    """alpha / rank as ComfyUI applies it (1 without alpha, and for a LoKr with two full factors)."""
    if kind_of(parts) == "loha":
        rank = parts["hada_w1_b"].shape[0]
    elif "lokr_w2_b" in parts:
        rank = parts["lokr_w2_b"].shape[0]
    elif "lokr_w1_b" in parts:
        rank = parts["lokr_w1_b"].shape[0]
    else:
        rank = None
    return float(parts["alpha"]) / rank if "alpha" in parts and rank else 1.0


def as_lora(name: str, parts: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """One LoHa / LoKr module as the exact LoRA {"down" [R, in], "up" [out, R], "alpha" = R} (scale folded
    into `up`), fp32."""
    _check(name, parts)
    scale = scale_of(parts)
    if kind_of(parts) == "loha":
        a1, b1 = parts["hada_w1_a"].float(), parts["hada_w1_b"].float()
        a2, b2 = parts["hada_w2_a"].float(), parts["hada_w2_b"].float()
        up = (a1[:, :, None] * a2[:, None, :]).flatten(1)  # [out, r1 * r2]
        down = (b1[:, None, :] * b2[None, :, :]).flatten(0, 1)  # [r1 * r2, in]
    else:
        u1, v1, _ = _factor(parts, "w1")
        u2, v2, _ = _factor(parts, "w2")
        up, down = torch.kron(u1, u2), torch.kron(v1, v2)
    return {"down": down.contiguous(), "up": (up * scale).contiguous(), "alpha": torch.tensor(float(down.shape[0]))}


def delta_weight(name: str, parts: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """The full weight delta [out, in] of one module at strength 1, computed directly (fp32)."""
    _check(name, parts)
    if kind_of(parts) == "loha":
        m1 = parts["hada_w1_a"].float() @ parts["hada_w1_b"].float()
        m2 = parts["hada_w2_a"].float() @ parts["hada_w2_b"].float()
        return m1 * m2 * scale_of(parts)
    w = [u @ v for u, v, _ in (_factor(parts, "w1"), _factor(parts, "w2"))]
    return torch.kron(w[0], w[1]) * scale_of(parts)


def lycoris_as_lora_state(sd: Mapping[str, torch.Tensor], name_map=None) -> tuple[dict[str, torch.Tensor], list[str]]:
    """A LyCORIS state dict -> the equivalent LoRA state dict under Kohya keys, and the keys it could not use."""
    grouped, unknown = group_lycoris(sd, name_map)
    out = {}
    for name, parts in grouped.items():
        lora = as_lora(name, parts)
        out |= {f"{name}.lora_down.weight": lora["down"], f"{name}.lora_up.weight": lora["up"],
                f"{name}.alpha": lora["alpha"]}
    return out, unknown


def lycoris_keys(modules: Mapping[str, Mapping[str, torch.Tensor]], fmt: str) -> dict[str, torch.Tensor]:
    """{official module name: LyCORIS parts} under Kohya (`lora_unet_...`) or ComfyUI (`diffusion_model.<name>`)
    stems; the part names (hada_* / lokr_* / alpha) are the ones both LyCORIS and ComfyUI use."""
    if fmt not in ("kohya", "comfyui"):
        raise LoraInputError(f"LyCORIS LoHa / LoKr files have no {fmt} key format; convert to kohya or comfyui "
                             "(ComfyUI loads both), or merge the network into a LoRA first (tools/merge_lora.py "
                             "--merge_into_lora, exact)")
    out = {}
    for name, parts in sorted(modules.items()):
        stem = KOHYA_PREFIX + name.replace(".", "_") if fmt == "kohya" else f"diffusion_model.{name}"
        out |= {f"{stem}.{part}": tensor.contiguous() for part, tensor in parts.items()}
    return out

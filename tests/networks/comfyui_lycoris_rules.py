"""How ComfyUI applies a LyCORIS LoHa / LoKr file to a WAN DiT, as rules of our own (no ComfyUI code is used).

Written from Comfy-Org/ComfyUI (`comfy/lora.py` model_lora_keys_unet and load_lora, `comfy/weight_adapter/
loha.py` and `lokr.py` load / calculate_weight), read for this purpose:
- key map: for every model weight `diffusion_model.<name>.weight`, the LoRA stems `lora_unet_<name with dots
  as underscores>` and `diffusion_model.<name>` both name it;
- per stem: `<stem>.alpha` (optional, a number), then the first adapter whose keys are present: LoHa
  (`hada_w1_a`, `hada_w1_b`, `hada_w2_a`, `hada_w2_b`), LoKr (any of `lokr_w1`, `lokr_w2`, `lokr_w1_a`, `lokr_w2_a`);
- LoHa: delta = (w1_a @ w1_b) * (w2_a @ w2_b), times alpha / w1_b.shape[0] when alpha is given (else 1);
- LoKr: w1 = lokr_w1 or w1_a @ w1_b, w2 = lokr_w2 or w2_a @ w2_b; dim = w1_b.shape[0] if w1 is decomposed,
  then w2_b.shape[0] if w2 is; delta = kron(w1, w2), times alpha / dim when alpha and dim are both set (else 1);
- the weight becomes weight + strength * scale * delta (reshaped to the weight's shape); keys no adapter
  used are reported as "lora key not loaded".
"""

from __future__ import annotations

import torch


def key_map(weight_names) -> dict[str, str]:
    """LoRA stem -> official weight name (without `diffusion_model.`)."""
    out = {}
    for name in weight_names:
        if name.endswith(".weight"):
            module = name[: -len(".weight")]
            out["lora_unet_" + module.replace(".", "_")] = name
            out["diffusion_model." + module] = name
    return out


def _loha(lora, x, alpha):
    w1a, w1b = lora[f"{x}.hada_w1_a"], lora[f"{x}.hada_w1_b"]
    scale = alpha / w1b.shape[0] if alpha is not None else 1.0
    return (w1a.float() @ w1b.float()) * (lora[f"{x}.hada_w2_a"].float() @ lora[f"{x}.hada_w2_b"].float()), scale


def _lokr(lora, x, alpha):
    dim = None
    w1 = lora.get(f"{x}.lokr_w1")
    if w1 is None:
        dim = lora[f"{x}.lokr_w1_b"].shape[0]
        w1 = lora[f"{x}.lokr_w1_a"].float() @ lora[f"{x}.lokr_w1_b"].float()
    w2 = lora.get(f"{x}.lokr_w2")
    if w2 is None:
        dim = lora[f"{x}.lokr_w2_b"].shape[0]
        w2 = lora[f"{x}.lokr_w2_a"].float() @ lora[f"{x}.lokr_w2_b"].float()
    scale = alpha / dim if alpha is not None and dim is not None else 1.0
    return torch.kron(w1.float(), w2.float()), scale


def apply_like_comfyui(lora: dict, weights: dict[str, torch.Tensor], strength: float = 1.0):
    """(patched weights {official name: tensor}, keys ComfyUI would report as not loaded)."""
    loaded, patched = set(), {}
    for stem, name in key_map(weights).items():
        alpha = lora[f"{stem}.alpha"].item() if f"{stem}.alpha" in lora else None
        if f"{stem}.hada_w1_a" in lora:
            delta, scale = _loha(lora, stem, alpha)
            used = [f"{stem}.hada_{p}" for p in ("w1_a", "w1_b", "w2_a", "w2_b")]
        elif any(f"{stem}.lokr_{p}" in lora for p in ("w1", "w2", "w1_a", "w2_a")):
            delta, scale = _lokr(lora, stem, alpha)
            used = [f"{stem}.lokr_{p}" for p in ("w1", "w2", "w1_a", "w1_b", "w2_a", "w2_b")
                    if f"{stem}.lokr_{p}" in lora]
        else:
            continue
        loaded.update(used + ([f"{stem}.alpha"] if alpha is not None else []))
        patched[name] = weights[name].float() + strength * scale * delta.reshape(weights[name].shape)
    return patched, sorted(set(lora) - loaded)

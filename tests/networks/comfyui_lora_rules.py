"""How ComfyUI finds the weights a LoRA file patches, as rules of our own (no ComfyUI code is used or needed).

Written from ComfyUI's `comfy/lora.py` (v0.3.x), read for this purpose:
- `model_lora_keys_unet` maps, for every model weight `diffusion_model.NAME.weight` (the WAN models, VACE
  included: `WAN21_Vace` holds the VACE blocks in the same state dict, `vace_blocks.N....`), the LoRA names
  `lora_unet_<NAME with dots as underscores>` and `diffusion_model.NAME` (the generic format) to that weight.
- `load_lora` (and `weight_adapter.LoRAAdapter.load`) takes, for each such name x, the pair
  `x.lora_up.weight` / `x.lora_down.weight`, `x.lora_B.weight` / `x.lora_A.weight` (or the `_lora.up`,
  `.lora.up`, `.lora_linear_layer.up` spellings) and `x.alpha`; a file key no name consumes is logged as
  "lora key not loaded" and ignored.
"""

from __future__ import annotations

_PAIRS = ((".lora_up.weight", ".lora_down.weight"), (".lora_B.weight", ".lora_A.weight"),
          ("_lora.up.weight", "_lora.down.weight"), (".lora.up.weight", ".lora.down.weight"),
          (".lora_linear_layer.up.weight", ".lora_linear_layer.down.weight"))


def comfyui_lora_key_map(model_keys) -> dict[str, str]:
    """LoRA module name -> model weight key, for model keys with ComfyUI's `diffusion_model.` prefix."""
    key_map = {}
    for key in model_keys:
        if key.startswith("diffusion_model.") and key.endswith(".weight"):
            name = key[len("diffusion_model."):-len(".weight")]
            key_map["lora_unet_" + name.replace(".", "_")] = key
            key_map[key[:-len(".weight")]] = key
    return key_map


def comfyui_lora_targets(lora_sd: dict, model_keys) -> dict[str, str]:
    """{LoRA module name in the file: model weight it patches}; an AssertionError lists the file keys
    ComfyUI would leave unloaded."""
    loaded, targets = set(), {}
    for name, key in comfyui_lora_key_map(model_keys).items():
        for up, down in _PAIRS:
            if name + up in lora_sd and name + down in lora_sd:
                targets[name] = key
                loaded |= {name + up, name + down}
                if name + ".alpha" in lora_sd:
                    loaded.add(name + ".alpha")
                break
    unloaded = sorted(set(lora_sd) - loaded)
    assert not unloaded, f"ComfyUI would not load {len(unloaded)} LoRA keys, e.g. {unloaded[:3]}"
    return targets

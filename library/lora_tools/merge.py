"""Merging LoRAs into a WAN DiT checkpoint: a new full model file.

Every LoRA (any key format, each with its strength) is read and checked against the DiT's tensor shapes
first, then the new file is written one tensor at a time (`write_safetensors` with `LazyTensor`s): read a
weight (dequantising fp8 / fp8_scaled), add `strength * up @ down * alpha / rank` of every LoRA touching it
in fp32, cast, write, drop. Peak memory is about one layer, never the model. The output keeps the input's
key layout (official names, the ComfyUI `model.diffusion_model.` prefix or diffusers names); `fp8_scaled`
writes the block Linear weights as e4m3 with a per-tensor fp32 `scale_weight` beside each, the way
`library.wan.loading` and ComfyUI read them. Reading the LoRAs and their experts is `networks.merge`.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

from library.wan.checkpoint_files import LazyTensor, write_safetensors
from library.wan.dit_formats import FP8_DTYPES, dequantize
from library.wan.fp8 import DEFAULT_EXCLUDE, quantize_weight
from library.wan.loading import open_dit_checkpoint
from networks.lora_wan import wan_architecture
from networks.merge import LoraInput, MergeReport, expert_from_name, expert_warnings, read_loras
from networks.resize import module_scale

logger = logging.getLogger(__name__)

DIT_PRECISIONS = ("bf16", "fp16", "fp32", "fp8_scaled")
_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def _contributions(loras: list[LoraInput], ckpt, layout, variant) -> dict[str, list]:
    """Official weight name -> [(up, down, strength * scale), ...]; every module checked against the DiT."""
    per_weight: dict[str, list] = {}
    blocks = len({k.split(".")[1] for k in layout.key_map if k.startswith("blocks.")})
    for lora in loras:
        problems = []
        for name, parts in lora.modules.items():
            key = name + ".weight"
            shape = (parts["up"].shape[0], parts["down"].shape[1])
            if key not in layout.key_map:
                problems.append(f"module {name} matches no weight of the DiT ({variant.name}, {blocks} blocks)")
            elif tuple(ckpt.shape(layout.key_map[key])) != shape:
                problems.append(f"module {name} is {list(shape)} but the DiT weight {key} is "
                                f"{list(ckpt.shape(layout.key_map[key]))}")
            else:
                per_weight.setdefault(key, []).append((parts["up"], parts["down"], lora.strength * module_scale(parts)))
        if problems:
            arch = lora.metadata.get("modelspec.architecture")
            raise ValueError(
                f"{lora.path}: {len(problems)} of {len(lora.modules)} LoRA modules do not fit the DiT "
                f"{variant.describe()} (e.g. {'; '.join(problems[:3])}); this LoRA was made for another model"
                f"{f' ({arch})' if arch else ''}, e.g. a 14B LoRA onto the 5B model: use a LoRA trained for "
                f"{variant.name}")
    return per_weight


def _architecture_warnings(loras: list[LoraInput], variant) -> list[str]:
    mine, warnings = wan_architecture(variant.name, variant.version), []
    for lora in loras:
        arch = lora.metadata.get("modelspec.architecture", "")
        if arch.startswith("wan") and "-" in arch and arch.lower() != mine:  # ours; musubi's `wan2.1/lora` is vague
            warnings.append(f"{lora.path.name} says it is for {arch}, the DiT is {mine}")
            logger.warning(warnings[-1])
    return warnings


def read_dit_weight(ckpt, layout, name: str, device="cpu") -> torch.Tensor:
    """One DiT tensor by official name, dequantised if fp8, as fp32 on `device` (mapped pages released)."""
    file_key = layout.key_map[name]
    source = ckpt.read(file_key)
    if source.dtype in FP8_DTYPES:
        scale_key = layout.scales.get(name)
        tensor = dequantize(source.to(device), ckpt.read(scale_key) if scale_key else None, torch.float32)
    else:
        tensor = source.to(device=device, dtype=torch.float32)
    if tensor.data_ptr() != source.data_ptr():
        ckpt.release(file_key)
    return tensor


def _quantised(name: str, shape: tuple) -> bool:
    """fp8_scaled stores the Linear weights inside the blocks, as the fp8 loader does."""
    return (name.startswith("blocks.") and name.endswith(".weight") and len(shape) == 2
            and not any(part in name for part in DEFAULT_EXCLUDE))


def _dit_tensors(ckpt, layout, per_weight: dict, precision: str, device) -> dict:
    """Output key -> LazyTensor, in the input's order and key layout."""
    file_to_official = {file_key: name for name, file_key in layout.key_map.items()}
    fp8 = precision == "fp8_scaled"
    out, scales = {}, {}

    def make(name: str, file_key: str, dtype: torch.dtype, quantise: bool):
        def build() -> torch.Tensor:
            if not ckpt.dtype(file_key).is_floating_point:
                return ckpt.read(file_key)
            weight = read_dit_weight(ckpt, layout, name, device)  # fp32
            for up, down, scale in per_weight.get(name, ()):  # out of place: `weight` may view the mapped file
                weight = torch.addmm(weight, up.to(device, torch.float32), down.to(device, torch.float32), alpha=scale)
            if quantise:
                weight, scales[file_key] = quantize_weight(weight, scaled=True)
                return weight
            return weight.to(dtype)
        return build

    for file_key in ckpt.keys():
        name = file_to_official.get(file_key)
        if name is None:  # input fp8 scales and quantisation extras: rewritten below if fp8_scaled
            continue
        shape, dtype = tuple(ckpt.shape(file_key)), ckpt.dtype(file_key)
        quantise = fp8 and _quantised(name, shape)
        if dtype.is_floating_point:
            dtype = torch.float8_e4m3fn if quantise else _DTYPES["bf16" if fp8 else precision]
        out[file_key] = LazyTensor(shape, dtype, make(name, file_key, dtype, quantise))
        if quantise:
            scale_key = file_key[: -len("weight")] + "scale_weight"
            out[scale_key] = LazyTensor((), torch.float32, lambda k=file_key: scales.pop(k).reshape(()).cpu())
    if fp8:  # ComfyUI's marker of a scaled-fp8 model (its dtype names the fp8 format)
        out[layout.prefix + "scaled_fp8"] = torch.empty(0, dtype=torch.float8_e4m3fn)
    return out


def merge_into_dit(dit, loras, output, save_precision: str = "bf16", device="cpu", expert: str | None = None,
                   task: str | None = None) -> MergeReport:
    """Merge [(lora path, strength), ...] into the DiT at `dit` (file or sharded folder, any layout) and
    write `output` (one safetensors file, the input's key layout). `expert` (default: from the DiT's
    path) is checked against each LoRA's expert; a mismatch is a warning."""
    if save_precision not in DIT_PRECISIONS:
        raise ValueError(f"unknown save_precision {save_precision!r}; choose one of {', '.join(DIT_PRECISIONS)}")
    inputs = read_loras(loras)
    ckpt, layout, variant = open_dit_checkpoint(dit, task)
    if any(Path(output).resolve() == f.path.resolve() for f in ckpt.files):
        raise ValueError(f"{output}: is the base DiT itself; write the merged model to a new file")
    per_weight = _contributions(inputs, ckpt, layout, variant)
    expert = expert or expert_from_name(dit)
    report = MergeReport(Path(output), sum(len(v) for v in per_weight.values()))
    report.warnings += expert_warnings(inputs, expert, f"the DiT {Path(dit).name}")
    report.warnings += _architecture_warnings(inputs, variant)
    meta = dict(ckpt.metadata)
    meta.update({"ss_merged_loras": json.dumps([lo.record() for lo in inputs]),
                 "ss_merge_base": Path(str(ckpt.source)).name, "ss_save_precision": save_precision,
                 "ss_base_model_version": f"wan{variant.version}_{variant.name}"})
    if expert:
        meta["ss_expert"] = expert
    tensors = _dit_tensors(ckpt, layout, per_weight, save_precision, torch.device(device))
    write_safetensors(output, tensors, meta)
    logger.info("merged %d LoRA module deltas from %d files into %s", report.merged_modules, len(inputs), output)
    return report

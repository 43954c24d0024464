"""Merging LoRAs into a WAN DiT checkpoint: a new full model file.

Every LoRA (any key format, each with its strength) is read and checked against the DiT's tensor shapes
first, then the new file is written one tensor at a time (`write_safetensors` with `LazyTensor`s): read a
weight (dequantising fp8 / fp8_scaled), add `strength * up @ down * alpha / rank` of every LoRA touching it
in fp32, cast, write, drop. Peak memory is about one layer, never the model. The output keeps the input's
key layout (official names, the ComfyUI `model.diffusion_model.` prefix or diffusers names).

`fp8_scaled` writes ComfyUI's scaled-fp8 format (read in ComfyUI v0.3.64, commit 6372219:
`comfy/model_detection.py` model_config_from_unet, `comfy/ops.py` scaled_fp8_ops, `comfy/model_base.py`):
ComfyUI builds every Linear of its WanModel with the fp8 dtype the `scaled_fp8` marker names, so every
Linear weight is stored as e4m3 with a per-tensor fp32 `scale_weight` beside it: the blocks' attention and
FFN layers, and also `text_embedding.0/2`, `time_embedding.0/2`, `time_projection.1`, `head.head` and (2.1
I2V) `img_emb.proj.1/3` (`COMFY_FP8_LINEARS`). A Linear without its scale would be rounded to fp8 unscaled
(small weights become zero). The marker is a two-element e4m3 tensor: ComfyUI reads any other element
count as "fp8 matrix multiplication with input scales" and then expects a `scale_input` on every Linear.
Everything else (norms, modulation, the patch embedding, biases) is bf16. A diffusers-named input is
written in official names here, since ComfyUI reads scaled fp8 only under those.
Reading the LoRAs and their experts is `networks.merge`.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import torch

from library.wan.checkpoint_files import LazyTensor, write_safetensors
from library.wan.dit_formats import FP8_DTYPES, dequantize
from library.wan.fp8 import quantize_weight
from library.wan.loading import open_dit_checkpoint
from networks.lora_files import LoraInputError
from networks.lora_wan import wan_architecture
from networks.merge import LoraInput, MergeReport, expert_from_name, expert_warnings, read_loras
from networks.resize import module_scale

logger = logging.getLogger(__name__)

DIT_PRECISIONS = ("bf16", "fp16", "fp32", "fp8_scaled")
_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
# The Linear layers ComfyUI's WanModel builds with its (fp8-overridden) `operations.Linear` (comfy/ldm/wan/
# model.py at v0.3.64): each weight is quantised with its own scale in an fp8_scaled file.
COMFY_FP8_LINEARS = re.compile(
    r"^(blocks\.\d+\.(self_attn|cross_attn)\.(q|k|v|o|k_img|v_img)|blocks\.\d+\.ffn\.(0|2)|text_embedding\.(0|2)"
    r"|time_embedding\.(0|2)|time_projection\.1|head\.head|img_emb\.proj\.(1|3))\.weight$")
SCALED_FP8_MARKER = "scaled_fp8"  # its dtype names the fp8 format; two elements: no input scales


def _allowed(name: str, include: str | None, exclude: str | None) -> bool:
    """musubi-tuner's include / exclude regexes, searched in the Kohya module name (include first)."""
    kohya = "lora_unet_" + name.replace(".", "_")
    return (include is None or re.search(include, kohya) is not None) and (
        exclude is None or re.search(exclude, kohya) is None)


def _contributions(loras: list[LoraInput], ckpt, layout, variant, patterns=None) -> dict[str, list]:
    """Official weight name -> [(up, down, strength * scale), ...]; every module checked against the DiT.
    `patterns`: one (include, exclude) regex pair per LoRA, or None."""
    per_weight: dict[str, list] = {}
    blocks = len({k.split(".")[1] for k in layout.key_map if k.startswith("blocks.")})
    for i, lora in enumerate(loras):
        include, exclude = patterns[i] if patterns else (None, None)
        problems = []
        for name, parts in lora.modules.items():
            if not _allowed(name, include, exclude):
                continue
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
            raise LoraInputError(
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
    """fp8_scaled stores every Linear weight ComfyUI's WanModel quantises (`COMFY_FP8_LINEARS`)."""
    return len(shape) == 2 and COMFY_FP8_LINEARS.match(name) is not None


def scaled_fp8_marker() -> torch.Tensor:
    """ComfyUI's marker of a scaled-fp8 model: two e4m3 elements (fp8 weights, no input scales)."""
    return torch.zeros(2, dtype=torch.float8_e4m3fn)


def _dit_tensors(ckpt, layout, per_weight: dict, precision: str, device) -> dict:
    """Output key -> LazyTensor, in the input's order and key layout."""
    file_to_official = {file_key: name for name, file_key in layout.key_map.items()}
    fp8 = precision == "fp8_scaled"
    out, scales = {}, {}
    # fp8_scaled is ComfyUI's format, read under official names only: diffusers names are written as official
    official_out = fp8 and layout.diffusers
    prefix = "" if official_out else layout.prefix
    out_key = (lambda file_key: file_to_official[file_key]) if official_out else str

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
        out[out_key(file_key)] = LazyTensor(shape, dtype, make(name, file_key, dtype, quantise))
        if quantise:
            scale_key = out_key(file_key)[: -len("weight")] + "scale_weight"
            out[scale_key] = LazyTensor((), torch.float32, lambda k=file_key: scales.pop(k).reshape(()).cpu())
    if fp8:
        if layout.diffusers:
            logger.info("fp8_scaled: the diffusers-named DiT is written in official (ComfyUI) names")
        out[prefix + SCALED_FP8_MARKER] = scaled_fp8_marker()
    return out


def merge_into_dit(dit, loras, output, save_precision: str = "bf16", device="cpu", expert: str | None = None,
                   task: str | None = None, patterns: list[tuple[str | None, str | None]] | None = None) -> MergeReport:
    """Merge [(lora path, strength), ...] into the DiT at `dit` (file or sharded folder, any layout) and
    write `output` (one safetensors file, the input's key layout). `expert` (default: from the DiT's
    path) is checked against each LoRA's expert; a mismatch is a warning. `patterns`: an (include,
    exclude) regex pair per LoRA selecting its modules by Kohya name."""
    if save_precision not in DIT_PRECISIONS:
        raise LoraInputError(f"unknown save_precision {save_precision!r}; choose one of {', '.join(DIT_PRECISIONS)}")
    inputs = read_loras(loras)
    ckpt, layout, variant = open_dit_checkpoint(dit, task)
    if any(Path(output).resolve() == f.path.resolve() for f in ckpt.files):
        raise LoraInputError(f"{output}: is the base DiT itself; write the merged model to a new file")
    per_weight = _contributions(inputs, ckpt, layout, variant, patterns)
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

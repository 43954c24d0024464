"""Merging LoRAs: into a WAN DiT checkpoint (a new full model file), or into one LoRA file.

Into a DiT: every LoRA (any key format, each with its strength) is read and checked against the DiT's
tensor shapes first, then the new file is written one tensor at a time (`write_safetensors` with
`LazyTensor`s): read a weight (dequantising fp8 / fp8_scaled), add `strength * up @ down * alpha / rank`
of every LoRA touching it in fp32, cast, write, drop. Peak memory is about one layer, never the model.
The output keeps the input's key layout (official names, the ComfyUI `model.diffusion_model.` prefix or
diffusers names); `fp8_scaled` writes the block Linear weights as e4m3 with a per-tensor fp32
`scale_weight` beside each, the way `library.wan.loading` and ComfyUI read them.

Into one LoRA: the ranks are concatenated (down stacked, up side by side, each part scaled by
sqrt(|strength * alpha / rank|)), so the merged delta is exactly the sum; `new_rank` / a dynamic method
then SVD-reduces it (`networks.resize`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .convert import read_modules
from .lora_wan import wan_architecture
from .resize import Modules, ModuleRank, module_scale, rank_metadata, resize_modules, save_lora_modules

logger = logging.getLogger(__name__)

EXPERTS = ("high_noise", "low_noise")
DIT_PRECISIONS = ("bf16", "fp16", "fp32", "fp8_scaled")
_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


@dataclass
class LoraInput:
    """One LoRA file as read for merging."""

    path: Path
    strength: float
    modules: Modules
    metadata: dict
    sha256: str

    @property
    def expert(self) -> str | None:
        """The WAN 2.2 A14B expert the file is for: `ss_expert` metadata, else the file name's suffix."""
        return self.metadata.get("ss_expert") or expert_from_name(self.path.name)

    def record(self) -> dict:
        return {"file": self.path.name, "strength": self.strength, "sha256": self.sha256,
                "sshs_model_hash": self.metadata.get("sshs_model_hash", "")}


@dataclass
class MergeReport:
    output: Path
    merged_modules: int = 0  # module deltas added (a module of two LoRAs counts twice)
    warnings: list[str] = field(default_factory=list)
    ranks: list[ModuleRank] = field(default_factory=list)  # merge into a LoRA with new_rank / dynamic


def expert_from_name(path) -> str | None:
    """`..._high_noise...` / `..._low_noise...` in a file's name (else its folder's, as the official
    `high_noise_model/`) -> the expert, or None."""
    path = Path(path)
    for name in (path.name, path.parent.name):
        found = [e for e in EXPERTS if e in name.lower().replace("-", "_")]
        if len(found) == 1:
            return found[0]
    return None


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def read_loras(loras) -> list[LoraInput]:
    """[(path, strength), ...] -> LoraInput records; missing or unreadable files are clear errors."""
    out = []
    for path, strength in loras:
        path = Path(path).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"{path}: LoRA file not found")
        try:
            modules, meta = read_modules(path)
        except ValueError as exc:
            raise ValueError(str(exc) if str(path) in str(exc) else f"{path}: {exc}") from None
        if not modules:
            raise ValueError(f"{path}: holds no LoRA modules")
        out.append(LoraInput(path, float(strength), modules, meta, _sha256(path)))
    if not out:
        raise ValueError("no LoRA files given")
    return out


def _expert_warnings(loras: list[LoraInput], target: str | None, what: str) -> list[str]:
    warnings = []
    for lora in loras:
        if target and lora.expert and lora.expert != target:
            warnings.append(f"{lora.path.name} is a {lora.expert} expert LoRA but {what} is the {target} expert; "
                            "WAN 2.2 A14B LoRAs belong on their own expert (check --expert and the file order)")
    for w in warnings:
        logger.warning(w)
    return warnings


# ---- merging into a DiT -----------------------------------------------------------------------------------


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
    from library.wan.dit_formats import FP8_DTYPES, dequantize

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
    from library.wan.fp8 import DEFAULT_EXCLUDE

    return (name.startswith("blocks.") and name.endswith(".weight") and len(shape) == 2
            and not any(part in name for part in DEFAULT_EXCLUDE))


def _dit_tensors(ckpt, layout, per_weight: dict, precision: str, device) -> dict:
    """Output key -> LazyTensor, in the input's order and key layout."""
    from library.wan.checkpoint_files import LazyTensor
    from library.wan.fp8 import quantize_weight

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
    from library.wan.checkpoint_files import write_safetensors
    from library.wan.loading import open_dit_checkpoint

    if save_precision not in DIT_PRECISIONS:
        raise ValueError(f"unknown save_precision {save_precision!r}; choose one of {', '.join(DIT_PRECISIONS)}")
    inputs = read_loras(loras)
    ckpt, layout, variant = open_dit_checkpoint(dit, task)
    if any(Path(output).resolve() == f.path.resolve() for f in ckpt.files):
        raise ValueError(f"{output}: is the base DiT itself; write the merged model to a new file")
    per_weight = _contributions(inputs, ckpt, layout, variant)
    expert = expert or expert_from_name(dit)
    report = MergeReport(Path(output), sum(len(v) for v in per_weight.values()))
    report.warnings += _expert_warnings(inputs, expert, f"the DiT {Path(dit).name}")
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


# ---- merging into one LoRA ----------------------------------------------------------------------------------


def concat_modules(inputs: list[LoraInput]) -> Modules:
    """One module per name whose delta is exactly sum_i strength_i * delta_i (ranks concatenated)."""
    grouped: dict[str, list] = {}
    for lora in inputs:
        for name, parts in lora.modules.items():
            grouped.setdefault(name, []).append((lora, parts))
    out = {}
    for name, items in grouped.items():
        shapes = {(p["up"].shape[0], p["down"].shape[1]) for _, p in items}
        if len(shapes) > 1:
            seen = ", ".join(f"{lo.path.name} {[p['up'].shape[0], p['down'].shape[1]]}" for lo, p in items)
            raise ValueError(f"module {name} has different shapes in the LoRAs ({seen}): they are for different "
                             "models and cannot be merged")
        downs, ups = [], []
        for lora, parts in items:
            scale = lora.strength * module_scale(parts)
            root = math.sqrt(abs(scale))
            downs.append(parts["down"].float() * root)
            ups.append(parts["up"].float() * (root if scale >= 0 else -root))
        down, up = torch.cat(downs, 0), torch.cat(ups, 1)  # [R, in], [out, R]
        out[name] = {"down": down, "up": up, "alpha": torch.tensor(float(down.shape[0]))}
    return out


def _lora_metadata(inputs: list[LoraInput], modules: Modules, fmt: str, warnings: list[str]) -> dict:
    first = inputs[0].metadata
    meta = {k: v for k, v in first.items() if k.startswith("modelspec.")}
    for key in ("ss_network_module", "ss_base_model_version"):
        if key in first:
            meta[key] = first[key]
    archs = {lo.metadata.get("modelspec.architecture") for lo in inputs} - {None}
    if len(archs) > 1:
        warnings.append(f"the LoRAs name different models ({', '.join(sorted(archs))})")
        logger.warning(warnings[-1])
    experts = {lo.expert for lo in inputs}
    if len(experts) == 1 and None not in experts:
        meta["ss_expert"] = experts.pop()
    elif len(experts - {None}) > 1:
        warnings.append("merging LoRAs of different WAN 2.2 A14B experts (high_noise and low_noise) into one file")
        logger.warning(warnings[-1])
    meta.update(rank_metadata(modules))
    meta.update({"ss_merged_loras": json.dumps([lo.record() for lo in inputs]), "ss_lora_format": fmt})
    return meta


def merge_lora_files(loras, output, new_rank: int | None = None, dynamic_method: str | None = None,
                     dynamic_param: float | None = None, fmt: str = "kohya", dtype: torch.dtype | None = None,
                     device="cpu") -> MergeReport:
    """Merge [(lora path, strength), ...] into one LoRA file: exact (ranks concatenated), or SVD-reduced
    when `new_rank` or a dynamic method is given. Tensors are written in `dtype` (default fp32)."""
    inputs = read_loras(loras)
    report = MergeReport(Path(output), sum(len(lo.modules) for lo in inputs))
    modules = concat_modules(inputs)
    if new_rank is not None or dynamic_method is not None:
        modules, report.ranks = resize_modules(modules, new_rank, dynamic_method, dynamic_param, device=device)
    meta = _lora_metadata(inputs, modules, fmt, report.warnings)
    save_lora_modules(modules, output, fmt, meta, dtype or torch.float32)
    return report

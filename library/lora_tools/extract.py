"""Extracting a LoRA from a fine-tuned WAN DiT and its base: the truncated SVD of each weight difference.

For every LoRA target Linear (`networks.extract.is_lora_target`) the pair (tuned, base) is read one
weight at a time, in any layout either file has (official, ComfyUI prefix, diffusers, fp8, fp8_scaled,
sharded), and `tuned - base` ([out, in], fp32) is factored by `networks.extract.lora_from_difference`
(SVD to `dim` or a dynamic rank, balanced factors, Kohya's quantile clamp). Differences below `min_diff`
relative to the base weight's norm are skipped and counted; tensors a LoRA cannot hold (norms,
modulation, embeddings) that differ are reported.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch

from library.wan.loading import open_dit_checkpoint
from networks.extract import is_lora_target, lora_from_difference
from networks.lora_files import LoraInputError
from networks.lora_wan import build_lora_metadata
from networks.merge import EXPERTS
from networks.resize import ModuleRank, check_dynamic, rank_metadata, save_lora_modules

from .merge import read_dit_weight

logger = logging.getLogger(__name__)


@dataclass
class ExtractReport:
    output: Path
    variant: str
    ranks: list[ModuleRank] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)  # targets whose difference is ~0
    other_changed: list[str] = field(default_factory=list)  # changed tensors a LoRA cannot carry


def _open_pair(base, tuned, task):
    b_ckpt, b_layout, b_variant = open_dit_checkpoint(base, task)
    t_ckpt, t_layout, t_variant = open_dit_checkpoint(tuned, task)
    if b_variant.shape_signature() != t_variant.shape_signature():
        raise LoraInputError(f"the base {base} is {b_variant.describe()} but the tuned model {tuned} is "
                             f"{t_variant.describe()}: extract from a fine-tune and the base it was trained from")
    if set(b_layout.key_map) != set(t_layout.key_map):
        odd = sorted(set(b_layout.key_map) ^ set(t_layout.key_map))
        raise LoraInputError(f"{base} and {tuned} hold different tensors (e.g. {', '.join(odd[:3])})")
    return (b_ckpt, b_layout), (t_ckpt, t_layout), t_variant


def _relative(diff: torch.Tensor, base: torch.Tensor) -> float:
    norm = float(base.norm())
    return float(diff.norm()) / (norm if norm > 0 else 1.0)


def extract_lora(base, tuned, output, dim: int = 32, dynamic_method: str | None = None,
                 dynamic_param: float | None = None, clamp_quantile: float = 0.99, min_diff: float = 1e-6,
                 device="cpu", fmt: str = "kohya", expert: str | None = None, task: str | None = None,
                 dtype: torch.dtype = torch.float32, lowrank: bool = False) -> ExtractReport:
    """Write a LoRA approximating `tuned - base` to `output` (as given; see `networks.extract.expert_path`)
    and report. `lowrank` uses `torch.svd_lowrank` (randomised; much faster on large layers, exact for
    low-rank differences) instead of the full SVD."""
    if dim < 1:
        raise LoraInputError(f"dim must be at least 1, got {dim}")
    if not 0 < clamp_quantile <= 1:
        raise LoraInputError(f"clamp_quantile must be in (0, 1], got {clamp_quantile}")
    if not 0 <= min_diff < float("inf"):
        raise LoraInputError(f"min_diff must be a finite number, 0 or more, got {min_diff}")
    if expert is not None and expert not in EXPERTS:
        raise LoraInputError(f"unknown expert {expert!r}; choose {' or '.join(EXPERTS)}")
    check_dynamic(dynamic_method, dynamic_param)
    (b_ckpt, b_layout), (t_ckpt, t_layout), variant = _open_pair(base, tuned, task)
    device = torch.device(device)
    report, modules = ExtractReport(Path(output), variant.name), {}
    for name in t_layout.key_map:
        module = name[: -len(".weight")] if name.endswith(".weight") else None
        target = module is not None and is_lora_target(module) and len(t_ckpt.shape(t_layout.key_map[name])) == 2
        if not target and not t_ckpt.dtype(t_layout.key_map[name]).is_floating_point:
            continue
        old = read_dit_weight(b_ckpt, b_layout, name, device)
        diff = read_dit_weight(t_ckpt, t_layout, name, device) - old
        changed = _relative(diff, old) > min_diff
        del old
        if not target:
            if changed:
                report.other_changed.append(name)
            continue
        if not changed:
            report.skipped.append(module)
            continue
        modules[module], rank = lora_from_difference(module, diff, dim, dynamic_method, dynamic_param,
                                                     clamp_quantile, lowrank)
        report.ranks.append(rank)
        del diff
    if not modules:
        raise LoraInputError(f"{tuned} does not differ from {base} in any LoRA target layer (all below min_diff "
                             f"{min_diff:g}): nothing to extract")
    if report.other_changed:
        logger.warning("%d tensors that a LoRA cannot hold differ between the models and are not in the LoRA "
                       "(e.g. %s)", len(report.other_changed), ", ".join(report.other_changed[:3]))
    note = {"base": Path(str(base)).name, "tuned": Path(str(tuned)).name, "dim": dim,
            "dynamic_method": dynamic_method, "dynamic_param": dynamic_param, "clamp_quantile": clamp_quantile,
            "min_diff": min_diff, "skipped_modules": len(report.skipped)}
    ranks = rank_metadata(modules)
    meta = build_lora_metadata(variant.name, variant.version, expert=expert, network_dim=ranks["ss_network_dim"],
                               network_alpha=ranks["ss_network_alpha"], output_name=Path(output).stem,
                               extra={"ss_extracted": json.dumps(note), "ss_lora_format": fmt})
    save_lora_modules(modules, output, fmt, meta, dtype)
    return report

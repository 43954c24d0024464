"""Extracting a LoRA from a fine-tuned WAN DiT and its base: the truncated SVD of each weight difference.

For every LoRA target Linear (the layers `networks.lora_wan` trains: attention q / k / v / o, the 2.1 I2V
k_img / v_img, ffn.0 / ffn.2 in every block) the pair (tuned, base) is read one weight at a time, in any
layout either file has (official, ComfyUI prefix, diffusers, fp8, fp8_scaled, sharded), and
`tuned - base` ([out, in], fp32) is factored by SVD: U S Vh truncated to `dim` (or to the rank a dynamic
method chooses, with `dim` as the ceiling; see `networks.resize`). The factors are balanced
(up = U sqrt(S), down = sqrt(S) Vh, alpha = rank) and then, Kohya style, clamped to the `clamp_quantile`
quantile of their entries (1.0 turns clamping off). Differences below `min_diff` relative to the base
weight's norm are skipped and counted; tensors a LoRA cannot hold (norms, modulation, embeddings) that
differ are reported.
"""

from __future__ import annotations

import json
import logging
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .lora_wan import WAN_DEFAULT_EXCLUDES, WAN_TARGETS, build_lora_metadata
from .merge import EXPERTS, read_dit_weight
from .resize import ModuleRank, check_dynamic, choose_rank, factors, fro_fraction, rank_metadata, save_lora_modules

logger = logging.getLogger(__name__)

_EXCLUDES = [re.compile(p) for p in WAN_DEFAULT_EXCLUDES]


@dataclass
class ExtractReport:
    output: Path
    variant: str
    ranks: list[ModuleRank] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)  # targets whose difference is ~0
    other_changed: list[str] = field(default_factory=list)  # changed tensors a LoRA cannot carry


def is_lora_target(module: str) -> bool:
    """The selection rule of `networks.lora_wan.create_network` on an official module name."""
    targeted = any(module == t or module.endswith("." + t) for t in WAN_TARGETS)
    return targeted and not any(p.match(module) for p in _EXCLUDES)


def expert_path(path, expert: str | None) -> Path:
    """`out.safetensors` -> `out_high_noise.safetensors` for an expert, unless the name already says it."""
    path = Path(path)
    if expert is None or path.stem.endswith("_" + expert):
        return path
    if expert not in EXPERTS:
        raise ValueError(f"unknown expert {expert!r}; choose {' or '.join(EXPERTS)}")
    return path.with_name(f"{path.stem}_{expert}{path.suffix or '.safetensors'}")


def _clamp(down: torch.Tensor, up: torch.Tensor, quantile: float):
    """Clamp both factors to [-h, h], h the `quantile` quantile of all their entries (Kohya)."""
    if quantile >= 1:
        return down, up
    values = torch.cat([up.flatten(), down.flatten()])
    k = min(values.numel(), max(1, math.ceil(quantile * values.numel())))
    high = values.kthvalue(k).values  # torch.quantile refuses inputs over 16M entries
    return down.clamp(-high, high), up.clamp(-high, high)


def _svd(delta: torch.Tensor, rank_limit: int, lowrank: bool):
    if lowrank:
        q = min(rank_limit + 16, *delta.shape)
        U, S, V = torch.svd_lowrank(delta, q=q, niter=6)
        return U, S, V.T
    return torch.linalg.svd(delta, full_matrices=False)


def _open_pair(base, tuned, task):
    from library.wan.loading import open_dit_checkpoint

    b_ckpt, b_layout, b_variant = open_dit_checkpoint(base, task)
    t_ckpt, t_layout, t_variant = open_dit_checkpoint(tuned, task)
    if b_variant.shape_signature() != t_variant.shape_signature():
        raise ValueError(f"the base {base} is {b_variant.describe()} but the tuned model {tuned} is "
                         f"{t_variant.describe()}: extract from a fine-tune and the base it was trained from")
    if set(b_layout.key_map) != set(t_layout.key_map):
        odd = sorted(set(b_layout.key_map) ^ set(t_layout.key_map))
        raise ValueError(f"{base} and {tuned} hold different tensors (e.g. {', '.join(odd[:3])})")
    return (b_ckpt, b_layout), (t_ckpt, t_layout), t_variant


def _relative(diff: torch.Tensor, base: torch.Tensor) -> float:
    norm = float(base.norm())
    return float(diff.norm()) / (norm if norm > 0 else 1.0)


def extract_lora(base, tuned, output, dim: int = 32, dynamic_method: str | None = None,
                 dynamic_param: float | None = None, clamp_quantile: float = 0.99, min_diff: float = 1e-6,
                 device="cpu", fmt: str = "kohya", expert: str | None = None, task: str | None = None,
                 dtype: torch.dtype = torch.float32, lowrank: bool = False) -> ExtractReport:
    """Write a LoRA approximating `tuned - base` to `output` (as given; see `expert_path`) and report.
    `lowrank` uses `torch.svd_lowrank` (randomised; much faster on large layers, exact for low-rank
    differences) instead of the full SVD."""
    if dim < 1:
        raise ValueError(f"dim must be at least 1, got {dim}")
    if not 0 < clamp_quantile <= 1:
        raise ValueError(f"clamp_quantile must be in (0, 1], got {clamp_quantile}")
    if expert is not None and expert not in EXPERTS:
        raise ValueError(f"unknown expert {expert!r}; choose {' or '.join(EXPERTS)}")
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
        U, S, Vh = _svd(diff, dim, lowrank)
        rank = choose_rank(S, dim, dynamic_method, dynamic_param)
        down, up, alpha = factors(U, S, Vh, rank)
        down, up = _clamp(down, up, clamp_quantile)
        modules[module] = {"down": down.cpu(), "up": up.cpu(), "alpha": torch.tensor(alpha)}
        report.ranks.append(ModuleRank(module, int(min(diff.shape)), rank,
                                       fro_fraction(S, rank, float(diff.double().pow(2).sum()))))
        del diff, U, S, Vh
    if not modules:
        raise ValueError(f"{tuned} does not differ from {base} in any LoRA target layer (all below min_diff "
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

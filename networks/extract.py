"""Extracting a LoRA from a weight difference: the truncated SVD of `tuned - base` for one layer.

The LoRA targets are the layers `networks.lora_wan` trains (attention q / k / v / o, the 2.1 I2V
k_img / v_img, ffn.0 / ffn.2 in every block). A difference ([out, in], fp32) is factored by SVD: U S Vh
truncated to `dim` (or to the rank a dynamic method chooses, with `dim` as the ceiling; see
`networks.resize`). The factors are balanced (up = U sqrt(S), down = sqrt(S) Vh, alpha = rank) and then,
Kohya style, clamped to the `clamp_quantile` quantile of their entries (1.0 turns clamping off).
Reading the two DiT checkpoints weight by weight lives above networks, in `library.lora_tools.extract`.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import torch

from .lora_wan import WAN_DEFAULT_EXCLUDES, WAN_TARGETS
from .lora_files import LoraInputError
from .merge import EXPERTS
from .resize import ModuleRank, choose_rank, factors, fro_fraction

_EXCLUDES = [re.compile(p) for p in WAN_DEFAULT_EXCLUDES]


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
        raise LoraInputError(f"unknown expert {expert!r}; choose {' or '.join(EXPERTS)}")
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


def lora_from_difference(module: str, diff: torch.Tensor, dim: int, dynamic_method: str | None = None,
                         dynamic_param: float | None = None, clamp_quantile: float = 0.99,
                         lowrank: bool = False) -> tuple[dict[str, torch.Tensor], ModuleRank]:
    """One LoRA module approximating `diff` ([out, in], fp32): its parts on the CPU and its rank record.
    `lowrank` uses `torch.svd_lowrank` (randomised; much faster on large layers, exact for low-rank
    differences) instead of the full SVD."""
    U, S, Vh = _svd(diff, dim, lowrank)
    rank = choose_rank(S, dim, dynamic_method, dynamic_param)
    down, up, alpha = factors(U, S, Vh, rank)
    down, up = _clamp(down, up, clamp_quantile)
    parts = {"down": down.cpu(), "up": up.cpu(), "alpha": torch.tensor(alpha)}
    kept = fro_fraction(S, rank, float(diff.double().pow(2).sum()))
    return parts, ModuleRank(module, int(min(diff.shape)), rank, kept)

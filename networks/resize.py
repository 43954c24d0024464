"""LoRA rank arithmetic: the SVD of a module's delta, choosing a rank, re-factoring, and writing LoRA files.

A LoRA module adds `delta = up @ down * alpha / rank` ([out, in]) to its Linear weight. Resizing takes the
SVD of that delta, `U S Vh`, keeps the first k singular triplets and writes them back as a rank-k module:
the rank-k delta closest to the original in the Frobenius norm (Eckart-Young). The SVD of a rank-r delta
is computed from two thin QR factorisations and the SVD of an r x r core, never from the full [out, in]
matrix, so it is exact and cheap whatever the layer size.

How k is chosen (S sorted descending, r = len(S); k is never above the old rank nor `max_rank`, never
below 1):

    fixed          k = new_rank
    sv_ratio X     keep every singular value with S_i >= S_0 / X                            (X >= 1)
    sv_fro X       the smallest k with sqrt(sum_{i<k} S_i^2) >= X * sqrt(sum_i S_i^2): the kept
                   delta holds fraction X of the Frobenius norm (X^2 of its square)        (0 < X <= 1)
    sv_cumulative X  the smallest k with sum_{i<k} S_i >= X * sum_i S_i                   (0 < X <= 1)

These are the meanings of Kohya's `resize_lora.py --dynamic_method` (with our rank never above the old).
The rank-k factors are balanced: up = U_k sqrt(S_k / scale), down = sqrt(S_k / scale) Vh_k with
scale = alpha / k, so up @ down * scale = U_k S_k Vh_k whatever alpha is.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import torch

from .convert import read_modules, to_format
from .lora_files import LoraInputError, write_lora_file

logger = logging.getLogger(__name__)

DYNAMIC_METHODS = ("sv_ratio", "sv_fro", "sv_cumulative")
SAVE_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
_REL = 1e-6  # float rounding allowance when a cumulative fraction meets its target exactly

Modules = dict[str, dict[str, torch.Tensor]]  # official module name -> {"down", "up", "alpha"}


@dataclass
class ModuleRank:
    """What happened to one module: its rank before and after, and the Frobenius fraction kept."""

    name: str
    old_rank: int
    new_rank: int
    fro_retained: float  # ||kept delta||_F / ||delta||_F


# ---- rank choice ---------------------------------------------------------------------------------------


def check_dynamic(method: str | None, param: float | None) -> None:
    """A clear error for an unknown method or a parameter outside its range."""
    if method is None:
        return
    if method not in DYNAMIC_METHODS:
        raise LoraInputError(f"unknown dynamic_method {method!r}; choose one of {', '.join(DYNAMIC_METHODS)}")
    if param is None:
        raise LoraInputError(f"dynamic_method {method} needs --dynamic_param")
    if not math.isfinite(param):
        raise LoraInputError(f"dynamic_method {method}: --dynamic_param must be a finite number, got {param}")
    if method == "sv_ratio" and param < 1:
        raise LoraInputError(f"sv_ratio keeps singular values >= max / X: X must be >= 1, got {param}")
    if method != "sv_ratio" and not 0 < param <= 1:
        raise LoraInputError(f"{method} keeps a fraction X of the spectrum: X must be in (0, 1], got {param}")


def choose_rank(S: torch.Tensor, max_rank: int | None = None, method: str | None = None,
                param: float | None = None) -> int:
    """How many singular values (S sorted descending) to keep; see the module docstring."""
    S = S.double()
    limit = len(S) if max_rank is None else max(1, min(int(max_rank), len(S)))
    if method is None or len(S) == 0:
        return limit
    if float(S[0]) <= 0:  # a zero delta: one (zero) direction is all there is
        return 1
    if method == "sv_ratio":
        k = int((S >= S[0] / param * (1 - _REL)).sum())
    else:
        values = S.pow(2) if method == "sv_fro" else S
        target = param**2 if method == "sv_fro" else param
        fractions = torch.cumsum(values, 0) / values.sum()
        k = int((fractions < target * (1 - _REL)).sum()) + 1
    return max(1, min(k, limit))


# ---- SVD and factors -----------------------------------------------------------------------------------


def lora_svd(up: torch.Tensor, down: torch.Tensor, scale: float, device="cpu"):
    """U [out, k], S [k], Vh [k, in] of up @ down * scale, from thin QRs and the SVD of a small core (fp32)."""
    up = up.to(device, torch.float32)
    down = down.to(device, torch.float32)
    q_up, r_up = torch.linalg.qr(up)  # [out, a], [a, r]
    q_down, r_down = torch.linalg.qr(down.T)  # [in, b], [b, r]
    core = (r_up @ r_down.T) * scale  # [a, b]
    u, s, vh = torch.linalg.svd(core, full_matrices=False)
    return q_up @ u, s, vh @ q_down.T


def factors(U: torch.Tensor, S: torch.Tensor, Vh: torch.Tensor, rank: int, alpha: float | None = None):
    """Balanced rank-`rank` LoRA factors of U S Vh: (down [k, in], up [out, k], alpha)."""
    alpha = float(rank if alpha is None else alpha)
    root = (S[:rank] / (alpha / rank)).clamp_min(0).sqrt()
    return root[:, None] * Vh[:rank], U[:, :rank] * root[None, :], alpha


def fro_fraction(S: torch.Tensor, rank: int, total_sq: float | None = None) -> float:
    """||first `rank` triplets||_F / ||all||_F (1 for a zero delta)."""
    total = float(S.double().pow(2).sum()) if total_sq is None else total_sq
    return 1.0 if total <= 0 else math.sqrt(min(1.0, float(S[:rank].double().pow(2).sum()) / total))


def module_scale(parts: Mapping[str, torch.Tensor]) -> float:
    rank = parts["down"].shape[0]
    return (float(parts["alpha"]) if "alpha" in parts else rank) / rank


def resize_modules(modules: Modules, new_rank: int | None = None, dynamic_method: str | None = None,
                   dynamic_param: float | None = None, new_alpha: float | None = None,
                   device="cpu") -> tuple[Modules, list[ModuleRank]]:
    """Every module re-factored at its chosen rank (fp32, on the CPU); the per-module report."""
    if new_rank is None and dynamic_method is None:
        raise LoraInputError("give a new rank (--new_rank N) or a dynamic method (--dynamic_method, --dynamic_param)")
    if new_rank is not None and new_rank < 1:
        raise LoraInputError(f"new_rank must be at least 1, got {new_rank}")
    if new_alpha is not None and not 0 < new_alpha < math.inf:
        raise LoraInputError(f"new_alpha must be a finite number above 0, got {new_alpha}")
    check_dynamic(dynamic_method, dynamic_param)
    out, report = {}, []
    for name, parts in modules.items():
        old = parts["down"].shape[0]
        U, S, Vh = lora_svd(parts["up"], parts["down"], module_scale(parts), device)
        rank = choose_rank(S, new_rank, dynamic_method, dynamic_param)
        down, up, alpha = factors(U, S, Vh, rank, new_alpha)
        out[name] = {"down": down.cpu(), "up": up.cpu(), "alpha": torch.tensor(alpha)}
        report.append(ModuleRank(name, old, rank, fro_fraction(S, rank)))
    return out, report


def summarise(report: list[ModuleRank]) -> dict:
    """Mean / min / max kept rank and the mean retained Frobenius fraction."""
    if not report:
        return {"modules": 0}
    ranks = [r.new_rank for r in report]
    return {"modules": len(report), "mean_rank": sum(ranks) / len(ranks), "min_rank": min(ranks),
            "max_rank": max(ranks), "mean_old_rank": sum(r.old_rank for r in report) / len(report),
            "mean_fro_retained": sum(r.fro_retained for r in report) / len(report),
            "min_fro_retained": min(r.fro_retained for r in report)}


def format_report(report: list[ModuleRank], verbose: bool = False) -> str:
    lines = [f"{r.name}: rank {r.old_rank} -> {r.new_rank}, Frobenius kept {r.fro_retained:.4f}"
             for r in report] if verbose else []
    s = summarise(report)
    if s["modules"]:
        lines.append(f"{s['modules']} modules: mean rank {s['mean_old_rank']:.1f} -> {s['mean_rank']:.1f} "
                     f"(min {s['min_rank']}, max {s['max_rank']}); Frobenius kept mean {s['mean_fro_retained']:.4f}, "
                     f"min {s['min_fro_retained']:.4f}")
    return "\n".join(lines)


# ---- files ---------------------------------------------------------------------------------------------


def lora_format(path) -> str:
    """'kohya', 'comfyui' or 'diffusers', from a LoRA file's key names."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt", device="cpu") as fh:
        keys = list(fh.keys())
    if any(k.startswith("lora_unet_") for k in keys):
        return "kohya"
    if any(k.startswith(("diffusion_model.", "model.diffusion_model.")) for k in keys):
        return "comfyui"
    return "diffusers" if any(k.startswith("transformer.") for k in keys) else "kohya"


def rank_metadata(modules: Modules) -> dict[str, str]:
    """ss_network_dim / ss_network_alpha: the common value, or "Dynamic" (Kohya) when modules differ."""
    ranks = {p["down"].shape[0] for p in modules.values()}
    alphas = {float(p.get("alpha", p["down"].shape[0])) for p in modules.values()}
    return {"ss_network_dim": str(ranks.pop()) if len(ranks) == 1 else "Dynamic",
            "ss_network_alpha": f"{alphas.pop():g}" if len(alphas) == 1 else "Dynamic"}


def _rank_range(modules: Modules) -> str:
    ranks = sorted(p["down"].shape[0] for p in modules.values())
    return str(ranks[0]) if ranks[0] == ranks[-1] else f"{ranks[0]}-{ranks[-1]}"


def save_lora_modules(modules: Modules, path, fmt: str = "kohya", metadata: Mapping[str, str] | None = None,
                      dtype: torch.dtype | None = None) -> Path:
    """Write modules as a LoRA file in `fmt`, atomically; adds the sshs hashes when there is metadata."""
    tensors = to_format(modules, fmt)
    if dtype is not None:
        tensors = {k: v.to(torch.float32 if k.endswith(".alpha") else dtype) for k, v in tensors.items()}
    return write_lora_file(tensors, path, metadata)


def resize_lora(src, dst, new_rank: int | None = None, dynamic_method: str | None = None,
                dynamic_param: float | None = None, new_alpha: float | None = None, device="cpu",
                fmt: str | None = None, dtype: torch.dtype | None = None) -> list[ModuleRank]:
    """Resize a LoRA file (any format) and write it in the same format (or `fmt`); returns the report.
    `new_rank` with a dynamic method is the largest rank any module may keep. Tensors keep their dtype
    unless `dtype` is given."""
    src = Path(src)
    if not src.is_file():
        raise FileNotFoundError(f"{src}: LoRA file not found")
    modules, meta = read_modules(src)
    source_dtype = next(iter(modules.values()))["up"].dtype if modules else torch.float32
    resized, report = resize_modules(modules, new_rank, dynamic_method, dynamic_param, new_alpha, device)
    fmt = fmt or lora_format(src)
    note = {"from": src.name, "new_rank": new_rank, "dynamic_method": dynamic_method,
            "dynamic_param": dynamic_param, "new_alpha": new_alpha, **summarise(report)}
    meta = {**meta, **rank_metadata(resized), "ss_lora_format": fmt, "ss_resize": json.dumps(note)}
    comment = f"rank resized from {_rank_range(modules)} to {_rank_range(resized)}"
    if meta.get("ss_training_comment"):
        comment = f"{comment}; {meta['ss_training_comment']}"
    meta["ss_training_comment"] = comment
    save_lora_modules(resized, dst, fmt, meta, dtype or source_dtype)
    return report

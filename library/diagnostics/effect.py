"""How strong a LoRA's effect is: ||delta|| = ||up @ down|| * alpha / rank per module (from the r x r Gram
matrices, never the [out, in] product), relative to the base weight's norm when a DiT is given, and the
findings for zero, scaled-down and negligible effects."""

from __future__ import annotations

import math
import statistics

import torch

from .architecture import DitReference
from .report import Diagnosis, few

MIN_SCALE = 0.05  # alpha / rank below this: the effect is scaled down noticeably
NEGLIGIBLE = 1e-4  # median ||delta|| / ||W|| below this barely changes the model


def gram_norm(up: torch.Tensor, down: torch.Tensor) -> float:
    """||up @ down||_F without the [out, in] product: sqrt(trace((upᵀ up)(down downᵀ))), both r x r."""
    u = up.reshape(up.shape[0], -1).float().double()  # [out, r]
    d = down.reshape(down.shape[0], -1).float().double()  # [r, in]
    value = float(((u.T @ u) * (d @ d.T)).sum())  # trace(A B) = sum(A * B), B symmetric
    return math.sqrt(max(value, 0.0))


def module_scale(parts: dict) -> float:
    rank = parts["down"].shape[0]
    return (float(parts["alpha"]) if "alpha" in parts else rank) / rank


def check_effect(d: Diagnosis, modules: dict, dit: DitReference | None) -> None:
    """Per-module ||delta|| = ||up @ down|| * alpha / rank, and relative to ||W|| when a DiT is given."""
    scales = {n: module_scale(p) for n, p in modules.items()}
    d.alpha_scale = sorted(set(scales.values()))
    zero = [n for n, p in modules.items() if not p["up"].float().any() or not p["down"].float().any()]
    zero_up = [n for n in zero if not modules[n]["up"].float().any()]
    norms, relative = {}, {}
    for name, parts in modules.items():
        norm = gram_norm(parts["up"], parts["down"]) * scales[name]
        if not math.isfinite(norm):
            continue
        norms[name] = norm
        if dit is not None and dit.linears.get(name) == (parts["down"].shape[-1], parts["up"].shape[0]):
            w = dit.weight_norm(name)
            relative[name] = norm / w if w > 0 else float("inf")
    d.effect = {"zero_modules": len(zero), "zero_up_modules": len(zero_up)}
    for label, values in (("delta_norm", norms), ("relative_norm", relative)):
        if values:
            top = max(values, key=values.get)
            d.effect[label] = {"median": statistics.median(values.values()), "max": values[top], "max_module": top}
    if zero and len(zero) == len(modules):
        d.add("error", "this LoRA has no effect: its up-projections are zero (saved before training, or training "
                       "diverged to zero)" if zero_up else "this LoRA has no effect: every module's delta is zero")
    elif zero:
        d.add("warning", f"{len(zero)} of {len(modules)} modules are all zero and do nothing ({few(zero, 2)})")
    low = min(scales.values())
    if low == 0:
        d.add("error", "alpha is 0: scale alpha / rank = 0, so the LoRA has no effect when loaded")
    elif low < MIN_SCALE:
        rank = modules[min(scales, key=scales.get)]["down"].shape[0]
        d.add("warning", f"effect scaled down by alpha/rank = {low:.3g} (alpha {low * rank:g}, rank {rank}); fine "
                         "only if the learning rate made up for it")
    if "relative_norm" in d.effect and not zero and d.effect["relative_norm"]["median"] < NEGLIGIBLE:
        d.add("warning", f"tiny effect: median ||delta|| / ||W|| is {d.effect['relative_norm']['median']:.2g} "
                         "(too few steps or lr too low?)")


"""Which DiT weights train in full fine-tuning and in what precision: `trainable_patterns` /
`frozen_patterns` select them by official name; trainable ones become fp32 masters (or stay bf16 with
`full_bf16`), frozen ones take the compute dtype unless the model keeps them in fp32."""

from __future__ import annotations

import re

import torch

from library.wan.model import WanModel


def select_trainable(model: torch.nn.Module, include: tuple[str, ...] = (), exclude: tuple[str, ...] = ()) -> list[str]:
    """Official parameter names to train: matching any `include` regex (all when empty) and no `exclude`."""
    inc = [re.compile(p) for p in include]
    exc = [re.compile(p) for p in exclude]
    names = [n for n, _ in model.named_parameters()
             if (not inc or any(r.search(n) for r in inc)) and not any(r.search(n) for r in exc)]
    if not names:
        raise ValueError(f"trainable_patterns {list(include)} / frozen_patterns {list(exclude)} leave no DiT parameter "
                         "to train; the names look like 'blocks.0.self_attn.q.weight'")
    return names


def prepare_parameters(module: torch.nn.Module, prefix: str, wanted: set[str], master_dtype: torch.dtype | None,
                       frozen_dtype: torch.dtype | None) -> None:
    """Mark `module`'s parameters trainable or frozen; trainable ones become `master_dtype` (fp32 masters),
    frozen ones `frozen_dtype` (the compute dtype) unless the model keeps them in fp32."""
    for local, param in module.named_parameters():
        name = prefix + local
        train = name in wanted
        dtype = master_dtype if train else (None if WanModel.is_fp32_param(name) else frozen_dtype)
        if dtype is not None and param.dtype != dtype and param.is_floating_point():
            param.data = param.data.to(dtype)  # a copy, off the mapped file
        param.requires_grad_(train)

"""Optimizers and learning-rate schedules by their Kohya names.

Optimizers: AdamW, AdamW8bit / PagedAdamW8bit (bitsandbytes), AdaFactor (transformers), Lion
(lion-pytorch, else bitsandbytes), Prodigy (prodigyopt), or any dotted class path. Optional packages are
imported only when asked for, and a missing one is an error that says what to install.
Schedules: constant, constant_with_warmup, linear, cosine, cosine_with_restarts, polynomial, each with
warmup given as steps or as a ratio of the total, as a `LambdaLR` of plain functions below.
"""

from __future__ import annotations

import importlib
import logging
import math
from typing import Callable, Iterable

import torch

logger = logging.getLogger(__name__)


def _import(module: str, attr: str, package: str, what: str):
    try:
        return getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as exc:
        raise RuntimeError(f"optimizer_type {what!r} needs `{package}` ({exc}); pip install {package}") from None


def _dotted(path: str):
    module, _, attr = path.rpartition(".")
    if not module:
        raise ValueError(f"optimizer / scheduler {path!r} is neither a known name nor a dotted class path")
    try:
        return getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as exc:
        raise ValueError(f"cannot import {path!r}: {exc}") from None


def _lion():
    try:
        return _import("lion_pytorch", "Lion", "lion-pytorch", "Lion")
    except RuntimeError:
        return _import("bitsandbytes.optim", "Lion", "lion-pytorch", "Lion")


_OPTIMIZERS: dict[str, Callable[[], type]] = {
    "adamw": lambda: torch.optim.AdamW,
    "adamw8bit": lambda: _import("bitsandbytes.optim", "AdamW8bit", "bitsandbytes", "AdamW8bit"),
    "pagedadamw8bit": lambda: _import("bitsandbytes.optim", "PagedAdamW8bit", "bitsandbytes", "PagedAdamW8bit"),
    "adafactor": lambda: _import("transformers.optimization", "Adafactor", "transformers", "AdaFactor"),
    "lion": _lion,
    "prodigy": lambda: _import("prodigyopt", "Prodigy", "prodigyopt", "Prodigy"),
}


def build_optimizer(params: Iterable, optimizer_type: str, learning_rate: float, optimizer_args: dict | None = None):
    """An optimizer over `params` (tensors or param groups with their own `lr`)."""
    args = dict(optimizer_args or {})
    key = optimizer_type.lower().replace("_", "")
    cls = _OPTIMIZERS[key]() if key in _OPTIMIZERS else _dotted(optimizer_type)
    if key == "adafactor":  # use the given learning rate unless the user asks for relative steps
        args.setdefault("relative_step", False)
        args.setdefault("scale_parameter", False)
        args.setdefault("warmup_init", False)
        if args["relative_step"]:
            learning_rate = None
    logger.info("optimizer %s.%s lr=%s args=%s", cls.__module__, cls.__name__, learning_rate, args)
    return cls(list(params), lr=learning_rate, **args) if learning_rate is not None else cls(list(params), **args)


def warmup_steps_from(value: float, total_steps: int) -> int:
    """`lr_warmup_steps`: an int is steps, a float below 1 is a ratio of the total steps."""
    if isinstance(value, float) and 0 < value < 1:
        return int(round(value * total_steps))
    return int(value)


def _lambda(name: str, warmup: int, total: int, cycles: float, power: float, min_ratio: float) -> Callable[[int], float]:
    span = max(1, total - warmup)

    def progress(step: int) -> float:
        return min(1.0, max(0.0, (step - warmup) / span))

    def floor(x: float) -> float:
        return min_ratio + (1 - min_ratio) * x

    def warm(step: int) -> float | None:
        return (step + 1) / (warmup + 1) if step < warmup else None

    schedules = {
        "constant": lambda s: 1.0,
        "constant_with_warmup": lambda s: warm(s) or 1.0,
        "linear": lambda s: warm(s) or floor(1 - progress(s)),
        "cosine": lambda s: warm(s) or floor(0.5 * (1 + math.cos(math.pi * progress(s)))),
        "cosine_with_restarts": lambda s: warm(s) or (
            floor(0.0) if progress(s) >= 1.0 else floor(0.5 * (1 + math.cos(math.pi * ((cycles * progress(s)) % 1.0))))
        ),
        "polynomial": lambda s: warm(s) or floor((1 - progress(s)) ** power),
    }
    if name not in schedules:
        raise ValueError(f"lr_scheduler {name!r} is not one of {', '.join(schedules)} (or use lr_scheduler_type)")
    if name == "constant" and warmup:
        return schedules["constant_with_warmup"]
    return schedules[name]


def build_scheduler(
    optimizer, name: str, total_steps: int, warmup_steps: float = 0, num_cycles: float = 1.0,
    power: float = 1.0, min_lr_ratio: float = 0.0, scheduler_type: str = "", scheduler_args: dict | None = None,
):
    """A per-step LR schedule. `scheduler_type` (a dotted class path) overrides `name`."""
    if scheduler_type:
        return _dotted(scheduler_type)(optimizer, **(scheduler_args or {}))
    warmup = warmup_steps_from(warmup_steps, total_steps)
    fn = _lambda(name, warmup, total_steps, num_cycles, power, min_lr_ratio)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, fn)

"""Optimizers and learning-rate schedules by their Kohya names.

Optimizers: AdamW, AdamW8bit / PagedAdamW8bit (bitsandbytes), AdaFactor (transformers), Lion
(lion-pytorch, else bitsandbytes), Prodigy (prodigyopt), or any dotted class path. Optional packages are
imported only when asked for, and a missing one is an error that says what to install.
Schedules: constant, constant_with_warmup, linear, cosine, cosine_with_min_lr, cosine_with_restarts,
polynomial, inverse_sqrt (`lr_scheduler_timescale`), warmup_stable_decay (`lr_decay_steps`) and
piecewise_constant (`lr_scheduler_args = ["step_rules=1:100,0.1:200,0.01"]`), each with warmup given as
steps or as a ratio of the total, as a `LambdaLR` of the plain functions below (the meanings of the
names are transformers', which Kohya's scripts use); `adafactor` reports Adafactor's relative steps.
"""

from __future__ import annotations

import importlib
import logging
import math
from dataclasses import dataclass
from typing import Callable, Iterable

import torch

from library.config import ConfigError

logger = logging.getLogger(__name__)
_KNOWN = "AdamW, AdamW8bit, PagedAdamW8bit, AdaFactor, Lion, Prodigy"


def _import(module: str, attr: str, package: str, what: str):
    try:
        return getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as exc:
        raise ConfigError(f"`optimizer_type` = {what!r} needs `{package}` ({exc}); pip install {package}") from None


def _dotted(path: str, key: str = "optimizer_type"):
    """A class named by its dotted path (`torch.optim.SGD`); `key` is the config key that named it."""
    module, _, attr = path.rpartition(".")
    if not module:
        known = f"a known optimizer ({_KNOWN}) nor " if key == "optimizer_type" else ""
        raise ConfigError(f"`{key}` = {path!r} is neither {known}a dotted class path (e.g. torch.optim.SGD)")
    try:
        return getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as exc:
        raise ConfigError(f"`{key}` = {path!r} cannot be imported ({exc}); install its package or fix the "
                          "name") from None


def _lion():
    try:
        return _import("lion_pytorch", "Lion", "lion-pytorch", "Lion")
    except ConfigError:
        return _import("bitsandbytes.optim", "Lion", "lion-pytorch", "Lion")


_OPTIMIZERS: dict[str, Callable[[], type]] = {
    "adamw": lambda: torch.optim.AdamW,
    "adamw8bit": lambda: _import("bitsandbytes.optim", "AdamW8bit", "bitsandbytes", "AdamW8bit"),
    "pagedadamw8bit": lambda: _import("bitsandbytes.optim", "PagedAdamW8bit", "bitsandbytes", "PagedAdamW8bit"),
    "adafactor": lambda: _import("transformers.optimization", "Adafactor", "transformers", "AdaFactor"),
    "lion": _lion,
    "prodigy": lambda: _import("prodigyopt", "Prodigy", "prodigyopt", "Prodigy"),
}


def optimizer_class(optimizer_type: str) -> type:
    """The optimizer class a Kohya name or dotted path names; a ConfigError saying what to do otherwise
    (checked before any model loads)."""
    key = optimizer_type.lower().replace("_", "")
    return _OPTIMIZERS[key]() if key in _OPTIMIZERS else _dotted(optimizer_type)


def scheduler_class(scheduler_type: str) -> type:
    """The custom schedule class `lr_scheduler_type` names by its dotted path."""
    return _dotted(scheduler_type, "lr_scheduler_type")


def build_optimizer(params: Iterable, optimizer_type: str, learning_rate: float, optimizer_args: dict | None = None,
                    quiet: bool = False):
    """An optimizer over `params` (tensors or param groups with their own `lr`); `quiet` logs nothing (one
    optimizer per tensor with `fused_backward_pass`)."""
    args = dict(optimizer_args or {})
    key = optimizer_type.lower().replace("_", "")
    cls = optimizer_class(optimizer_type)
    if key == "adafactor":  # use the given learning rate unless the user asks for relative steps
        args.setdefault("relative_step", False)
        args.setdefault("scale_parameter", False)
        args.setdefault("warmup_init", False)
        if args["relative_step"]:
            learning_rate = None
    logger.log(logging.DEBUG if quiet else logging.INFO, "optimizer %s.%s lr=%s args=%s", cls.__module__,
               cls.__name__, learning_rate, args)
    return cls(list(params), lr=learning_rate, **args) if learning_rate is not None else cls(list(params), **args)


def warmup_steps_from(value: float, total_steps: int) -> int:
    """`lr_warmup_steps`: an int is steps, a float below 1 is a ratio of the total steps."""
    if isinstance(value, float) and 0 < value < 1:
        return int(round(value * total_steps))
    return int(value)


@dataclass(frozen=True)
class Schedule:
    """The shape of a learning-rate schedule, in the Kohya / transformers meanings of the names."""

    name: str
    total: int
    warmup: int = 0
    cycles: float = 1.0
    power: float = 1.0
    min_ratio: float = 0.0
    decay: int = 0  # warmup_stable_decay: the final steps that decay
    timescale: int = 0  # inverse_sqrt: 0 means the warmup steps (or 10,000 without warmup)
    rules: str = ""  # piecewise_constant: "1:100,0.1:200,0.01" = x1 before step 100, x0.1 before 200, then x0.01

    def factor(self) -> Callable[[int], float]:
        warmup, total, min_ratio = self.warmup, self.total, self.min_ratio
        span = max(1, total - warmup)

        def progress(step: int) -> float:
            return min(1.0, max(0.0, (step - warmup) / span))

        def floor(x: float) -> float:
            return min_ratio + (1 - min_ratio) * x

        def warm(step: int) -> float | None:
            return (step + 1) / (warmup + 1) if step < warmup else None

        def cosine(x: float) -> float:
            return 0.5 * (1 + math.cos(math.pi * x))

        schedules = {
            "constant": lambda s: 1.0,
            "constant_with_warmup": lambda s: warm(s) or 1.0,
            "linear": lambda s: warm(s) or floor(1 - progress(s)),
            "cosine": lambda s: warm(s) or floor(cosine(progress(s))),
            "cosine_with_min_lr": lambda s: warm(s) or floor(cosine(progress(s))),
            "cosine_with_restarts": lambda s: warm(s) or (
                floor(0.0) if progress(s) >= 1.0 else floor(cosine((self.cycles * progress(s)) % 1.0))
            ),
            "polynomial": lambda s: warm(s) or floor((1 - progress(s)) ** self.power),
            "inverse_sqrt": self._inverse_sqrt(warm),
            "warmup_stable_decay": self._warmup_stable_decay(warm, floor, cosine),
            "piecewise_constant": self._piecewise(),
        }
        if self.name not in schedules:
            raise ValueError(f"lr_scheduler {self.name!r} is not one of {', '.join(schedules)}, 'adafactor' "
                             "(with optimizer_type AdaFactor) or a class in lr_scheduler_type")
        if self.name == "constant" and warmup:
            return schedules["constant_with_warmup"]
        return schedules[self.name]

    def _inverse_sqrt(self, warm):
        timescale = self.timescale or self.warmup or 10_000
        shift = timescale - self.warmup
        return lambda s: warm(s) or 1.0 / math.sqrt(max(1.0, (s + shift)) / timescale)

    def _warmup_stable_decay(self, warm, floor, cosine):
        decay = min(self.decay, self.total - self.warmup)
        start = self.total - decay  # the stable phase ends here

        def wsd(s: int) -> float:
            if s < self.warmup:
                return warm(s)
            if s < start or decay == 0:
                return 1.0
            return floor(cosine(min(1.0, (s - start) / decay)))

        return wsd

    def _piecewise(self):
        if self.name != "piecewise_constant":
            return None
        rules = [r.strip() for r in self.rules.split(",") if r.strip()]
        if not rules or ":" in rules[-1]:
            raise ValueError(f"piecewise_constant needs lr_scheduler_args step_rules like '1:100,0.1:200,0.01' (a "
                             f"factor before each step, then the final factor); got {self.rules!r}")
        steps = []
        for rule in rules[:-1]:
            factor, _, before = rule.partition(":")
            steps.append((int(before), float(factor)))
        last = float(rules[-1])
        return lambda s: next((f for before, f in steps if s < before), last)


def build_scheduler(
    optimizer, name: str, total_steps: int, warmup_steps: float = 0, num_cycles: float = 1.0,
    power: float = 1.0, min_lr_ratio: float = 0.0, scheduler_type: str = "", scheduler_args: dict | None = None,
    decay_steps: float = 0, timescale: int = 0,
):
    """A per-step LR schedule. `scheduler_type` (a dotted class path) overrides `name`."""
    args = dict(scheduler_args or {})
    if scheduler_type:
        return scheduler_class(scheduler_type)(optimizer, **args)
    if name == "adafactor":  # Adafactor's own relative step sizes; the schedule only reports them
        from transformers.optimization import Adafactor, AdafactorSchedule

        if not isinstance(optimizer, Adafactor) or not optimizer.defaults.get("relative_step"):
            raise ValueError("lr_scheduler 'adafactor' reports Adafactor's own step sizes: it needs optimizer_type "
                             "AdaFactor with optimizer_args relative_step=True (else pick another schedule)")
        return AdafactorSchedule(optimizer, initial_lr=float(args.get("initial_lr", 0.0)))
    schedule = Schedule(name, total_steps, warmup_steps_from(warmup_steps, total_steps), num_cycles, power,
                        min_lr_ratio, warmup_steps_from(decay_steps, total_steps), timescale,
                        str(args.get("step_rules", "")))
    return torch.optim.lr_scheduler.LambdaLR(optimizer, schedule.factor())

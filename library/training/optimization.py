"""The optimisation of a run: the optimizer over every expert's trainable tensors (once each for a shared
LoRA), the learning-rate schedule, the step count, and the averaging of gradients over processes. With
`fused_backward_pass` the optimizer steps inside the backward pass (`engines.fused`)."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field

import torch

from library.config.schema import TrainConfig

from .checkpoints.weights import run_facts
from .engines.fused import FusedBackwardOptimizer
from .optimizers import build_optimizer, build_scheduler

logger = logging.getLogger(__name__)


@dataclass
class Optimization:
    optimizer: torch.optim.Optimizer
    scheduler: object
    trainable: list[torch.nn.Parameter]
    total_steps: int
    fused: bool = False  # fused_backward_pass: steps, averaging and clipping happen in the backward pass
    facts: dict = field(default_factory=dict)  # Kohya `ss_*` facts of the run for the saved files' metadata
    sharded: bool = False  # fsdp: gradients are averaged by the sharding, state is saved per process

    def average_gradients(self, accelerator, bucket_elements: int = 1 << 26) -> None:
        """Mean of the gradients over processes: one collective per bucket of up to `bucket_elements`
        (a LoRA fits in one; full fine-tuning never needs a second copy of every gradient)."""
        if accelerator.num_processes == 1 or self.fused or self.sharded:
            return
        for p in self.trainable:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        bucket: list[torch.nn.Parameter] = []
        size = 0
        for i, p in enumerate(self.trainable):
            bucket.append(p)
            size += p.numel()
            last = i == len(self.trainable) - 1
            if size >= bucket_elements or last or self.trainable[i + 1].grad.dtype != p.grad.dtype:
                flat = accelerator.reduce(torch.cat([q.grad.flatten() for q in bucket]), reduction="mean")
                offset = 0
                for q in bucket:
                    q.grad = flat[offset:offset + q.numel()].view_as(q.grad).clone()
                    offset += q.numel()
                bucket, size = [], 0


def build_optimization(cfg: TrainConfig, experts: list, data, accelerator, seed: int = 0) -> Optimization:
    groups, seen = [], set()
    for expert in experts:
        for group in expert.network.prepare_optimizer_params(expert.learning_rate):
            params = [p for p in group["params"] if id(p) not in seen]  # shared LoRA: once
            seen.update(id(p) for p in params)
            if params:
                groups.append({**group, "params": params})
    trainable = [p for g in groups for p in g["params"]]
    o, fused = cfg.optimizer, cfg.finetune.full_fine_tune and cfg.finetune.fused_backward_pass
    if fused:
        reduce = (lambda g: accelerator.reduce(g, reduction="mean")) if accelerator.num_processes > 1 else None
        optimizer = FusedBackwardOptimizer(
            groups, lambda g: build_optimizer(g, o.optimizer_type, o.learning_rate, o.optimizer_args, quiet=True),
            reduce=reduce, max_norm=o.max_grad_norm,
            stochastic_seed=seed if cfg.finetune.full_bf16 else None)
        logger.info("fused backward pass: one %s per tensor (%d), stepped as gradients arrive", o.optimizer_type,
                    len(optimizer.inner))
    else:
        optimizer = build_optimizer(groups, o.optimizer_type, o.learning_rate, o.optimizer_args)
        if cfg.finetune.full_bf16:
            logger.warning("full_bf16 without fused_backward_pass: each update is rounded to the nearest bf16 value, "
                           "so updates below half a bf16 step are lost; fused_backward_pass rounds stochastically")
    steps_per_epoch = math.ceil(data.batches_per_epoch / cfg.loop.gradient_accumulation_steps)
    total = cfg.loop.max_train_epochs * steps_per_epoch if cfg.loop.max_train_epochs else cfg.loop.max_train_steps
    s = cfg.scheduler
    scheduler = build_scheduler(optimizer, s.lr_scheduler, total, s.lr_warmup_steps, s.lr_scheduler_num_cycles,
                                s.lr_scheduler_power, s.lr_scheduler_min_lr_ratio or 0.0, s.lr_scheduler_type,
                                s.lr_scheduler_args, s.lr_decay_steps, s.lr_scheduler_timescale)
    if cfg.loop.mixed_precision == "fp16":
        optimizer = accelerator.prepare(optimizer)  # fp16 needs loss scaling; the wrapper costs ~1 ms a step
    logger.info("%d trainable %s tensors, %d steps (%d per epoch)", len(trainable),
                "DiT" if cfg.finetune.full_fine_tune else "LoRA", total, steps_per_epoch)
    return Optimization(optimizer, scheduler, trainable, total, fused,
                        run_facts(cfg, data, optimizer, total, data.world),
                        any(getattr(e.network, "sharded", False) for e in experts))

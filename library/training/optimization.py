"""The optimisation state of a run: optimizer and schedule over the trainable tensors of every expert
(LoRA or, with full fine-tuning, the DiT's own), gradient averaging across processes, and what the saved
files carry: weights, the run's Kohya `ss_*` facts and the resolved config.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from library.config.schema import TrainConfig
from library.wan.variants import WanVariant

from .components import SAVE_DTYPES, RunState, TrainData, base_sampler
from .experts import Expert, boundary_of
from .flow_matching import TimestepSampler
from .optim import build_optimizer, build_scheduler

logger = logging.getLogger(__name__)


@dataclass
class Optimization:
    experts: list[Expert]
    optimizer: torch.optim.Optimizer
    scheduler: object
    trainable: list[torch.nn.Parameter]
    base_sampler: TimestepSampler
    boundary: float | None
    total_steps: int
    offload_inactive: bool
    device: torch.device
    fused: bool = False  # fused_backward_pass: steps, averaging and clipping happen in the backward pass
    facts: dict = field(default_factory=dict)  # Kohya `ss_*` facts of the run for the saved files' metadata
    sharded: bool = False  # fsdp: gradients are averaged by the sharding, state is saved per process

    def activate(self, expert: Expert) -> None:
        """With `offload_inactive_dit`, only the expert in use sits on the accelerator."""
        if not self.offload_inactive or len(self.experts) == 1:
            return
        from .memory import place_model

        for other in self.experts:
            target = self.device if other is expert else torch.device("cpu")
            if other.model.patch_embedding.weight.device != target:
                place_model(other.model, target)

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

    def save_weights(self, expert: Expert, path: Path, cfg: TrainConfig, variant: WanVariant, state: RunState,
                     write: bool = True) -> None:
        """The expert's LoRA file, or with full fine-tuning its whole DiT. Sharded, every process calls this
        (the weights are gathered together) and the one with `write` writes."""
        if self.sharded and not write:
            expert.network.save_weights(path, write=False)
            return
        if cfg.finetune.full_fine_tune:
            from .full import model_metadata

            meta = {**self.facts, **model_metadata(variant, None if expert.name == "dit" else expert.name, cfg, state,
                                                   expert.learning_rate)}
            dtype = SAVE_DTYPES[cfg.saving.save_precision] if cfg.saving.save_precision else torch.bfloat16
            expert.network.save_weights(path, dtype=dtype, metadata=meta, fmt=cfg.finetune.save_model_format)
        else:
            meta = build_lora_metadata(cfg, variant, expert, state, self.facts)
            expert.network.save_weights(path, dtype=SAVE_DTYPES[cfg.saving.save_precision], metadata=meta,
                                        fmt=cfg.saving.save_lora_format)
        logger.info("saved %s", path)

    def state_payload(self, state: RunState) -> dict:
        """What resuming needs (this process's shards when sharded)."""
        if self.sharded:
            from .full import sharded_optimizer_state

            optimizer = sharded_optimizer_state(self.optimizer)
        else:
            optimizer = self.optimizer.state_dict()
        return {
            "run_state": asdict(state),
            "networks": {e.name: e.network.state_dict() for e in self.experts},
            "optimizer": optimizer,
            "scheduler": self.scheduler.state_dict(),
        }

    def load_state_payload(self, payload: dict) -> None:
        for expert in self.experts:
            expert.network.load_state_dict(payload["networks"][expert.name])
        if self.sharded:
            from .full import restore_sharded_optimizer

            restore_sharded_optimizer(self.optimizer, payload["optimizer"])
        else:
            self.optimizer.load_state_dict(payload["optimizer"])
        self.scheduler.load_state_dict(payload["scheduler"])


def run_facts(cfg: TrainConfig, data: TrainData, optimizer, total: int, world: int) -> dict[str, str]:
    """What Kohya's `ss_*` keys say about a run (data, batch, optimizer, schedule), as metadata strings."""
    o, s, loop = cfg.optimizer, cfg.scheduler, cfg.loop
    inner = getattr(optimizer, "inner", None)  # fused backward pass: the per-tensor optimizers' class
    cls = type((inner or [optimizer])[0])
    args = " ".join(f"{k}={v}" for k, v in o.optimizer_args.items())
    batch = max((ds.batch_size for ds in data.datasets), default=1)
    datasets = [{"kind": ds.spec.kind, "source": str(ds.spec.source), "items": len(ds.items),
                 "num_repeats": ds.num_repeats, "batch_size": ds.batch_size, "resolution": list(ds.spec.resolution),
                 **({"target_frames": list(ds.spec.target_frames), "frame_extraction": ds.spec.frame_extraction}
                    if ds.spec.kind == "video" else {})} for ds in data.datasets]
    facts = {
        "ss_num_train_items": sum(len(ds.items) * ds.num_repeats for ds in data.datasets),
        "ss_num_batches_per_epoch": data.batches_per_epoch,
        "ss_num_epochs": loop.max_train_epochs or math.ceil(total * loop.gradient_accumulation_steps
                                                            / data.batches_per_epoch),
        "ss_max_train_steps": total, "ss_batch_size_per_device": batch,
        "ss_total_batch_size": batch * loop.gradient_accumulation_steps * world,
        "ss_gradient_accumulation_steps": loop.gradient_accumulation_steps,
        "ss_optimizer": f"{cls.__module__}.{cls.__name__}" + (f"({args})" if args else ""),
        "ss_lr_scheduler": s.lr_scheduler_type or s.lr_scheduler,
        "ss_lr_warmup_steps": s.lr_warmup_steps, "ss_max_grad_norm": o.max_grad_norm,
        "ss_mixed_precision": loop.mixed_precision, "ss_gradient_checkpointing": cfg.memory.gradient_checkpointing,
        "ss_fp8_base": cfg.memory.fp8_base, "ss_timestep_sampling": cfg.timesteps.timestep_sampling,
        "ss_discrete_flow_shift": cfg.timesteps.discrete_flow_shift,
        "ss_caption_dropout_rate": max((ds.caption_dropout_rate for ds in data.datasets), default=0.0),
        "ss_datasets": json.dumps(datasets),
    }
    return {k: str(v) for k, v in facts.items()}


def build_lora_metadata(cfg: TrainConfig, variant: WanVariant, expert: Expert, state: RunState,
                        facts: dict | None = None) -> dict:
    from library.config import config_to_dict
    from networks.lora_wan import build_lora_metadata as wan_metadata

    s, n = cfg.saving, cfg.network
    return wan_metadata(
        variant.name, variant.version, expert=None if expert.name == "dit" else expert.name,
        network_dim=expert.network_dim, network_alpha=n.network_alpha or expert.network_dim,
        network_args=n.network_args, output_name=s.output_name, training_started_at=state.started_at,
        steps=state.global_step, epoch=state.epoch, learning_rate=expert.learning_rate, seed=state.seed,
        title=s.metadata_title, author=s.metadata_author,
        description=s.metadata_description, license=s.metadata_license, tags=s.metadata_tags,
        training_comment=s.training_comment, minimal=s.no_metadata,
        extra={**(facts or {}), "ss_training_config": json.dumps(config_to_dict(cfg), default=str)},
    )


def build_optimization(cfg: TrainConfig, experts: list[Expert], data: TrainData, accelerator,
                       seed: int = 0) -> Optimization:
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
        from .full import FusedBackwardOptimizer

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
    return Optimization(experts, optimizer, scheduler, trainable, base_sampler(cfg),
                        boundary_of(experts[0].model.variant, cfg.timesteps.timestep_boundary), total,
                        cfg.memory.offload_inactive_dit, accelerator.device, fused,
                        run_facts(cfg, data, optimizer, total, accelerator.num_processes),
                        any(getattr(e.network, "sharded", False) for e in experts))

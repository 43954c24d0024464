"""The experts of a run, loaded and made ready to train: each DiT read (fp8 where asked), base LoRAs
merged, attention backend and memory features applied (planned with `auto_memory`), the network that
trains attached (LoRA or full), and the blocks compiled."""

from __future__ import annotations

import dataclasses
import logging

import torch

from library.config.schema import TrainConfig
from library.runtime.compiling import compile_blocks, set_cuda_flags
from library.runtime.memory import apply_memory_features, fp8_config
from library.wan.loading import load_dit
from library.wan.variants import WanVariant

from .engines import attach_network
from .engines.base_weights import assign_base_weights, merge_base_weights
from .engines.sharding import sharding
from .experts import Expert, base_sampler, boundary_of, expert_ranges, make_samplers
from .planning.auto import resolve_memory
from .run import RunInfo

logger = logging.getLogger(__name__)


def build_experts(cfg: TrainConfig, variant: WanVariant, info: RunInfo, device, data) -> list[Expert]:
    m, t = cfg.model, cfg.timesteps
    paths = {"low_noise": m.dit, "high_noise": m.dit_high_noise} if variant.two_experts else {"dit": m.dit}
    paths = {k: v for k, v in paths.items() if v}
    if not paths:
        raise ValueError(f"no DiT checkpoint: set `dit`{' and/or `dit_high_noise`' if variant.two_experts else ''}")
    boundary = boundary_of(variant, t.timestep_boundary)
    configured = (t.min_timestep, t.max_timestep) != (0, 1000)
    ranges = expert_ranges(variant, boundary, "low_noise" in paths, "high_noise" in paths,
                           t.min_timestep if configured else None, t.max_timestep if configured else None)
    samplers = make_samplers(base_sampler(cfg), ranges)
    memory = resolve_memory(cfg, variant, data, device, len(paths))
    shard = sharding(cfg)
    if cfg.finetune.fsdp and not shard:
        logger.warning("fsdp: a single process has nothing to shard across; training unsharded")
    # load to host RAM and place afterwards (FSDP places each process's shards itself)
    on_host = memory.blocks_to_swap > 0 or memory.offload_inactive_dit or shard
    merges = assign_base_weights(cfg.network, list(paths))
    full = cfg.finetune.full_fine_tune
    # full fine-tuning keeps fp32 master weights: read them in fp32 (the official files are fp32), not rounded
    load_dtype = torch.float32 if full and not cfg.finetune.full_bf16 else info.base_dtype
    experts = []
    for name, path in paths.items():
        merging = any(expert == name for _, expert in merges)  # merge in full precision, then fp8 if asked
        model = load_dit(path, device="cpu" if on_host else device, dtype=load_dtype, task=m.task,
                         fp8=None if merging else fp8_config(memory))
        merge_base_weights(model, name, merges, variant)
        model.set_attention_backend(cfg.attention.attention_backend, cfg.attention.split_attn)
        apply_memory_features(model, memory, device, place=not (memory.offload_inactive_dit or shard))
        high = name == "high_noise"
        experts.append(Expert(
            name=name, model=model, sampler=samplers[name],
            learning_rate=(cfg.optimizer.learning_rate_high_noise if high and cfg.optimizer.learning_rate_high_noise
                           else cfg.optimizer.learning_rate),
            network_dim=(cfg.network.network_dim_high_noise if high and cfg.network.network_dim_high_noise
                         else cfg.network.network_dim),
        ))
    set_cuda_flags(cfg.compilation)
    compilation = cfg.compilation
    if compilation.compile is None and shard:  # FSDP-sharded blocks stay eager unless `compile = true`
        compilation = dataclasses.replace(compilation, compile=False)
    for i, expert in enumerate(experts):
        attach_network(expert, cfg, device, experts[0] if cfg.network.shared_expert_lora and i else None)
        expert.network.to(device)  # LoRA weights always live on the accelerator, swapped blocks or not
        compile_blocks(expert.model, compilation, device)  # after the LoRA hooks, so the graphs include them
        logger.info("expert %s: %s, timesteps %g-%g, lr %g, %s", expert.name, expert.model.variant.name,
                    expert.sampler.min_timestep, expert.sampler.max_timestep, expert.learning_rate,
                    "full fine-tuning" if full else f"rank {expert.network_dim}")
    return experts

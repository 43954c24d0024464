"""`auto_memory`: the memory settings the planner chooses for this card and the dataset's largest
bucket, for LoRA training (`lora.plan_memory`) and for full fine-tuning (`full.plan_full`), where a rung
is only taken if the config's own rules (`library.config.validate`) accept it; every plan holds back the margin
an earlier out-of-memory error of the same run recorded in its output folder (`margin.py`)."""

from __future__ import annotations

import logging
from dataclasses import replace

from library.config import ConfigError, validate
from library.config.schema import TrainConfig
from library.wan.variants import WanVariant

from . import lora
from .full import plan_full
from .host import detect_host_ram_gb
from .margin import held_back_note, load_margin, output_dir_of

logger = logging.getLogger(__name__)

# the settings the last plan of this process chose (what an out-of-memory error records as failed)
PLANNED: dict[str, str] = {}


def run_margin(cfg: TrainConfig) -> float:
    """GiB the plans of this run hold back after an earlier out-of-memory error (logged when not 0)."""
    margin = load_margin(output_dir_of(cfg))
    if margin:
        logger.warning("auto_memory: %s", held_back_note(output_dir_of(cfg), margin))
    return margin


def resolve_memory(cfg: TrainConfig, variant: WanVariant, data, device, n_experts: int):
    """The memory settings to use: the configured ones, or with `auto_memory` the planner's choice for
    this card, this process's share of the host RAM available now and the largest bucket of the dataset."""
    if not cfg.memory.auto_memory:
        return cfg.memory
    vram = lora.detect_vram_gb(device)
    if vram is None:
        logger.warning("auto_memory: no CUDA device, keeping the configured memory settings")
        return cfg.memory
    width, height, frames, batch = largest_bucket(data)
    plan = lora.plan_memory(vram, variant, width, height, frames, batch, cfg.network.network_dim,
                            cfg.optimizer.optimizer_type, experts=n_experts, fp8=cfg.memory.fp8_fast,
                            sequence_parallel=cfg.attention.sequence_parallel, gather_kv=_gathers(cfg),
                            host_ram_gb=detect_host_ram_gb(), margin_gb=run_margin(cfg))
    logger.info("auto_memory plan for %.0f GiB:\n%s", vram, plan.table())
    PLANNED["settings"] = plan.settings.label()
    return plan.apply(cfg.memory)


def auto_sequence_parallel(cfg: TrainConfig, variant: WanVariant, data, device, processes: int) -> TrainConfig:
    """`auto_memory` with several processes and no `sequence_parallel_size`: when the largest bucket does not fit
    one GPU comfortably (LoRA: without block swap; full fine-tuning: at all), the smallest sequence group
    that does (a divisor of the processes, and of the heads for Ulysses); else the config as it is."""
    a = cfg.attention
    vram = lora.detect_vram_gb(device) if cfg.memory.auto_memory and processes > 1 and a.sequence_parallel == 1 \
        else None
    if vram is None:
        return cfg
    width, height, frames, batch = largest_bucket(data)
    experts = 2 if variant.two_experts and cfg.model.dit and cfg.model.dit_high_noise else 1
    ft, host = cfg.finetune, detect_host_ram_gb()
    margin = load_margin(output_dir_of(cfg))  # logged by the memory plan that follows

    def comfortable(n: int) -> bool:
        if ft.full_fine_tune:
            return plan_full(vram, variant, width, height, frames, batch, cfg.optimizer.optimizer_type, processes,
                             experts, ft.trainable_patterns, ft.frozen_patterns, sequence_parallel=n,
                             gather_kv=_gathers(cfg), host_ram_gb=host, margin_gb=margin).fits
        plan = lora.plan_memory(vram, variant, width, height, frames, batch, cfg.network.network_dim,
                                cfg.optimizer.optimizer_type, experts, fp8=cfg.memory.fp8_fast, sequence_parallel=n,
                                gather_kv=_gathers(cfg), host_ram_gb=host, margin_gb=margin)
        return plan.fits and not plan.settings.blocks_to_swap

    if comfortable(1):
        return cfg
    ulysses = a.sequence_parallel_attention == "ulysses"
    for n in range(2, processes + 1):
        if processes % n == 0 and not (ulysses and variant.num_heads % n) and comfortable(n):
            logger.info("auto_memory: %dx%dx%d does not fit one %.0f GiB GPU comfortably; splitting each sample over "
                        "%d processes (sequence_parallel_size = %d)", width, height, frames, vram, n, n)
            return replace(cfg, attention=replace(a, sequence_parallel_size=n))
    return cfg


def _gathers(cfg: TrainConfig) -> bool:
    return cfg.attention.sequence_parallel_attention == "all_gather"


def largest_bucket(data) -> tuple[int, int, int, int]:
    """(width, height, frames, batch size) of the most expensive batch the datasets can produce."""
    width, height, frames = max((item.bucket for ds in data.datasets for item in ds.items),
                                key=lambda b: b[0] * b[1] * b[2])
    return width, height, frames, max(ds.batch_size for ds in data.datasets)


def auto_full_settings(cfg: TrainConfig, variant: WanVariant, data, device, processes: int) -> TrainConfig:
    """`auto_memory` for full fine-tuning: the first rung of the planner's full fine-tuning ladder that fits
    (with the speed stages that still fit: kept self-attention, the last blocks not checkpointed; `full.py`)
    this card at the dataset's largest bucket, this process's share of the host RAM available now (offloaded
    activations, fsdp_cpu_offload's shards and optimizer state), and that this config allows (no fused pass
    with gradient accumulation or fp16, no full_bf16 without bf16, no fsdp with samples during training:
    `validate`)."""
    vram = lora.detect_vram_gb(device)
    if vram is None:
        logger.warning("auto_memory: no CUDA device, keeping the configured memory settings")
        return cfg
    width, height, frames, batch = largest_bucket(data)
    ft = cfg.finetune

    def allowed(settings) -> bool:  # the config's own rules decide, not a copy of them
        memory, finetune = settings.apply(cfg.memory, ft)
        try:
            validate(replace(cfg, memory=memory, finetune=finetune))
        except ConfigError:
            return False
        return True

    plan = plan_full(vram, variant, width, height, frames, batch, cfg.optimizer.optimizer_type, processes,
                     2 if cfg.model.dit_high_noise else 1, ft.trainable_patterns, ft.frozen_patterns, allow=allowed,
                     sequence_parallel=cfg.attention.sequence_parallel, gather_kv=_gathers(cfg),
                     host_ram_gb=detect_host_ram_gb(), margin_gb=run_margin(cfg))
    chosen, estimate = plan.settings, plan.estimate
    if not plan.fits:  # the most frugal rung the host RAM holds: a GPU out-of-memory error, not a killed process
        logger.warning("auto_memory: nothing fits %.0f GiB; trying %s anyway (%.1f GiB estimated):\n%s", vram,
                       chosen.label(), estimate.total, plan.table())
    logger.info("auto_memory for full fine-tuning on %.0f GiB, %dx%dx%d: %s (%.1f GiB estimated per process)", vram,
                width, height, frames, chosen.label(), estimate.total)
    PLANNED["settings"] = chosen.label()
    memory, finetune = plan.apply(cfg.memory, ft)
    return validate(replace(cfg, memory=memory, finetune=finetune))

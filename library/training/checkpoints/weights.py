"""The weight files of a save: an expert's LoRA (Kohya or ComfyUI keys) or, with full fine-tuning, its
whole DiT, each with the metadata other tools read (Kohya `ss_*` run facts, the SAI model spec, the
resolved config)."""

from __future__ import annotations

import json
import logging
import math
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

from library.config import config_to_dict
from library.config.schema import TrainConfig
from library.wan.variants import WanVariant
from networks.lora_wan import build_lora_metadata as wan_metadata

from ..dtypes import SAVE_DTYPES
from ..files import disk_full, out_of_space
from .state import newest_state_note

logger = logging.getLogger(__name__)


def save_weights(expert, path: Path, cfg: TrainConfig, variant: WanVariant, state, facts: dict,
                 write: bool = True) -> None:
    """The expert's LoRA file, or with full fine-tuning its whole DiT. Sharded, every process calls this
    (the weights are gathered together) and the one with `write` writes. A full disk is a `DiskFullError`
    naming the disk and the space needed; the file written before under that name is kept."""
    if not write:
        expert.network.save_weights(path, write=False)
        return
    try:
        if cfg.finetune.full_fine_tune:
            meta = {**facts, **model_metadata(variant, None if expert.name == "dit" else expert.name, cfg, state,
                                              expert.learning_rate)}
            dtype = SAVE_DTYPES[cfg.saving.save_precision] if cfg.saving.save_precision else torch.bfloat16
            expert.network.save_weights(path, dtype=dtype, metadata=meta, fmt=cfg.finetune.save_model_format)
        else:
            meta = build_lora_metadata(cfg, variant, expert, state, facts)
            expert.network.save_weights(path, dtype=SAVE_DTYPES[cfg.saving.save_precision], metadata=meta,
                                        fmt=cfg.saving.save_lora_format)
    except Exception as exc:
        need = _file_bytes(expert, cfg)
        if out_of_space(exc, Path(path).parent, need):
            raise disk_full(Path(path).parent, Path(path).name, need,
                            newest_state_note(Path(path).parent, cfg.saving.output_name or None)) from None
        raise
    logger.info("saved %s", path)


def _file_bytes(expert, cfg: TrainConfig) -> int:
    """About the size of the expert's weight file: its tensors at the saved precision."""
    full, precision = cfg.finetune.full_fine_tune, cfg.saving.save_precision
    size = torch.empty((), dtype=SAVE_DTYPES[precision] if precision or not full else torch.bfloat16).element_size()
    model = getattr(expert.network, "model", None) if full else None
    tensors = (model.state_dict() if model is not None else expert.network.state_dict()).values()
    return sum(t.numel() * size for t in tensors)


def run_facts(cfg: TrainConfig, data, optimizer, total: int, world: int) -> dict[str, str]:
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


def build_lora_metadata(cfg: TrainConfig, variant: WanVariant, expert, state,
                        facts: dict | None = None) -> dict:
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


def model_metadata(variant, expert: str | None, cfg, state, learning_rate: float) -> dict[str, str]:
    """The header of a fully fine-tuned DiT file: the SAI model spec (architecture without `/lora`), what
    was trained and how, and the resolved config."""
    s = cfg.saving
    meta = {
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": f"wan{variant.version}-{variant.name.lower()}",
        "modelspec.implementation": f"https://github.com/Wan-Video/Wan{variant.version}",
        "modelspec.title": s.metadata_title or s.output_name or "WAN fine-tune",
        "modelspec.date": datetime.fromtimestamp(state.started_at, timezone.utc).strftime("%Y-%m-%dT%H:%M:%S"),
        "ss_base_model_version": f"wan{variant.version}_{variant.name}",
        "ss_training_type": "full_fine_tune",
        "ss_steps": str(state.global_step), "ss_epoch": str(state.epoch), "ss_seed": str(state.seed),
        "ss_learning_rate": str(learning_rate), "ss_optimizer": cfg.optimizer.optimizer_type,
        "ss_training_started_at": str(state.started_at), "ss_training_finished_at": str(time.time()),
    }
    if expert:
        meta["ss_expert"] = expert
    for key, value in (("modelspec.author", s.metadata_author), ("modelspec.description", s.metadata_description),
                       ("modelspec.license", s.metadata_license), ("modelspec.tags", s.metadata_tags),
                       ("ss_training_comment", s.training_comment)):
        if value:
            meta[key] = str(value)
    if not s.no_metadata:
        meta["ss_training_config"] = json.dumps(config_to_dict(cfg), default=str)
    return meta

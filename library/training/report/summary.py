"""The run's facts for its report, as `run_summary.json` in the output folder (written by the trainer at
the start, at every save and at the end, so the report can be rebuilt from the folder alone): task and
experts, dataset counts and buckets, key hyperparameters and preset, steps, time per step, peak memory,
the start-of-run advice and the run's status."""

from __future__ import annotations

import json
import resource
import sys
import time
from collections import Counter
from pathlib import Path

from ..files import atomic_write_bytes

SUMMARY_FILE = "run_summary.json"
KEY_SETTINGS = ("preset", "network_module", "network_dim", "network_alpha", "learning_rate", "optimizer_type",
                "lr_scheduler", "lr_warmup_steps", "lr_scheduler_num_cycles", "max_train_epochs", "max_train_steps",
                "gradient_accumulation_steps", "max_grad_norm", "mixed_precision", "timestep_sampling",
                "discrete_flow_shift", "timestep_boundary", "network_dropout", "full_fine_tune",
                "gradient_checkpointing", "fp8_base", "blocks_to_swap", "validate_every_n_steps",
                "save_every_n_steps", "seed")


def peak_memory(device) -> tuple[str, float | None]:
    """(what was measured, GiB): the accelerator's peak allocation, or this process's peak resident memory."""
    import torch

    if getattr(device, "type", "") == "cuda" and torch.cuda.is_available():
        return "peak GPU memory allocated", torch.cuda.max_memory_allocated(device) / 2**30
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return "peak process memory (RSS)", rss / (2**30 if sys.platform == "darwin" else 2**20)


def build_summary(trainer, status: str) -> dict:
    """The summary of a `Trainer` (read by attribute; nothing here imports the loop)."""
    from library.config import config_to_dict

    cfg, data, state = trainer.cfg, trainer.data, trainer.committed
    settings = config_to_dict(cfg)
    images, clips = data.sample_counts()
    buckets = Counter("x".join(map(str, item.bucket)) for ds in data.datasets for item in ds.items)
    memory_kind, memory = peak_memory(trainer.device)
    advice_lines, advice_warnings = getattr(trainer, "advice", ([], []))
    return {
        "status": status, "updated": time.strftime("%Y-%m-%d %H:%M:%S"),
        "output_name": trainer.run_info.output_name, "task": cfg.model.task,
        "training": "full fine-tuning" if cfg.finetune.full_fine_tune else "LoRA",
        "experts": [{"name": e.name, "timesteps": [e.sampler.min_timestep, e.sampler.max_timestep],
                     "learning_rate": e.learning_rate, "rank": e.network_dim} for e in trainer.experts],
        "dataset": {"images": images, "clips": clips, "buckets": dict(sorted(buckets.items())),
                    "validation_items": sum(len(ds.items) for ds in data.validation),
                    "batches_per_epoch": data.batches_per_epoch, "dataset_config": cfg.run.dataset_config},
        "settings": {k: settings[k] for k in KEY_SETTINGS if k in settings},
        "steps": {"done": state.global_step, "total": trainer.opt.total_steps, "epoch": state.epoch,
                  "seconds_per_step": None,  # the median of the recent steps (set by the reporter)
                  "elapsed_seconds": time.time() - state.started_at},
        "memory": {"what": memory_kind, "gib": memory, "device": str(trainer.device)},
        "advice": {"lines": list(advice_lines), "warnings": list(advice_warnings)},
        "diagnoses": [{"step": d.step, "kind": d.kind, "message": d.message} for d in trainer.monitor.found],
    }


def write_summary(folder: Path, summary: dict) -> Path:
    path = Path(folder) / SUMMARY_FILE
    atomic_write_bytes(path, json.dumps(summary, indent=2, default=str).encode("utf-8"))
    return path


def read_summary(folder: Path) -> dict:
    """The folder's run_summary.json, or {} when there is none or it cannot be read."""
    try:
        return json.loads((Path(folder) / SUMMARY_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}

"""A run's identity and process setup: the accelerator (processes, mixed precision, trackers), the seed,
the output folder and name, and where the run is (`RunState`, saved with every state)."""

from __future__ import annotations

import os
import random
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch

from library.config import ConfigError, config_to_dict
from library.config.schema import TrainConfig

from .dtypes import BASE_DTYPES, SAVE_DTYPES


@dataclass
class RunState:
    """Where the run is; saved with every state and restored on resume."""

    seed: int = 0
    global_step: int = 0
    epoch: int = 0  # completed epochs
    batch_in_epoch: int = 0  # batches of the current epoch already consumed (at the last optimizer step)
    sequence_parallel: int = 1  # processes per sample (`sequence_parallel_size`); a resume must use the same
    started_at: float = field(default_factory=time.time)

    @classmethod
    def restore(cls, saved: dict) -> RunState:
        """A saved position (`asdict` of one); keys this version does not know are ignored."""
        return cls(**{f.name: saved[f.name] for f in fields(cls) if f.name in saved})

    def info(self, cfg: TrainConfig) -> dict:
        return {**asdict(self), "task": cfg.model.task, "output_name": cfg.saving.output_name}


@dataclass(frozen=True)
class RunInfo:
    seed: int
    output_dir: Path
    output_name: str
    base_dtype: torch.dtype
    save_dtype: torch.dtype


def make_accelerator(cfg: TrainConfig):
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    for kind, flag in (("DeepSpeed", "ACCELERATE_USE_DEEPSPEED"), ("FSDP", "ACCELERATE_USE_FSDP")):
        if os.environ.get(flag, "").lower() in ("1", "true"):
            raise RuntimeError(
                f"accelerate was launched with a {kind} config ({flag}), which this trainer does not use: LoRA "
                "training is plain data parallel, and full fine-tuning shards itself with `fsdp = true`. Launch with "
                "a multi-GPU config instead: `accelerate launch --multi_gpu --num_processes N ...`"
            )
    if int(os.environ.get("WORLD_SIZE", "1")) == 1:
        # a single process may run several trainings (a notebook, a sweep, the tests): forget the previous
        # run's process-wide accelerate state so this one may use other settings (mixed precision, cpu)
        AcceleratorState._reset_state(reset_partial_state=True)
    log = cfg.logging
    log_with = log.log_with or ("tensorboard" if log.logging_dir else None)
    project_dir = log.logging_dir or (str(Path(cfg.saving.output_dir or "output") / "logs") if log_with else None)
    # several processes without CUDA: data parallel on the CPU over gloo (accelerate needs cpu=True for it)
    cpu = not torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1
    _check_launcher_dynamo()
    handlers = []
    if cfg.loop.ddp_timeout:  # musubi's `ddp_timeout`: minutes the processes wait for each other
        from datetime import timedelta

        from accelerate.utils import InitProcessGroupKwargs

        handlers.append(InitProcessGroupKwargs(timeout=timedelta(minutes=cfg.loop.ddp_timeout)))
    acc = Accelerator(mixed_precision=cfg.loop.mixed_precision, log_with=log_with, project_dir=project_dir, cpu=cpu,
                      kwargs_handlers=handlers)
    if log_with:
        name = (log.log_prefix or "") + (log.log_tracker_name or "network_train")
        acc.init_trackers(name, config=_tracker_config(cfg), init_kwargs=_tracker_init(log))
    return acc


def _tracker_init(log) -> dict:
    """The trackers' init arguments: `log_tracker_config` (a TOML of {tracker: {argument: value}}, as in
    musubi-tuner) and `wandb_run_name`."""
    init: dict = {}
    if log.log_tracker_config:
        import toml

        try:
            init = toml.load(Path(log.log_tracker_config).expanduser())
        except (OSError, ValueError) as exc:
            raise ConfigError(f"log_tracker_config {log.log_tracker_config}: cannot be read as TOML ({exc})") from None
    if log.wandb_run_name:
        init.setdefault("wandb", {})["name"] = log.wandb_run_name
    return init


def _check_launcher_dynamo() -> None:
    """`accelerate launch --dynamo_backend X` (musubi-tuner-gui passes `no`) would compile a model handed to
    accelerate's prepare(), which this trainer never does: say so instead of training uncompiled."""
    backend = os.environ.get("ACCELERATE_DYNAMO_BACKEND", "no")
    if backend.strip().lower() not in ("no", ""):
        raise ConfigError(f"accelerate was launched with --dynamo_backend {backend}, which this trainer does not use: "
                          "launch with --dynamo_backend no and set `compile = true` (`compile_backend`, "
                          "`compile_mode`) in the config to compile the DiT blocks")


def _tracker_config(cfg: TrainConfig) -> dict:
    """The config as flat scalars (TensorBoard hparams and wandb accept only those)."""
    return {k: (v if isinstance(v, (int, float, str, bool)) else str(v))
            for k, v in config_to_dict(cfg).items() if v is not None}


def resolve_run(cfg: TrainConfig, accelerator) -> RunInfo:
    seed = cfg.loop.seed if cfg.loop.seed is not None else random.SystemRandom().randrange(1 << 31)
    output_dir = Path(cfg.saving.output_dir or "output").expanduser()
    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
    default_name = "wan_finetune" if cfg.finetune.full_fine_tune else "wan_lora"
    return RunInfo(seed=seed, output_dir=output_dir, output_name=cfg.saving.output_name or default_name,
                   base_dtype=BASE_DTYPES[cfg.loop.mixed_precision],
                   save_dtype=SAVE_DTYPES[cfg.saving.save_precision])

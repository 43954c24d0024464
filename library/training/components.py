"""The parts a training run is assembled from, built from a `TrainConfig`: the accelerator, the run's
identity (seed, output folder, dtypes), the cached data, and the experts with their LoRA networks (or,
for full fine-tuning, their own trainable weights). The optimisation state lives in `optimization.py`.

Kept apart from `trainer.py` so that the loop stays one screen and each piece is testable alone.
"""

from __future__ import annotations

import logging
import os
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from library.config.schema import TrainConfig
from library.wan.loading import load_dit
from library.wan.variants import WanVariant

from .base_weights import assign_base_weights, merge_base_weights
from .compiling import compile_blocks, set_cuda_flags
from .experts import Expert, boundary_of, expert_ranges, make_samplers
from .flow_matching import TimestepSampler

logger = logging.getLogger(__name__)

BASE_DTYPES = {"no": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
SAVE_DTYPES = {None: torch.float32, "float": torch.float32, "fp32": torch.float32, "fp16": torch.float16,
               "bf16": torch.bfloat16}


@dataclass
class RunState:
    """Where the run is; saved with every state and restored on resume."""

    seed: int = 0
    global_step: int = 0
    epoch: int = 0  # completed epochs
    batch_in_epoch: int = 0  # batches of the current epoch already consumed (at the last optimizer step)
    started_at: float = field(default_factory=time.time)

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
    acc = Accelerator(mixed_precision=cfg.loop.mixed_precision, log_with=log_with, project_dir=project_dir, cpu=cpu)
    if log_with:
        name = (log.log_prefix or "") + (log.log_tracker_name or "network_train")
        init = {"wandb": {"name": log.wandb_run_name}} if log.wandb_run_name else {}
        acc.init_trackers(name, config=_tracker_config(cfg), init_kwargs=init)
    return acc


def _tracker_config(cfg: TrainConfig) -> dict:
    """The config as flat scalars (TensorBoard hparams and wandb accept only those)."""
    from library.config import config_to_dict

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


# ---- data -------------------------------------------------------------------------------------------


class _Batches(torch.utils.data.Dataset):
    """This process's share of the epoch's batches; item i is a collated batch."""

    def __init__(self, datasets, batches, collate, epoch: int):
        self.datasets, self.batches, self.collate, self.epoch = datasets, batches, collate, epoch

    def __len__(self):
        return len(self.batches)

    def __getitem__(self, i):
        return self.collate([self.datasets[d].get(j, self.epoch) for d, j in self.batches[i]])


@dataclass
class TrainData:
    datasets: list
    seed: int
    rank: int
    world: int
    workers: int
    batches_per_epoch: int = 0
    validation: list = field(default_factory=list)  # validation datasets (may be empty)
    read_ahead: bool = False  # prefetch batches in a thread (when training on a GPU)

    def sample_counts(self) -> tuple[int, int]:
        """(images, clips) over the training datasets, repeats not counted."""
        images = sum(item.is_image for ds in self.datasets for item in ds.items)
        return images, sum(len(ds.items) for ds in self.datasets) - images

    def validation_batches(self) -> list[dict]:
        """Every validation item in bucket-pure batches, in a fixed order (epoch 0, no shuffling effects)."""
        from library.data.datasets import collate, make_batches

        if not self.validation:
            return []
        batches = sorted(make_batches(self.validation, 0, 0))
        return [collate([self.validation[d].get(j, 0) for d, j in batch]) for batch in batches]

    def epoch_batches(self, epoch: int) -> list:
        from library.data.datasets import make_batches

        batches = make_batches(self.datasets, self.seed, epoch)
        usable = len(batches) - len(batches) % self.world  # every process takes the same number of steps
        return batches[self.rank:usable:self.world]

    def loader(self, epoch: int, skip: int = 0):
        """The epoch's batches from `skip` on: a DataLoader with worker processes, else read in this
        process (ahead, in a thread, when training on a GPU)."""
        from library.data.datasets import collate

        view = _Batches(self.datasets, self.epoch_batches(epoch)[skip:], collate, epoch)
        if not self.workers:  # in-process loading without DataLoader machinery
            batches = (view[i] for i in range(len(view)))
            # on a GPU the Python thread mostly waits for kernels: read the next batch meanwhile; on the CPU the
            # model already uses every core and a reader thread only contends with it
            return prefetch(batches) if self.read_ahead else batches
        return torch.utils.data.DataLoader(view, batch_size=None, shuffle=False, num_workers=self.workers)


def prefetch(iterable, depth: int = 2):
    """Iterate `iterable` in a daemon thread, `depth` items ahead; exceptions surface in the caller."""
    import queue
    import threading

    q: queue.Queue = queue.Queue(maxsize=depth)
    done = object()

    def work():
        try:
            for item in iterable:
                q.put(item)
            q.put(done)
        except BaseException as exc:  # noqa: BLE001 - re-raised in the consumer
            q.put(exc)

    threading.Thread(target=work, daemon=True, name="batch-prefetch").start()
    while True:
        item = q.get()
        if item is done:
            return
        if isinstance(item, BaseException):
            raise item
        yield item


def build_data(cfg: TrainConfig, variant: WanVariant, accelerator, seed: int) -> TrainData:
    from library.data.dataset_config import load_dataset_config
    from library.data.datasets import build_train_datasets

    if not cfg.run.dataset_config:
        raise ValueError("dataset_config is not set: pass the dataset TOML (--dataset_config)")
    datasets = build_train_datasets(load_dataset_config(cfg.run.dataset_config), cfg.model.task, seed=seed)
    for ds in datasets:
        ds.check_caches()
        if variant.is_i2v and any(item.is_image for item in ds.items):
            raise ValueError(
                f"{ds.spec.where()}: {variant.name} is image-to-video and learns the frames that follow the "
                "first one; single images give it nothing to learn (the first frame is its own target). Use "
                "clips for I2V, or train a T2V / TI2V task on images"
            )
    workers = min(cfg.loop.max_data_loader_n_workers, os.cpu_count() or 1)
    data = TrainData(datasets, seed, accelerator.process_index, accelerator.num_processes, workers,
                     read_ahead=accelerator.device.type == "cuda")
    config = load_dataset_config(cfg.run.dataset_config)
    if config.validation:
        data.validation = build_train_datasets(config, cfg.model.task, validation=True, seed=seed)
        for ds in data.validation:
            ds.check_caches()
    data.batches_per_epoch = len(data.epoch_batches(0))
    if data.batches_per_epoch == 0:
        raise ValueError(f"{cfg.run.dataset_config}: not enough cached items for one batch per process")
    return data


# ---- experts and networks ---------------------------------------------------------------------------


def _attach_network(expert: Expert, cfg: TrainConfig, device, share_with: Expert | None = None) -> None:
    """Create the expert's LoRA through the Kohya entry point (WAN targets and default excludes), tie it
    to `share_with` for a shared LoRA, or start it from `network_weights`; then attach the hooks."""
    from networks import lora_wan

    n = cfg.network
    if cfg.finetune.full_fine_tune:
        _attach_full(expert, cfg, device)
        return
    if n.network_weights and n.dim_from_weights and share_with is None:
        net, weights = lora_wan.create_network_from_weights(1.0, n.network_weights, None, None, expert.model,
                                                            **n.network_args)
        net.load_weights(weights)
        expert.network_dim = max(lo.lora_dim for lo in net.loras)
    else:
        alpha = n.network_alpha or expert.network_dim
        net = lora_wan.create_network(1.0, expert.network_dim, alpha, None, None, expert.model,
                                      neuron_dropout=n.network_dropout, **n.network_args)
        if share_with is not None:  # one LoRA for both experts: the same Parameters on both models
            for mine, theirs in zip(net.loras, share_with.network.loras):
                mine.lora_down.weight, mine.lora_up.weight = theirs.lora_down.weight, theirs.lora_up.weight
        elif n.network_weights:
            net.load_weights(n.network_weights)
    net.apply_to()
    expert.network = net


def _attach_full(expert: Expert, cfg: TrainConfig, device) -> None:
    """Full fine-tuning: the expert's own weights train (fp32 masters, or bf16 with `full_bf16`), sharded
    over the processes with `fsdp`."""
    from .full import FullNetwork, select_trainable, shard_model

    ft = cfg.finetune
    names = select_trainable(expert.model, ft.trainable_patterns, ft.frozen_patterns)
    compute = BASE_DTYPES[cfg.loop.mixed_precision]
    master = None if ft.full_bf16 else torch.float32
    frozen = compute if compute != torch.float32 else None
    if sharding(cfg):
        shard_model(expert.model, names, master, frozen, torch.device(device), ft.fsdp_cpu_offload)
    expert.network = FullNetwork(expert.model, names, master, frozen)
    expert.network_dim = 0
    if compute != torch.float32:
        expert.model.compute_dtype = compute  # fp32 masters, bf16 / fp16 maths under autocast


def sharding(cfg: TrainConfig) -> bool:
    """`fsdp` with more than one process (one process has nothing to shard across)."""
    import torch.distributed as dist

    return bool(cfg.finetune.full_fine_tune and cfg.finetune.fsdp and dist.is_available() and dist.is_initialized()
                and dist.get_world_size() > 1)


def resolve_memory(cfg: TrainConfig, variant: WanVariant, data: TrainData, device, n_experts: int):
    """The memory settings to use: the configured ones, or with `auto_memory` the planner's choice for
    this card and the largest bucket of the dataset."""
    if not cfg.memory.auto_memory:
        return cfg.memory
    from .memory_plan import detect_vram_gb, plan_memory

    vram = detect_vram_gb(device)
    if vram is None:
        logger.warning("auto_memory: no CUDA device, keeping the configured memory settings")
        return cfg.memory
    width, height, frames, batch = largest_bucket(data)
    plan = plan_memory(vram, variant, width, height, frames, batch, cfg.network.network_dim,
                       cfg.optimizer.optimizer_type, experts=n_experts)
    logger.info("auto_memory plan for %.0f GiB:\n%s", vram, plan.table())
    return plan.apply(cfg.memory)


def largest_bucket(data: TrainData) -> tuple[int, int, int, int]:
    """(width, height, frames, batch size) of the most expensive batch the datasets can produce."""
    width, height, frames = max((item.bucket for ds in data.datasets for item in ds.items),
                                key=lambda b: b[0] * b[1] * b[2])
    return width, height, frames, max(ds.batch_size for ds in data.datasets)


def auto_full_settings(cfg: TrainConfig, variant: WanVariant, data: TrainData, device, processes: int) -> TrainConfig:
    """`auto_memory` for full fine-tuning: the first rung of the planner's full fine-tuning ladder that fits
    this card at the dataset's largest bucket and that this config allows (no fused pass with gradient
    accumulation or fp16, no full_bf16 without bf16, no fsdp with samples during training)."""
    from dataclasses import replace as copy

    from library.config import validate

    from .memory_plan import detect_vram_gb
    from .memory_plan_full import plan_full

    vram = detect_vram_gb(device)
    if vram is None:
        logger.warning("auto_memory: no CUDA device, keeping the configured memory settings")
        return cfg
    width, height, frames, batch = largest_bucket(data)
    ft, loop, s = cfg.finetune, cfg.loop, cfg.sampling
    sampling = bool(s.sample_every_n_steps or s.sample_every_n_epochs or s.sample_at_first)

    def allowed(c) -> bool:
        no_fused = loop.gradient_accumulation_steps > 1 or loop.mixed_precision == "fp16"
        return not ((c.fused_backward_pass and no_fused) or (c.full_bf16 and loop.mixed_precision != "bf16")
                    or (c.fsdp and sampling))

    plan = plan_full(vram, variant, width, height, frames, batch, cfg.optimizer.optimizer_type, processes,
                     2 if cfg.model.dit_high_noise else 1, ft.trainable_patterns, ft.frozen_patterns, allow=allowed)
    chosen, estimate = plan.settings, plan.estimate
    if not plan.fits:
        logger.warning("auto_memory: nothing fits %.0f GiB (%.1f GiB estimated with %s); trying it anyway", vram,
                       estimate.total, chosen.label())
    logger.info("auto_memory for full fine-tuning on %.0f GiB, %dx%dx%d: %s (%.1f GiB estimated per process)", vram,
                width, height, frames, chosen.label(), estimate.total)
    memory, finetune = plan.apply(cfg.memory, ft)
    return validate(copy(cfg, memory=memory, finetune=finetune))


def build_experts(cfg: TrainConfig, variant: WanVariant, info: RunInfo, device, data: TrainData) -> list[Expert]:
    from .memory import apply_memory_features, fp8_config

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
    for i, expert in enumerate(experts):
        _attach_network(expert, cfg, device, experts[0] if cfg.network.shared_expert_lora and i else None)
        expert.network.to(device)  # LoRA weights always live on the accelerator, swapped blocks or not
        compile_blocks(expert.model, cfg.compilation)  # after the LoRA hooks, so the graphs include them
        logger.info("expert %s: %s, timesteps %g-%g, lr %g, %s", expert.name, expert.model.variant.name,
                    expert.sampler.min_timestep, expert.sampler.max_timestep, expert.learning_rate,
                    "full fine-tuning" if full else f"rank {expert.network_dim}")
    return experts


def base_sampler(cfg: TrainConfig) -> TimestepSampler:
    t = cfg.timesteps
    return TimestepSampler(
        method=t.timestep_sampling, shift=t.discrete_flow_shift, sigmoid_scale=t.sigmoid_scale,
        logit_mean=t.logit_mean, logit_std=t.logit_std, mode_scale=t.mode_scale,
        weighting_scheme=t.weighting_scheme,
        min_timestep=0.0 if t.min_timestep is None else float(t.min_timestep),
        max_timestep=1000.0 if t.max_timestep is None else float(t.max_timestep),
        preserve_distribution_shape=t.preserve_distribution_shape,
    )

"""The memory planner for full fine-tuning (`tools/plan_memory.py --full`, a config with
`full_fine_tune = true`): per process, the weights, gradients and optimizer state as exact sums over the
model's tensors, activations and workspace at the peak of a step (end of the forward pass, backward pass,
optimizer step), with `full_bf16`, `fused_backward_pass`, `fsdp` and `fsdp_cpu_offload`, and a ladder of
settings from fastest to most frugal. The LoRA planner and the shared constants are in `memory_plan.py`.

The ladder, from fastest and most precise to most frugal; with several processes the sharded rungs follow:

    1 fp32 master weights              6 fsdp, fp32 masters + checkpointing
    2 fp32 masters + checkpointing     7 fsdp, full_bf16 + checkpointing
    3 full_bf16 + checkpointing        8 fsdp, full_bf16 + checkpointing + activation offload
    4 ... + fused_backward_pass        9 ... + fsdp_cpu_offload (shards and optimizer state in host memory)
    5 ... + activation offload

Host RAM: `plan_full(host_ram_gb=...)` (auto_memory: MemAvailable shared among the node's processes,
`host.detect_host_ram_gb`) skips every rung whose host memory per process, `FullEstimate.host`, is more than
`HOST_FRACTION` of it ("no: host RAM" in the table): the offloaded block inputs (L - 1 of them, the last
block's stays on the GPU) and with fsdp_cpu_offload this process's own shards (each local process holds its
1 / N, so the node holds its processes' share of the whole) of the weights and gradients, page-locked and
rounded up to powers of two by torch's host allocator, and its shards of the optimizer state.

Its weight, gradient and optimizer-state bytes are exact sums over the DiT's tensors (a meta-device model),
checked against a real optimizer step in tests/memory/test_plan.py; its activation and workspace figures
are the LoRA ones re-measured for trainable weights (ACT_FULL_PER_C), still estimates at full size.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from dataclasses import dataclass
from typing import Callable

import torch

from library.training.engines.parameters import select_trainable
from library.wan.model import WanModel
from library.wan.vace import build_dit
from library.wan.variants import WanVariant, get_variant

from .host import HOST_FRACTION
from .lora import CUDA_CONTEXT_GIB, FIXED_WORKSPACE_GIB, FRAGMENTATION, GIB, WORK_PER_C, WORK_PER_F, Workload
from .table import full_table

# Saved for backward by one block whose own weights train, per token (measured like ACT_PER_C, on fp32
# weights under bf16 autocast with a trainable timestep embedding): 19 C more than a LoRA block without its
# rank term, for the normalised inputs that the gradients of the norms, the modulation and the gates need
# (62.3-62.5 C measured; 65 before the gates kept their input in the compute dtype instead of an fp32 copy).
ACT_FULL_PER_C, ACT_FULL_PER_F = 63, 4
# Optimizer states per element in the parameter's own dtype (4 bytes for fp32 masters, 2 with full_bf16).
OPTIMIZER_STATES = {"adamw": 2, "adam": 2, "lion": 1, "prodigy": 4, "sgd": 0, "sgdnesterov": 1}
# bitsandbytes 8-bit states, 1 byte per element each, plus an fp32 absmax per block of 256; tensors under
# 4096 elements keep fp32 states.
OPTIMIZER_8BIT = {"adamw8bit": 2, "adam8bit": 2, "pagedadamw8bit": 2, "lion8bit": 1}
# Temporaries of the optimizer step. torch's AdamW on CUDA defaults to its multi-tensor (foreach) step, which
# allocates one tensor list the size of a state (sqrt(v)) for every tensor it steps at once; the others loop
# over the tensors, with this many fp32 copies of the tensor being stepped.
FOREACH_STEP = ("adamw", "adam")
STEP_TEMPS = {"adafactor": 4, "lion": 1, "prodigy": 2, "sgd": 0, "sgdnesterov": 0}
AVERAGING_BUCKET = 1 << 26  # elements per gradient-averaging collective without fsdp (Optimization.average_gradients)
# With fsdp, unsharded blocks on the GPU at once: the one computing and the one prefetched.
FSDP_GATHERED_BLOCKS = 2
# Autocast's weight cache would keep the bf16 copy of each trainable fp32 Linear / Conv weight for the whole
# forward pass, checkpointed or not, and under fsdp of the unsharded weight (measured on the CPU with FSDP2).
# The trainer autocasts full fine-tuning without the cache (Trainer.autocast_kwargs), so only the copies saved
# for backward by non-checkpointed layers remain.
AUTOCAST_WEIGHT_CACHE = False


@dataclass(frozen=True)
class FullWorkload(Workload):
    """A full fine-tuning job (`rank` is unused): the processes training together and the trainable set."""

    processes: int = 1
    trainable_patterns: tuple[str, ...] = ()
    frozen_patterns: tuple[str, ...] = ()


@dataclass(frozen=True)
class FullSettings:
    full_bf16: bool = False
    checkpointing: bool = False
    offload_activations: bool = False
    fused_backward_pass: bool = False
    fsdp: bool = False
    fsdp_cpu_offload: bool = False

    def apply(self, memory, finetune):
        """Copies of a `MemoryArgs` and a `FineTuneArgs` with these settings."""
        return (dataclasses.replace(memory, gradient_checkpointing=self.checkpointing,
                                    gradient_checkpointing_cpu_offload=self.offload_activations),
                dataclasses.replace(finetune, full_fine_tune=True, full_bf16=self.full_bf16,
                                    fused_backward_pass=self.fused_backward_pass, fsdp=self.fsdp,
                                    fsdp_cpu_offload=self.fsdp_cpu_offload))

    def label(self) -> str:
        parts = ["bf16" if self.full_bf16 else "fp32 masters"]
        if self.checkpointing:
            parts.append("ckpt" + ("+offload" if self.offload_activations else ""))
        if self.fused_backward_pass:
            parts.append("fused")
        if self.fsdp:
            parts.append("fsdp" + (" + cpu offload" if self.fsdp_cpu_offload else ""))
        return ", ".join(parts)


@dataclass(frozen=True)
class ParamInfo:
    name: str
    shape: tuple[int, ...]
    block: int  # the block index, -1 outside the blocks
    fp32: bool  # kept in fp32 whatever the training precision (WanModel.is_fp32_param)
    cast: bool  # a Linear / Conv parameter: autocast computes with a bf16 copy of it
    trainable: bool

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@functools.lru_cache(maxsize=32)
def param_inventory(v: WanVariant, include: tuple[str, ...] = (),
                    exclude: tuple[str, ...] = ()) -> tuple[ParamInfo, ...]:
    """Every DiT parameter (from a meta-device model) and whether it trains (`trainable_patterns` /
    `frozen_patterns`, chosen exactly as the trainer chooses them)."""
    with torch.device("meta"):
        model = build_dit(v)
    trainable = set(select_trainable(model, include, exclude))
    layers = (torch.nn.Linear, torch.nn.Conv3d)
    cast = {f"{m}.{p}".lstrip(".") for m, mod in model.named_modules() if isinstance(mod, layers)
            for p, _ in mod.named_parameters(recurse=False)}
    return tuple(ParamInfo(n, tuple(p.shape), int(n.split(".")[1]) if n.startswith("blocks.") else -1,
                           WanModel.is_fp32_param(n), n in cast, n in trainable) for n, p in model.named_parameters())


def optimizer_state_bytes(optimizer: str, shape: tuple[int, ...], dtype_bytes: int) -> int:
    """Bytes of optimizer state for one trainable tensor stored in `dtype_bytes` per element."""
    key, n = optimizer.lower().replace("_", ""), math.prod(shape)
    if key in OPTIMIZER_8BIT:
        return OPTIMIZER_8BIT[key] * (n + 4 * math.ceil(n / 256) if n >= 4096 else 4 * n)
    if key == "adafactor":  # transformers' Adafactor without beta1: fp32 row and column means, or a full
        if len(shape) < 2:  # second moment for vectors
            return 4 * n
        return 4 * (math.prod(shape[:-1]) + math.prod(shape[:-2]) * shape[-1])
    return OPTIMIZER_STATES.get(key, 2) * dtype_bytes * n


@dataclass(frozen=True)
class StateBytes:
    """Exact bytes of one expert's weights, gradients and optimizer state, unsharded, and the pieces the
    peak is built from."""

    weights: int
    grads: int  # every trainable tensor's gradient (the dtype of its weight)
    optimizer: int
    largest_grad: int  # the largest trainable tensor's gradient: all `fused_backward_pass` keeps at once
    block_weights: int  # the largest block's parameters (what fsdp gathers)
    block_grads: int
    outer_weights: int  # embeddings, time MLPs, head (fsdp's root: stays gathered through the step)
    outer_grads: int
    cast: int  # bf16 copies of the trainable fp32 Linear / Conv parameters that autocast computes with
    block_cast: int  # ... of the largest block
    outer_cast: int  # ... outside the blocks
    step: int  # the optimizer step's temporaries
    pinned_weights: int = 0  # fsdp_cpu_offload: one process's page-locked weight shards (see `pinned_shards`)
    pinned_grads: int = 0  # ... and gradient shards


def pinned_shards(params, stored: Callable[[ParamInfo], int], n: int) -> int:
    """Page-locked host bytes of one process's shards of `params` under fsdp_cpu_offload over `n` processes:
    FSDP2 pads each tensor's first dimension to a multiple of `n` and pins each shard with torch's caching host
    allocator, which rounds every allocation up to a power of two (`runtime/pinned.py`); the gradient shards
    come back into pinned memory too (a non-blocking copy to the CPU), cached from step to step. About 1.53
    times the exact shard bytes for A14B."""
    def shard(p: ParamInfo) -> int:
        rows = p.shape[0] if p.shape else 1
        return -(-rows // n) * math.prod(p.shape[1:]) * stored(p)

    return sum(1 << (shard(p) - 1).bit_length() for p in params if shard(p))


@functools.lru_cache(maxsize=256)
def state_bytes(w: FullWorkload, s: FullSettings) -> StateBytes:
    params = param_inventory(w.variant, tuple(w.trainable_patterns), tuple(w.frozen_patterns))
    master, n = 2 if s.full_bf16 else 4, w.processes if s.fsdp else 1

    def stored(p: ParamInfo) -> int:  # frozen weights are bf16 unless the model keeps them in fp32
        return 4 if p.fp32 else (master if p.trainable else 2)

    train = [p for p in params if p.trainable]
    copied = [p for p in train if p.cast and stored(p) == 4]

    def per_block(items, size) -> tuple[int, int]:  # (the largest block's sum, the sum outside the blocks)
        blocks: dict[int, int] = {}
        for p in items:
            blocks[p.block] = blocks.get(p.block, 0) + size(p)
        outer = blocks.pop(-1, 0)
        return max(blocks.values(), default=0), outer

    block_w, outer_w = per_block(params, lambda p: p.numel * stored(p))
    block_g, outer_g = per_block(train, lambda p: p.numel * stored(p))
    block_c, outer_c = per_block(copied, lambda p: 2 * p.numel)
    largest = max(train, key=lambda p: p.numel * stored(p))
    key = w.optimizer.lower().replace("_", "")
    if key in FOREACH_STEP and not s.fsdp_cpu_offload:  # torch steps host tensors one at a time
        step = largest.numel * stored(largest) if s.fused_backward_pass else sum(p.numel * stored(p) for p in train)
    else:
        step = 0 if key in OPTIMIZER_8BIT else STEP_TEMPS.get(key, 2) * 4 * largest.numel
    return StateBytes(
        weights=sum(p.numel * stored(p) for p in params), grads=sum(p.numel * stored(p) for p in train),
        optimizer=sum(optimizer_state_bytes(w.optimizer, p.shape, stored(p)) for p in train),
        largest_grad=largest.numel * stored(largest), block_weights=block_w, block_grads=block_g,
        outer_weights=outer_w, outer_grads=outer_g, cast=sum(2 * p.numel for p in copied), block_cast=block_c,
        outer_cast=outer_c, step=step, pinned_weights=pinned_shards(params, stored, n) if s.fsdp_cpu_offload else 0,
        pinned_grads=pinned_shards(train, stored, n) if s.fsdp_cpu_offload else 0)


@dataclass(frozen=True)
class FullEstimate:
    """GiB per process at the peak of a step (`peak`: the end of the forward pass, the backward pass or the
    optimizer step); `host` is the host RAM the process holds for the GPU (offloaded shards, activations)."""

    weights: float
    grads: float
    optimizer: float
    copies: float  # bf16 copies autocast keeps, fsdp's gathered blocks and unsharded block gradients
    activations: float
    workspace: float  # backward-pass transients, the optimizer step's temporaries, kernel workspaces
    host: float
    peak: str

    @property
    def total(self) -> float:
        return self.weights + self.grads + self.optimizer + self.copies + self.activations + self.workspace


def estimate_full(w: FullWorkload, s: FullSettings) -> FullEstimate:
    """The peak GPU memory of one process: the largest of the three moments of a step (see FullEstimate)."""
    v, t, b, layers = w.variant, w.local_tokens, w.batch_size, w.variant.num_layers
    c, f = v.dim, v.ffn_dim
    sb = state_bytes(w, s)
    n = w.processes if s.fsdp else 1
    on_gpu = 0 if s.fsdp_cpu_offload else 1
    weights, optim = w.experts * sb.weights / n * on_gpu, w.experts * sb.optimizer / n * on_gpu
    gathered = FSDP_GATHERED_BLOCKS * sb.block_weights + sb.outer_weights if s.fsdp else 0
    # activations: LoRA's rules with the full fine-tuning coefficients
    per_block = (ACT_FULL_PER_C * c + ACT_FULL_PER_F * f) * t * b + w.gathered_bytes()
    block_input = 4 * c * t * b  # what checkpointing keeps of a block: its fp32 input
    context = 16 * c * v.text_len * b * (1 if s.checkpointing else layers)
    shared = (4 * v.head_dim + 4 * c) * t * b
    work = (WORK_PER_C * c + WORK_PER_F * f) * t * b + FIXED_WORKSPACE_GIB * GIB + sb.largest_grad + w.split_bytes()
    if s.checkpointing:  # kept per block through the backward pass: (activations, bf16 copies)
        kept, kept_copies = (0 if s.offload_activations else block_input), 0
        fixed = per_block + (2 * block_input if s.offload_activations else 0)  # the recomputed block, inputs in flight
        fixed_copies = sb.block_cast
    else:
        kept, kept_copies, fixed, fixed_copies = per_block, sb.block_cast, 0, 0
    # host memory, this process's share: every block input but the last one's (`memory.BlockRunner`: the
    # backward pass needs it first, it stays with the two in flight in `fixed`) in exact-size pinned buffers;
    # with fsdp_cpu_offload its own shards (pinned, see `pinned_shards`), optimizer state and step temporaries
    host = (layers - 1) * block_input if s.checkpointing and s.offload_activations else 0
    step = sb.step / n
    if s.fsdp_cpu_offload:
        host += w.experts * (sb.pinned_weights + sb.optimizer / n) + sb.pinned_grads + step
    # the end of the forward pass: autocast's cache holds a bf16 copy of every trainable fp32 weight; without
    # the cache, the copies saved for backward (non-checkpointed layers) remain
    forward_copies = sb.cast if AUTOCAST_WEIGHT_CACHE or not s.checkpointing else sb.outer_cast
    moments = [FullEstimate(weights, 0, optim, forward_copies + gathered, layers * kept + fixed + context + shared,
                            FIXED_WORKSPACE_GIB * GIB, host, "forward")]
    # backward: the first block to run it still has every block's kept tensors and one block's gradients; the
    # last has one block's kept tensors and every gradient
    in_flight = sb.outer_cast + fixed_copies + (gathered + sb.block_grads if s.fsdp else 0)
    if s.fused_backward_pass:
        early_grads = late_grads = 0  # only the tensor being stepped (in `work`), and its step temporaries
        work += step
    else:
        early_grads, late_grads = (sb.block_grads + sb.outer_grads) / n * on_gpu, sb.grads / n * on_gpu
    for stack, grads in ((layers, early_grads), (1, late_grads)):
        moments.append(FullEstimate(weights, grads, optim, in_flight + stack * kept_copies,
                                    stack * kept + fixed + context + shared, work, host, "backward"))
    if not s.fused_backward_pass:
        averaging = 2 * AVERAGING_BUCKET * (2 if s.full_bf16 else 4) if w.processes > 1 and not s.fsdp else 0
        moments.append(FullEstimate(weights, sb.grads / n * on_gpu, optim, 0, 0,
                                    step * on_gpu + averaging + FIXED_WORKSPACE_GIB * GIB, host, "step"))
    peak = max(moments, key=lambda e: e.total)
    sizes = ("weights", "grads", "optimizer", "copies", "activations", "workspace", "host")
    return dataclasses.replace(peak, **{k: getattr(peak, k) / GIB for k in sizes})


@dataclass(frozen=True)
class FullPlan:
    vram_gb: float
    budget_gb: float
    workload: FullWorkload
    settings: FullSettings
    estimate: FullEstimate
    fits: bool
    candidates: tuple[tuple[FullSettings, FullEstimate], ...]  # those tried, up to the plan
    hints: tuple[str, ...] = ()  # when nothing fits: what would
    host_gb: float | None = None  # host RAM per process the GPU's buffers may take (HOST_FRACTION of the given)
    margin_gb: float = 0.0  # held back after an out-of-memory error (planning/margin.py)

    def apply(self, memory, finetune):
        """Copies of a `MemoryArgs` and a `FineTuneArgs` with the planned settings."""
        return self.settings.apply(memory, finetune)

    def table(self) -> str:
        return full_table(self)


def full_candidates(processes: int) -> list[FullSettings]:
    """The full fine-tuning ladder of the module docstring: the sharded rungs only with several processes
    (fused_backward_pass and fsdp do not combine)."""
    ladder = [FullSettings(), FullSettings(checkpointing=True), FullSettings(True, True),
              FullSettings(True, True, fused_backward_pass=True), FullSettings(True, True, True, True)]
    if processes > 1:
        ladder += [FullSettings(checkpointing=True, fsdp=True), FullSettings(True, True, fsdp=True),
                   FullSettings(True, True, True, fsdp=True),
                   FullSettings(True, True, True, fsdp=True, fsdp_cpu_offload=True)]
    return ladder


def plan_full(vram_gb: float, variant: WanVariant | str, width: int, height: int, frames: int, batch_size: int = 1,
              optimizer: str = "adamw", processes: int = 1, experts: int = 1, trainable_patterns: tuple[str, ...] = (),
              frozen_patterns: tuple[str, ...] = (), show_all: bool = False,
              allow: Callable[[FullSettings], bool] | None = None, sequence_parallel: int = 1,
              gather_kv: bool = False, host_ram_gb: float | None = None, margin_gb: float = 0.0) -> FullPlan:
    """The first rung of the full fine-tuning ladder whose estimated peak per process fits the card and whose
    host memory (`FullEstimate.host`) fits `HOST_FRACTION` of `host_ram_gb`, the host RAM this process may use
    (None: not checked); when none does, the plan is the most frugal rung the host holds and says what would
    fit (another optimizer, more GPUs, fewer frames). `show_all` keeps every rung in the table, not only those
    tried; `allow` leaves out the rungs a config cannot use; `margin_gb` less than the card's memory."""
    variant = get_variant(variant) if isinstance(variant, str) else variant
    w = FullWorkload(variant, width, height, frames, batch_size, 0, optimizer, experts, processes=processes,
                     trainable_patterns=tuple(trainable_patterns), frozen_patterns=tuple(frozen_patterns),
                     sequence_parallel=sequence_parallel, gather_kv=gather_kv)
    budget = (vram_gb - CUDA_CONTEXT_GIB) * FRAGMENTATION - margin_gb
    host = None if host_ram_gb is None else host_ram_gb * HOST_FRACTION
    tried = [(s, estimate_full(w, s)) for s in full_candidates(processes) if allow is None or allow(s)]
    chosen = next((i for i, (_, e) in enumerate(tried) if _fits(e, budget, host)), None)
    if chosen is not None:
        s, e = tried[chosen]
        return FullPlan(vram_gb, budget, w, s, e, True, tuple(tried if show_all else tried[: chosen + 1]), (), host,
                        margin_gb)
    held = [(s, e) for s, e in tried if host is None or e.host <= host] or tried  # never more than the host holds
    s, e = held[-1]
    return FullPlan(vram_gb, budget, w, s, e, False, tuple(tried), _full_hints(budget, w, host), host, margin_gb)


def _fits(e: FullEstimate, budget: float, host: float | None) -> bool:
    return e.total <= budget and (host is None or e.host <= host)


def _fits_full(budget: float, w: FullWorkload, host: float | None = None) -> FullSettings | None:
    return next((s for s in full_candidates(w.processes) if _fits(estimate_full(w, s), budget, host)), None)


def _full_hints(budget: float, w: FullWorkload, host: float | None = None) -> tuple[str, ...]:
    """What would fit the card (and `host` GiB of host RAM per process): other optimizers, more GPUs (with the
    same host RAM each: more nodes), fewer frames."""
    hints = []
    for optimizer in ("AdamW8bit", "Adafactor"):
        if optimizer.lower() != w.optimizer.lower().replace("_", ""):
            s = _fits_full(budget, dataclasses.replace(w, optimizer=optimizer), host)
            if s:
                hints.append(f"with {optimizer}: {s.label()}")
    more = next((n for n in (2, 4, 8, 16, 32, 64) if n > w.processes and
                 _fits_full(budget, dataclasses.replace(w, processes=n), host)), None)
    if more:
        rung = _fits_full(budget, dataclasses.replace(w, processes=more), host)
        hints.append(f"with {w.optimizer} over {more} GPUs: {rung.label()}")
    for n in (w.processes,) if more else (w.processes, max(8, w.processes)):  # fewer frames (on more GPUs)
        fewer = dataclasses.replace(w, processes=n)
        frames = max((fr for fr in range(1, w.frames, 4)
                      if _fits_full(budget, dataclasses.replace(fewer, frames=fr), host)), default=0)
        if frames:
            where = f" over {n} GPUs" if n != w.processes else ""
            hints.append(f"at {w.width}x{w.height} up to {frames} frames{where}")
            break
    return tuple(hints)

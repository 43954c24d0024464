"""The full fine-tuning planner's job and settings (`FullWorkload`, `FullSettings`) and the exact bytes of
the weights, gradients and optimizer state it counts (`state_bytes`): sums over the DiT's tensors of a
meta-device model, checked against a real optimizer step in tests/memory/test_plan.py. The estimate of a
step's peak and the ladder are in `full.py`."""

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
from library.wan.variants import WanVariant

from .lora import Workload, skipping_label

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
    keep_attention: bool = False  # selective checkpointing: every checkpointed block keeps its self-attention
    skip_blocks: int = 0  # the last N blocks are not checkpointed (needs checkpointing)

    def checkpointed_blocks(self, num_layers: int) -> int:
        """How many blocks are checkpointed: the first num_layers - skip_blocks (0 without checkpointing)."""
        return max(0, num_layers - self.skip_blocks) if self.checkpointing else 0

    def apply(self, memory, finetune):
        """Copies of a `MemoryArgs` and a `FineTuneArgs` with these settings."""
        return (dataclasses.replace(memory, gradient_checkpointing=self.checkpointing,
                                    gradient_checkpointing_cpu_offload=self.offload_activations,
                                    gradient_checkpointing_keep_attention=self.keep_attention and self.checkpointing,
                                    gradient_checkpointing_keep_attention_blocks=0,
                                    gradient_checkpointing_offload_attention=False,  # not planned for full runs
                                    gradient_checkpointing_skip_blocks=self.skip_blocks if self.checkpointing else 0),
                dataclasses.replace(finetune, full_fine_tune=True, full_bf16=self.full_bf16,
                                    fused_backward_pass=self.fused_backward_pass, fsdp=self.fsdp,
                                    fsdp_cpu_offload=self.fsdp_cpu_offload))

    def label(self) -> str:
        parts = ["bf16" if self.full_bf16 else "fp32 masters"]
        if self.checkpointing:
            parts.append("ckpt" + ("+offload" if self.offload_activations else ""))
            if self.keep_attention:
                parts.append("keeping attention")
            if self.skip_blocks:
                parts.append(skipping_label(self.skip_blocks))
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

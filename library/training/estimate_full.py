"""Full fine-tuning in the step estimate (`tools/benchmark_wan.py --estimate --full`): what a full step adds
to the traced LoRA-free step, whose kernels already hold every weight gradient (the block weights train, so
the backward pass multiplies for each weight's gradient as well as for its input's: 6 FLOPs a parameter and
token instead of 4).

Added here, as memory-bound work at the GPU's bandwidth (`library/training/engines/full.py` describes the
precision): the optimizer step, which reads each trainable weight, its gradient and its state and writes the
weight and state back; and with fp32 master weights (no `full_bf16`) the casts autocast makes: every matmul
weight read in fp32 and written in bf16 for each forward pass (again for a checkpointed block's
recomputation, whose autocast cache is new), and each bf16 weight gradient written into the fp32 gradient.
The optimizer's bytes are the planner's (`planning/full.py`: 2 states of the weight's dtype for AdamW, 8-bit
states with a scale per 256 values for AdamW8bit, factored means for Adafactor). FSDP (several processes) is
not modelled. Every figure is an estimate.
"""

from __future__ import annotations

from dataclasses import dataclass

from .planning.full import optimizer_state_bytes


@dataclass(frozen=True)
class ParamCounts:
    """The traced model's parameters: all of them (all train), the matmul weights among them, and the matmul
    weights of each block (those a checkpointed block casts again)."""

    total: int
    matmul: int
    block_matmul: tuple[int, ...]


def count_params(model) -> ParamCounts:
    total = sum(p.numel() for p in model.parameters())
    matmul = sum(p.numel() for p in model.parameters() if p.dim() >= 2)
    blocks = tuple(sum(p.numel() for p in b.parameters() if p.dim() >= 2) for b in model.blocks)
    return ParamCounts(total, matmul, blocks)


def optimizer_bytes(optimizer: str, params: int, full_bf16: bool) -> float:
    """Bytes one optimizer step moves over `params` weights: weight read and written, gradient read (both in the
    weight's dtype), state read and written."""
    weight = 2 if full_bf16 else 4
    return params * 3 * weight + 2 * optimizer_state_bytes(optimizer, (params,), weight)


def cast_bytes(counts: ParamCounts, checkpointed: int, full_bf16: bool) -> float:
    """Bytes of autocast's weight casts with fp32 masters: 6 a matmul weight for the forward pass, again for
    each checkpointed block's recomputation, and 6 for its gradient into fp32 (none with `full_bf16`)."""
    if full_bf16:
        return 0.0
    return 6.0 * (2 * counts.matmul + sum(counts.block_matmul[:checkpointed]))


def full_costs(counts: ParamCounts, optimizer: str, full_bf16: bool, checkpointed: int, gpu, cost_type) -> list:
    """The step's extra costs as `cost_type` (estimate.Cost) rows: the optimizer step and the master casts."""
    rows = [("optimizer_step", "optimizer", optimizer_bytes(optimizer, counts.total, full_bf16)),
            ("master_weight_casts", "cast", cast_bytes(counts, checkpointed, full_bf16))]
    return [cost_type(name, kind, 0.0, nbytes, nbytes / (gpu.bandwidth_tbs * 1e12), -1)
            for name, kind, nbytes in rows if nbytes]

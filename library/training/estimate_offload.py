"""Activation offload in the step estimate (`tools/benchmark_wan.py --estimate --offload_activations`, or a
plan with `gradient_checkpointing_cpu_offload`): the copies of the checkpointed block inputs between the GPU
and pinned host memory, and how much of their time the compute cannot hide.

`library.runtime.memory` copies each block's input (the fp32 residual stream, 4 C T bytes a sample) to
the host on a side stream when the block starts, every block but the last (whose input the backward pass
needs first); with `gradient_checkpointing_skip_blocks` N only the checkpointed blocks before the last N, the
last of them keeping its input. In the backward pass the copy back of block i - 1's input starts when block
i takes its own (block L - 2's when the last block's backward pass begins), on the same side stream. The
forward pass never waits for a copy; the backward pass of block i waits until its input is back. This module
replays that schedule on the estimated kernel times: the side stream runs each copy at the GPU's host-link rate
(`GpuRates.host_link`, about 80% of the PCIe per-direction peak, see `gpu_rates.HOST_LINK_SOURCE`) as soon
as it is issued and the stream is free, and the compute is delayed whenever a block's input is not back in
time. When every copy is shorter than the compute it overlaps, nothing is exposed; in a steady state the
exposed time is the sum over blocks of max(0, copy - that block's compute). Every figure is an estimate.
"""

from __future__ import annotations

import bisect
import itertools
from dataclasses import dataclass, field


@dataclass(eq=False)
class BlockMarks:
    """A `WanModel.block_runner` for the meta-device trace: records the kernel index where each block's forward
    pass begins and where its backward pass begins (when the gradient of its output arrives)."""

    kernels: list  # the recorder's kernel list, growing as the step runs
    forward: list = field(default_factory=list)  # block i's first forward kernel, blocks in order
    backward: dict = field(default_factory=dict)  # block i -> its first backward (and recomputation) kernel

    def run(self, i: int, block, args: tuple, run_block):
        self.forward.append(len(self.kernels))
        out = run_block(block, args)
        if out.requires_grad:
            out.register_hook(lambda grad: self.backward.__setitem__(i, len(self.kernels)))
        return out


@dataclass(frozen=True)
class OffloadTime:
    blocks: int  # block inputs copied each way
    gb_each_way: float  # GB to the host in the forward pass, and the same back in the backward
    link: str
    link_gbs: float
    copy_s: float  # one block input's copy, one way
    exposed_s: float  # added to the step: compute waiting for a copy back


def exposed_seconds(starts: list, seconds: list, forward: list, backward: dict, copy_s: float) -> float:
    """The compute's wait for copies on one side stream. `starts`: each costed kernel's first kernel index,
    ascending; `seconds`: its time; `forward` / `backward`: kernel indices where each block's forward and
    backward pass begins; `copy_s`: one copy's time."""
    prefix = list(itertools.accumulate(seconds, initial=0.0))

    def at(index: int) -> float:  # the compute's clock when the kernel `index` starts
        return prefix[bisect.bisect_left(starts, index)]

    n = len(forward)
    side = 0.0
    for i in range(n - 1):  # every input but the last block's goes to the host when its block starts
        side = max(side, at(forward[i])) + copy_s
    ready, delay = {}, 0.0
    for i in reversed(range(n)):
        now = at(backward[i]) + delay
        if i < n - 1 and ready[i] > now:
            delay += ready[i] - now
            now = ready[i]
        if i >= 1:  # the copy back of the block before starts now (after any copy still queued)
            side = max(side, now) + copy_s
            ready[i - 1] = side
    return delay


def offload_time(costs: list, marks: BlockMarks, block_bytes: float, gpu, skipped: int = 0) -> OffloadTime:
    """The offload traffic of one step and its exposed time, from the costed kernels and the trace's marks.
    `skipped`: the last blocks are not checkpointed (`gradient_checkpointing_skip_blocks`), so only the blocks
    before them take part, the last of those keeping its input on the device."""
    link, gbs = gpu.host_link
    if len(marks.forward) < 1 or len(marks.backward) != len(marks.forward):
        raise ValueError("activation offload: the trace has no backward pass through every block")
    n = max(0, len(marks.forward) - skipped)
    copy_s = block_bytes / (gbs * 1e9)
    if n <= 1:
        return OffloadTime(0, 0.0, link, gbs, copy_s, 0.0)
    exposed = exposed_seconds([c.first for c in costs], [c.seconds for c in costs], marks.forward[:n],
                              {i: k for i, k in marks.backward.items() if i < n}, copy_s)
    return OffloadTime(n - 1, (n - 1) * block_bytes / 1e9, link, gbs, copy_s, exposed)

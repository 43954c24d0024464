"""Activation offload in the step estimate (`tools/benchmark_wan.py --estimate --offload_activations`, or a
plan with `gradient_checkpointing_cpu_offload`): the copies of the checkpointed block inputs between the GPU
and pinned host memory, and how much of their time the compute cannot hide.

`library.runtime.memory` copies each block's input (the fp32 residual stream, 4 C T bytes a sample) to
the host on a side stream when the block starts, every block but the last (whose input the backward pass
needs first); with `gradient_checkpointing_skip_blocks` N only the checkpointed blocks before the last N, the
last of them keeping its input. In the backward pass the copy back of block i - 1's input starts when block
i takes its own (block L - 2's when the last block's backward pass begins), on the same side stream. The
forward pass never waits for a copy; the backward pass of block i waits until its input is back. With
`gradient_checkpointing_offload_attention` a block that keeps its self-attention outputs sends them with its
input and gets them back with it (2 C T + 4 H T bytes more; the last checkpointed block keeps both on the GPU),
so each block has its own copy time (`copy_bytes`). This module replays that schedule on the estimated kernel
times: the side stream runs each copy at the GPU's host-link rate (`GpuRates.host_link`, about 80% of the
PCIe per-direction peak, see `gpu_rates.HOST_LINK_SOURCE`) as soon as it is issued and the stream is free,
and the compute is delayed whenever a block's input is not back in time. When every copy is shorter than the
compute it overlaps, nothing is exposed; in a steady state the exposed time is the sum over blocks of
max(0, copy - that block's compute). Every figure is an estimate.

Block swap (`blocks_to_swap` N, `library.runtime.block_swap`) is replayed the same way: the last N blocks'
weights come from pinned host memory before each use, block i + 1's copy (`prefetch` blocks ahead) issued
when block i's forward pass starts and block i - 1's when block i's backward pass starts, on a side stream of
their own; a block the compute reaches before its weights waits. The blocks the backward pass needs first
stay on the GPU after the forward pass. Both kinds of copy to the GPU share the link's host-to-device
direction: they are replayed as one queue in the order they are issued (the same total time as sharing the
link, each copy ending no later than the last queued); activation copies to the host use the other direction.
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
    attention_blocks: int = 0  # blocks whose kept self-attention outputs go with their inputs (`offload_attention`)
    attention_copy_s: float = 0.0  # ... the time those outputs add to each such block's copy, one way


def copy_bytes(input_bytes: float, kept_bytes: float, checkpointed: int, sent: int) -> list:
    """What each of the first `checkpointed` blocks copies each way: its input, and its kept self-attention
    outputs (`kept_bytes`) when it is one of the `sent` blocks before the last checkpointed one (the kept
    blocks are the last checkpointed ones; the last keeps both on the GPU, and is listed for the schedule)."""
    return [input_bytes + (kept_bytes if checkpointed - 1 - sent <= i < checkpointed - 1 else 0.0)
            for i in range(checkpointed)]


def exposed_seconds(starts: list, seconds: list, forward: list, backward: dict, copy_s) -> float:
    """The compute's wait for activation copies on one side stream. `starts`: each costed kernel's first
    kernel index, ascending; `seconds`: its time; `forward` / `backward`: kernel indices where each block's
    forward and backward pass begins; `copy_s`: one copy's time, or each block's (a list)."""
    return host_copy_wait(starts, seconds, forward, backward, len(forward), copy_s)


def host_copy_wait(starts: list, seconds: list, forward: list, backward: dict, offloaded: int, copy_s,
                   swapped: dict | None = None, prefetch: int = 1) -> float:
    """The compute's total wait for host copies in one step: activation offload over the first `offloaded`
    blocks (every input but the last of them goes to the host, `copy_s` each way: one time for every block, or
    a list of each block's), and block swap of the blocks in `swapped` (block -> its weights' copy time;
    `prefetch` blocks ahead). Kernel clocks as in `exposed_seconds`; `forward` and `backward` cover every
    block."""
    copies = list(copy_s) if isinstance(copy_s, (list, tuple)) else [copy_s] * len(forward)
    prefix = list(itertools.accumulate(seconds, initial=0.0))

    def at(index: int) -> float:  # the compute's clock when the kernel `index` starts, before any wait
        return prefix[bisect.bisect_left(starts, index)]

    swapped, n = swapped or {}, len(forward)
    state = {"delay": 0.0, "act": 0.0, "h2d": 0.0}  # the wait so far; when the offload stream, the link are free
    loads, resident = {}, set()  # swapped block -> when its weights arrive; blocks whose weights are on the GPU

    def load(j: int, now: float) -> None:  # `BlockSwapper.load`
        if j in swapped and j not in resident and j not in loads:
            state["h2d"] = max(state["h2d"], now) + swapped[j]
            loads[j] = state["h2d"]

    def wait(until: float, now: float) -> float:
        if until > now:
            state["delay"] += until - now
            return until
        return now

    def ensure(i: int, now: float) -> float:  # `BlockSwapper.ensure`
        if i in swapped and i not in resident:
            load(i, now)
            now = wait(loads.pop(i), now)
            resident.add(i)
        return now

    for i in range(n):
        now = ensure(i, at(forward[i]) + state["delay"])
        for j in range(i + 1, min(i + 1 + prefetch, n)):
            load(j, now)
        if i < offloaded - 1:  # this block's input goes to the host
            state["act"] = max(state["act"], now) + copies[i]
        if i < n - 1 - prefetch:  # `after_forward`: the first blocks of the backward pass stay
            resident.discard(i)
    ready = {}
    for i in reversed(range(n)):
        now = ensure(i, at(backward[i]) + state["delay"])
        for j in range(i - 1, max(i - 1 - prefetch, -1), -1):
            load(j, now)
        if i < offloaded - 1:
            now = wait(ready[i], now)
        if 1 <= i < offloaded:  # the copy back of the block before's input starts now
            state["act"] = state["h2d"] = max(state["act"], state["h2d"], now) + copies[i - 1]
            ready[i - 1] = state["act"]
        resident.discard(i)
    return state["delay"]


@dataclass(frozen=True)
class SwapTime:
    blocks: int  # swapped blocks, each copied to the GPU in the forward and again in the backward pass
    gb_per_pass: float
    link: str
    link_gbs: float
    load_s: float  # one swapped block's copy (the largest)
    exposed_s: float  # the compute's wait for these copies and any activation copies (included in the step)

    def line(self) -> str:
        return (f"  estimated block swap  {self.blocks} blocks, {self.gb_per_pass:.1f} GB to the GPU in the forward "
                f"pass and again in the backward ({1000 * self.load_s:.1f} ms a block over {self.link} at "
                f"{self.link_gbs:g} GB/s, 80% of its peak); exposed {self.exposed_s:.3f} s with the activation "
                f"copies (in the step time)")


def swap_time(costs: list, marks: BlockMarks, block_bytes: list, gpu, blocks_to_swap: int, offload_bytes=0.0,
              prefetch: int = 1) -> SwapTime:
    """Block swap's traffic and the wait for it (with activation offload's copies when `offload_bytes`, one
    block input's size or each block's copy (`copy_bytes`), is given; every block checkpointed, as block swap
    requires)."""
    link, gbs = gpu.host_link
    n = len(marks.forward)
    if not 0 < blocks_to_swap < n or len(marks.backward) != n:
        raise ValueError(f"block swap: blocks_to_swap must be between 1 and {n - 1} with a backward pass through "
                         "every block")
    swapped = {i: block_bytes[i] / (gbs * 1e9) for i in range(n - blocks_to_swap, n)}
    copies = [x / (gbs * 1e9) for x in offload_bytes] if isinstance(offload_bytes, (list, tuple)) \
        else offload_bytes / (gbs * 1e9)
    wait = host_copy_wait([c.first for c in costs], [c.seconds for c in costs], marks.forward, marks.backward,
                          n if offload_bytes else 0, copies, swapped, prefetch)
    return SwapTime(blocks_to_swap, sum(block_bytes[i] for i in swapped) / 1e9, link, gbs, max(swapped.values()),
                    wait)


def offload_time(costs: list, marks: BlockMarks, block_bytes: float, gpu, skipped: int = 0, kept_bytes: float = 0.0,
                 sent: int = 0) -> OffloadTime:
    """The offload traffic of one step and its exposed time, from the costed kernels and the trace's marks.
    `skipped`: the last blocks are not checkpointed (`gradient_checkpointing_skip_blocks`), so only the blocks
    before them take part, the last of those keeping its input on the device. `block_bytes`: one block input;
    `sent` blocks (the last checkpointed ones but the very last) send `kept_bytes` of kept self-attention
    outputs with it (`offload_attention`)."""
    link, gbs = gpu.host_link
    if len(marks.forward) < 1 or len(marks.backward) != len(marks.forward):
        raise ValueError("activation offload: the trace has no backward pass through every block")
    n = max(0, len(marks.forward) - skipped)
    copy_s = block_bytes / (gbs * 1e9)
    if n <= 1:
        return OffloadTime(0, 0.0, link, gbs, copy_s, 0.0)
    sent = min(sent, n - 1)
    sizes = copy_bytes(block_bytes, kept_bytes, n, sent)
    exposed = exposed_seconds([c.first for c in costs], [c.seconds for c in costs], marks.forward[:n],
                              {i: k for i, k in marks.backward.items() if i < n}, [x / (gbs * 1e9) for x in sizes])
    return OffloadTime(n - 1, sum(sizes[:-1]) / 1e9, link, gbs, copy_s, exposed, sent,
                       kept_bytes / (gbs * 1e9) if sent else 0.0)

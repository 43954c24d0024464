"""Block swap: the last N transformer blocks live in host memory and stream to the GPU ahead of use.

    forward   block i runs; swapped blocks i+1 .. i+P are already being copied on a side stream
    backward  the mirror: before block i's backward (and, with checkpointing, its recomputation) block i
              is made resident and blocks i-1 .. i-P are prefetched; after it, block i is dropped

Only host-to-device copies happen: the base weights are frozen, so "offloading" a block just points its
parameters back at the host copy and lets the GPU copy go (the caching allocator reuses it once the
compute stream is past it). LoRA weights are not parameters of the blocks and stay on the GPU. At most
P + 1 swapped blocks are resident at a time (P + 2 for an instant at a block boundary in backward).

The schedule is plain bookkeeping over a `transport`: `CudaTransport` copies on a side CUDA stream and
synchronises with events; `HostTransport` copies on the CPU and records nothing, so the schedule (which
blocks are resident when, the prefetch order) is testable without a GPU.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch
import torch.nn as nn

from .pinned import CudaPinner, PinnedArena, pinned_bytes

logger = logging.getLogger(__name__)


class CudaTransport:
    """Copies host tensors to `device` on a side stream; the compute stream waits on an event."""

    def __init__(self, device: torch.device):
        self.device = torch.device(device)
        self.stream = torch.cuda.Stream(self.device)

    def load(self, host: list[torch.Tensor]):
        with torch.cuda.stream(self.stream):
            tensors = [t.to(self.device, non_blocking=True) for t in host]
            event = torch.cuda.Event()
            event.record(self.stream)
        return tensors, event

    def wait(self, tensors: list[torch.Tensor], event) -> None:
        compute = torch.cuda.current_stream(self.device)
        compute.wait_event(event)
        for t in tensors:  # freed later while the compute stream may still read them: keep them until then
            t.record_stream(compute)


class HostTransport:
    """A stand-in for tests and CPU runs: 'device' copies are CPU clones, made at once."""

    device = torch.device("cpu")

    def load(self, host: list[torch.Tensor]):
        return [t.clone() for t in host], None

    def wait(self, tensors, event) -> None:
        return None


@dataclass
class _Slot:
    """Where one tensor of a swapped block lives: its owner module, attribute name and host copy."""

    module: nn.Module
    name: str
    is_param: bool
    host: torch.Tensor


@dataclass(eq=False)
class BlockSwapper:
    """Keeps the last `n_swap` of `blocks` in host memory and makes each resident only around its use."""

    blocks: nn.ModuleList = field(repr=False)
    n_swap: int
    transport: object = field(repr=False)
    prefetch: int = 1
    pin_memory: bool = False
    trace: list | None = None  # when a list, ("load" | "use" | "drop", block) events are appended
    pinner: object = field(default=None, repr=False)  # page-locks the host copies (default: CUDA's, with pin_memory)
    _slots: dict = field(default_factory=dict, repr=False)
    _pending: dict = field(default_factory=dict, repr=False)  # block -> (tensors, event) in flight
    _resident: set = field(default_factory=set, repr=False)

    def __post_init__(self):
        count = len(self.blocks)
        if not 0 < self.n_swap < count:
            raise ValueError(f"blocks_to_swap must be between 1 and {count - 1} for a {count}-block model")
        self.swapped = range(count - self.n_swap, count)
        pinner = self.pinner or (CudaPinner() if self.pin_memory and torch.cuda.is_available() else None)
        # one page-locked arena of the exact size for every swapped tensor (pinning each tensor on its own
        # would round each up to a power of two: 17.0 GiB instead of 11.1 for 34 fp8 A14B blocks)
        self.arena = None
        if pinner is not None:
            nbytes = sum(pinned_bytes([t for *_, t in self._tensors(self.blocks[i])], rounded=False)
                         for i in self.swapped)
            self.arena = PinnedArena(nbytes, pinner)
        for i in self.swapped:  # block by block: the original of a block is freed before the next is copied
            self._slots[i] = self._to_host(self._tensors(self.blocks[i]))
        self.max_resident = 0

    @staticmethod
    def _tensors(block: nn.Module) -> list[tuple]:
        """(module, name, is_param, tensor) of every parameter and buffer of a block."""
        return [(module, name, is_param, tensor) for module in block.modules()
                for table, is_param in ((module._parameters, True), (module._buffers, False))
                for name, tensor in table.items() if tensor is not None]

    def _to_host(self, items: list[tuple]) -> list[_Slot]:
        slots = []
        for module, name, is_param, tensor in items:
            host = self.arena.copy_of(tensor) if self.arena is not None else tensor.detach().to("cpu")
            slots.append(_Slot(module, name, is_param, host))
        for slot in slots:
            self._assign(slot, slot.host)
        return slots

    @staticmethod
    def _assign(slot: _Slot, tensor: torch.Tensor) -> None:
        if slot.is_param:
            slot.module._parameters[slot.name].data = tensor
        else:
            slot.module._buffers[slot.name] = tensor

    def _log(self, what: str, i: int) -> None:
        if self.trace is not None:
            self.trace.append((what, i))

    # ---- primitives -------------------------------------------------------------------------------

    def load(self, i: int) -> None:
        """Start copying swapped block i to the device (no-op when it is resident or on its way)."""
        if i in self.swapped and i not in self._resident and i not in self._pending:
            self._pending[i] = self.transport.load([s.host for s in self._slots[i]])
            self._log("load", i)

    def ensure(self, i: int) -> None:
        """Make swapped block i resident before the compute stream uses it."""
        if i not in self.swapped or i in self._resident:
            return
        self.load(i)
        tensors, event = self._pending.pop(i)
        self.transport.wait(tensors, event)
        for slot, tensor in zip(self._slots[i], tensors):
            self._assign(slot, tensor)
        self._resident.add(i)
        self.max_resident = max(self.max_resident, len(self._resident) + len(self._pending))
        self._log("use", i)

    def drop(self, i: int) -> None:
        """Point block i back at its host copy; the device copy is freed once no kernel needs it."""
        self._pending.pop(i, None)
        if i in self._resident:
            for slot in self._slots[i]:
                self._assign(slot, slot.host)
            self._resident.discard(i)
            self._log("drop", i)

    def reset(self) -> None:
        """Drop every swapped block (before a new pass, or before moving the model)."""
        for i in sorted(self._resident | set(self._pending)):
            self.drop(i)

    def is_resident(self, i: int) -> bool:
        return i not in self.swapped or i in self._resident

    # ---- the schedule -------------------------------------------------------------------------------

    def before_forward(self, i: int) -> None:
        if i == 0:
            self.reset()  # leftovers of a pass whose backward did not reach every block
        self.ensure(i)
        for j in range(i + 1, min(i + 1 + self.prefetch, len(self.blocks))):
            self.load(j)

    def after_forward(self, i: int, keep_for_backward: bool) -> None:
        """Drop block i, unless a backward pass follows and block i is among the first it needs."""
        if not (keep_for_backward and i >= len(self.blocks) - 1 - self.prefetch):
            self.drop(i)

    def before_backward(self, i: int) -> None:
        self.ensure(i)
        for j in range(i - 1, max(i - 1 - self.prefetch, -1), -1):
            self.load(j)

    def after_backward(self, i: int) -> None:
        self.drop(i)

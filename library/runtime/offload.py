"""Activation offload (`gradient_checkpointing_cpu_offload`): each checkpointed block's input, the fp32 residual
stream that checkpointing keeps, goes to page-locked host memory on a side stream in the forward pass and comes
back for the block's recomputation, the copy back of block i-1's input starting when block i's comes back. With
`gradient_checkpointing_offload_attention` a block's kept self-attention outputs ride with its input
(`ActivationOffloader.ride` / `take`, used by `kept_attention.KeptAttention`). `memory.BlockRunner` decides which
blocks' inputs go (all the checkpointed ones but the last)."""

from __future__ import annotations

import contextlib
import weakref

import torch

from .pinned import CudaPinner, HostBufferPool


class _Offloaded:
    """One offloaded tensor: its host copy (a view of a pooled page-locked `buffer` on CUDA), the device it
    returns to, the event of its device-to-host copy, its way back once started (tensor, event; False once
    `take`n), and the tensors that ride with it (a block input's kept attention outputs: they come back
    when it does)."""

    __slots__ = ("host", "device", "event", "buffer", "fetched", "n", "riders", "__weakref__")

    def __init__(self, host, device, event, buffer: list, n: int):
        self.host, self.device, self.event, self.buffer, self.n = host, device, event, buffer, n
        self.fetched, self.riders = None, []


class ActivationOffloader:
    """Saved-tensor hooks that move one tensor (a checkpointed block's input) to host memory while the
    forward pass goes on, and back when the backward pass recomputes the block. On CUDA the copies run
    on a side stream, into page-locked host buffers of the exact size reused from step to step
    (`pinned.HostBufferPool`: torch's own pinned allocations round 640 MiB up to 1 GiB); when block i's
    input comes back, block i-1's copy back starts at once on the side stream, so it overlaps block i's
    recomputation and backward instead of stalling block i-1. On a CPU device the 'host copy' is a clone
    (the same bookkeeping, for tests); `trace`, when a list, records ("offload" | "fetch" | "use", n) for
    the n-th offloaded tensor. `ride` sends more tensors of the block running now with its input
    (`kept_attention.KeptAttention`: its kept self-attention outputs) and `take` gets one back."""

    def __init__(self, device: torch.device, pin_memory: bool = True, pinner=None, trace: list | None = None):
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        self.pin_memory = pin_memory and self.cuda
        self.stream = torch.cuda.Stream(self.device) if self.cuda else None
        self.pool = HostBufferPool(pinner or (CudaPinner() if self.pin_memory else None))
        self.offloaded = 0  # tensors sent to the host so far (for logs and tests)
        self.trace = trace
        # offloaded and not yet brought back, in forward order (weak: a graph freed without a backward pass
        # takes its entries with it, and their buffers go back to the pool)
        self._waiting: list[weakref.ref] = []
        self._current: _Offloaded | None = None  # the input of the block running in `hooks`, once offloaded

    @contextlib.contextmanager
    def hooks(self, x: torch.Tensor):
        """A context in which saving `x` (and only `x`) for backward keeps a host copy instead."""
        key = (x.data_ptr(), tuple(x.shape), x.dtype)

        def pack(t: torch.Tensor):
            if (t.data_ptr(), tuple(t.shape), t.dtype) != key:
                return t
            self._current = self._to_host(t)
            return self._current

        def unpack(packed):
            return self._to_device(packed) if isinstance(packed, _Offloaded) else packed

        try:
            with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
                yield
        finally:
            self._current = None

    def ride(self, t: torch.Tensor) -> _Offloaded | None:
        """Send `t` to the host with the input of the block running now, to come back with it; None (keep `t`)
        when no input is being offloaded (the last checkpointed block, a block outside `hooks`)."""
        owner = self._current
        if owner is None:
            return None
        packed = self._to_host(t, waits=False)
        owner.riders.append(packed)
        return packed

    def take(self, packed: _Offloaded) -> torch.Tensor:
        """A tensor sent with `ride`, back on the device (brought back now unless its input's came first)."""
        tensor = self._arrive(packed)
        packed.fetched, packed.host = False, None  # autograd holds it now; this record lives as long as its input's
        return tensor

    def _log(self, what: str, packed: _Offloaded) -> None:
        if self.trace is not None:
            self.trace.append((what, packed.n))

    def _release(self, buffer: list) -> None:
        """Give a packed tensor's host buffer back to the pool (once)."""
        if buffer and buffer[0] is not None:
            self.pool.put(buffer[0])
            buffer[0] = None

    def _to_host(self, t: torch.Tensor, waits: bool = True) -> _Offloaded:
        if not self.cuda:
            packed = _Offloaded(t.detach().clone(), t.device, None, [None], self.offloaded)
        else:
            buffer = self.pool.get(t.numel() * t.element_size())
            host = HostBufferPool.view(buffer, tuple(t.shape), t.dtype)
            self.stream.wait_stream(torch.cuda.current_stream(t.device))  # t is complete
            with torch.cuda.stream(self.stream):
                host.copy_(t.detach(), non_blocking=self.pin_memory)
                event = torch.cuda.Event()
                event.record(self.stream)
            t.record_stream(self.stream)  # t's memory is not reused before the copy has read it
            packed = _Offloaded(host, t.device, event, [buffer], self.offloaded)
            weakref.finalize(packed, self._release, packed.buffer)
        self.offloaded += 1
        if waits:
            self._waiting = [ref for ref in self._waiting if ref() is not None] + [weakref.ref(packed)]
        self._log("offload", packed)
        return packed

    def prefetch_newest(self) -> None:
        """Start bringing back the most recently offloaded tensor not yet back: the one the backward pass needs
        first (`BlockRunner` calls this when the backward pass of the last block, whose input stays on the
        device, begins, so the copy overlaps that block's recomputation and backward)."""
        for ref in reversed(self._waiting):
            packed = ref()
            if packed is not None:
                if packed.fetched is None:
                    self._fetch(packed)
                return

    def _fetch(self, packed: _Offloaded) -> None:
        """Start the copy back to the device (on the side stream; on a CPU device the clone itself)."""
        self._log("fetch", packed)
        if not self.cuda:
            packed.fetched = (packed.host, None)
        else:
            self._fetch_cuda(packed)
        for rider in packed.riders:
            if rider.fetched is None:
                self._fetch(rider)

    def _fetch_cuda(self, packed: _Offloaded) -> None:
        with torch.cuda.stream(self.stream):
            self.stream.wait_event(packed.event)
            tensor = packed.host.to(packed.device, non_blocking=self.pin_memory)
            done = torch.cuda.Event()
            done.record(self.stream)
        # the next device-to-host copy into this buffer is queued on the same side stream, after this one
        self._release(packed.buffer)
        packed.fetched = (tensor, done)

    def _to_device(self, packed: _Offloaded) -> torch.Tensor:
        if packed.fetched is None:
            self._fetch(packed)
        waiting = [ref() for ref in self._waiting]
        if packed in waiting:
            n = waiting.index(packed)
            before = waiting[n - 1] if n > 0 else None
            self._waiting.pop(n)
            if before is not None and before.fetched is None:
                self._fetch(before)  # the block before comes next in the backward pass
        return self._arrive(packed)

    def _arrive(self, packed: _Offloaded) -> torch.Tensor:
        """The device copy of `packed` (its copy back started now if need be), for the compute stream."""
        if packed.fetched is None:
            self._fetch(packed)
        tensor, done = packed.fetched
        self._log("use", packed)
        if self.cuda:
            compute = torch.cuda.current_stream(packed.device)
            compute.wait_event(done)
            tensor.record_stream(compute)
        return tensor

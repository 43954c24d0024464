"""Page-locked (pinned) host memory in exact sizes, for block swap and activation offload.

PyTorch's caching host allocator (`tensor.pin_memory()`, `torch.empty(..., pin_memory=True)`) rounds every
allocation up to the next power of two and keeps freed blocks for reuse: a 640 MiB activation buffer takes
1 GiB, a 67.5 MiB fp8 FFN weight 128 MiB, and the 34 swapped fp8 blocks of an A14B expert on a 24 GB card
17.0 GiB of page-locked RAM instead of 11.1 GiB (`pinned_bytes`). Here a plain host tensor of the exact
size is page-locked with `cudaHostRegister` (`library.wan.pinning`), once, and carved
into the tensors that need it (`PinnedArena`) or reused from step to step (`HostBufferPool`).

The registration goes through a `pinner` (`CudaPinner` on a CUDA machine); tests pass one that records
the calls, so the bookkeeping runs on the CPU.
"""

from __future__ import annotations

import math

import torch

from library.wan.pinning import CudaPinner  # noqa: F401 - re-exported for block swap and offload
from library.wan.pinning import pinned_buffer as _pinned_buffer

ALIGN = 512  # bytes; every tensor taken from an arena starts on this boundary


def _aligned(nbytes: int) -> int:
    return (nbytes + ALIGN - 1) // ALIGN * ALIGN


def pinned_bytes(tensors, rounded: bool) -> int:
    """Host bytes that pinning `tensors` one by one takes: with `rounded`, as torch's caching host allocator
    does (each to the next power of two), else as one arena (each aligned to ALIGN)."""
    sizes = [t.numel() * t.element_size() for t in tensors]
    return sum(1 << max(0, math.ceil(math.log2(s))) if rounded else _aligned(s) for s in sizes if s)


class PinnedArena:
    """One page-locked host buffer of an exact size, handed out as tensors (`take`)."""

    def __init__(self, nbytes: int, pinner=None):
        self.nbytes = nbytes
        self.buffer = _pinned_buffer(nbytes, pinner)
        self.offset = 0

    @classmethod
    def for_tensors(cls, tensors, pinner=None) -> "PinnedArena":
        return cls(pinned_bytes(tensors, rounded=False), pinner)

    def take(self, shape, dtype: torch.dtype) -> torch.Tensor:
        nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
        if self.offset + nbytes > self.nbytes:
            raise RuntimeError(f"pinned arena of {self.nbytes} bytes is full ({self.offset} used, {nbytes} asked)")
        view = self.buffer[self.offset : self.offset + nbytes].view(dtype).view(shape)
        self.offset += _aligned(nbytes)
        return view

    def copy_of(self, tensor: torch.Tensor) -> torch.Tensor:
        """A copy of `tensor` in this arena."""
        return self.take(tuple(tensor.shape), tensor.dtype).copy_(tensor.detach())


class HostBufferPool:
    """Page-locked host buffers reused from step to step: `get` hands out the smallest free buffer that is
    large enough (registering a new one, of the exact size, only when none is), `put` gives it back."""

    def __init__(self, pinner=None):
        self.pinner = pinner
        self.free: list[torch.Tensor] = []
        self.registered = 0  # bytes page-locked so far

    def get(self, nbytes: int) -> torch.Tensor:
        fits = [b for b in self.free if b.numel() >= nbytes]
        if fits:
            buffer = min(fits, key=lambda b: b.numel())
            self.free = [b for b in self.free if b is not buffer]
            return buffer
        self.registered += nbytes
        return _pinned_buffer(nbytes, self.pinner)

    def put(self, buffer: torch.Tensor) -> None:
        self.free.append(buffer)

    @staticmethod
    def view(buffer: torch.Tensor, shape, dtype: torch.dtype) -> torch.Tensor:
        nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
        return buffer[:nbytes].view(dtype).view(shape)

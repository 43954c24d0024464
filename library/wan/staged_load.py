"""Loading checkpoint tensors onto a GPU through a few reused page-locked staging buffers.

`source.to(device="cuda", dtype=torch.bfloat16)` on an fp32 host tensor converts on the CPU into a new
temporary (fresh pages from the kernel for every tensor, handed back to the OS when freed: on the 2-core
development VM the page faults cost as much as the cast itself) and then copies from pageable memory
(staged once more by the driver). Here each tensor is cast (or copied, when its dtype already fits) on the
CPU piece by piece into a ring of `DEPTH` page-locked buffers of at most `BUFFER_BYTES` each, allocated once
per load, and each piece goes to the GPU tensor by a non-blocking copy on a side stream: the cast of piece
n + 1 overlaps the DMA of piece n. An event per buffer keeps a buffer from being written again before its
copies are done. Small tensors share a buffer; a large one spans several. Host memory beyond the mapped
file: the staging buffers only. The values are those of `source.to(dtype)`, bit for bit (the same
conversion, piece by piece).

NaN / infinity: each tensor is summed on the GPU behind its copies (one small kernel, no wait), the flags
are read back once, by `finish`, and a tensor whose sum is not finite goes to the caller's `screen`
(`finite.check_finite`: the exact count, the file and tensor in the message). A damaged file is therefore
refused at the end of the load rather than at the bad tensor, with the same error.

The device side (page-locking, device memory, copies, events, sums) is a transport: `CudaTransport` on a
GPU, `HostTransport` on the CPU (CPU destination tensors, copies made at once), so the staging itself is
tested without a GPU. `WAN_STAGED_LOAD=0` (or `ENABLED = False`) selects the per-tensor `.to()` path.

Used by `load_dit`, the fp8 DiT load (`loading_fp8.py`: the weights to quantise reach the GPU in their file
dtype, and `join` orders the quantisation after their copies without a host wait), the VAE, the umT5 encoder
(not its fp8 layers) and the CLIP vision encoder, whenever their target is a CUDA device.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterable

import torch

from .pinning import CudaPinner, pinned_buffer

BUFFER_BYTES = 64 << 20  # per staging buffer, in the target dtype (128 MiB of fp32 source per bf16 buffer)
DEPTH = 3  # staging buffers: one being written, the others' copies in flight
ALIGN = 512  # bytes; every piece starts on this boundary of its buffer
MIN_PIECE = 1 << 20  # a tensor is split at a buffer's end only when at least this much still fits there
ENABLED = os.environ.get("WAN_STAGED_LOAD", "1") != "0"


class CudaTransport:
    """Copies staged pieces to `device` on a side stream, with events and the finite screen queued there."""

    def __init__(self, device: torch.device, pinner=None):
        self.device = torch.device(device)
        self.pinner = pinner or CudaPinner()
        self.stream = torch.cuda.Stream(self.device)
        self.stream.wait_stream(torch.cuda.current_stream(self.device))  # after whatever freed the memory we get

    def buffer(self, nbytes: int) -> torch.Tensor:
        return pinned_buffer(nbytes, self.pinner)

    def empty(self, shape, dtype: torch.dtype) -> torch.Tensor:
        out = torch.empty(shape, dtype=dtype, device=self.device)
        out.record_stream(self.stream)  # written on the side stream: not reused before those copies end
        # The memory comes from the compute stream's pool, where a tensor freed a moment ago (a weight just
        # quantised by the fp8 load, the quantiser's temporaries) is handed out again at once: safe for the
        # compute stream, which runs in order, but the side stream writes it, so it first waits (on the GPU)
        # for every compute-stream kernel queued so far, e.g. the one still reading the freed tensor.
        self.stream.wait_stream(torch.cuda.current_stream(self.device))
        return out

    def copy(self, dst: torch.Tensor, src: torch.Tensor) -> None:
        with torch.cuda.stream(self.stream):
            dst.copy_(src, non_blocking=True)

    def record(self):
        event = torch.cuda.Event()
        event.record(self.stream)
        return event

    def wait(self, event) -> None:
        event.synchronize()

    def join(self) -> None:
        """The compute stream waits (on the GPU, not the host) for every copy queued so far."""
        torch.cuda.current_stream(self.device).wait_stream(self.stream)

    def finite(self, tensor: torch.Tensor) -> torch.Tensor:
        with torch.cuda.stream(self.stream):
            return torch.isfinite(_sum(tensor))

    def all_finite(self, flags: list[torch.Tensor]) -> list[bool]:
        with torch.cuda.stream(self.stream):
            return torch.stack(flags).tolist()  # the one wait for the whole load

    def finish(self) -> None:
        """Host and compute stream both after every copy: safe to free the staging buffers, and to use the
        tensors on the current stream."""
        self.stream.synchronize()
        torch.cuda.current_stream(self.device).wait_stream(self.stream)


class HostTransport:
    """The CPU stand-in: destinations are CPU tensors (allocated once each), copies and sums happen at once.
    Counts the staging buffers it allocates and the copies it makes."""

    device = torch.device("cpu")

    def __init__(self):
        self.buffers = 0
        self.copies = 0

    def buffer(self, nbytes: int) -> torch.Tensor:
        self.buffers += 1
        return torch.empty(max(nbytes, 1), dtype=torch.uint8)

    def empty(self, shape, dtype: torch.dtype) -> torch.Tensor:
        return torch.empty(shape, dtype=dtype)

    def copy(self, dst: torch.Tensor, src: torch.Tensor) -> None:
        self.copies += 1
        dst.copy_(src)

    def record(self):
        return None

    def wait(self, event) -> None:
        return None

    def join(self) -> None:
        return None

    def finite(self, tensor: torch.Tensor) -> torch.Tensor:
        return torch.isfinite(_sum(tensor))

    def all_finite(self, flags: list[torch.Tensor]) -> list[bool]:
        return [bool(f) for f in flags]

    def finish(self) -> None:
        return None


def _sum(tensor: torch.Tensor) -> torch.Tensor:
    """One sum per tensor (NaN and infinity survive it); half types accumulate into fp32 so that only a real
    NaN / infinity, not an fp16 overflow of finite values, sends a tensor to the exact count. fp8 is summed
    through bf16 (an exact cast; no sum kernel takes fp8 on every device)."""
    if tensor.dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
        tensor = tensor.to(torch.bfloat16)
    return tensor.sum(dtype=torch.float32) if tensor.element_size() < 4 else tensor.sum()


def _aligned(nbytes: int) -> int:
    return (nbytes + ALIGN - 1) // ALIGN * ALIGN


class StagedLoader:
    """Loads host tensors onto the transport's device through `depth` reused staging buffers of `buffer_bytes`.
    `screen(key, tensor)` is called at `finish` for each tensor whose sum was not finite (it raises for a
    real NaN / infinity); without a screen no sum is taken. Use as a context manager: a normal exit runs
    `finish`, every exit waits for the copies in flight before the buffers are let go."""

    def __init__(self, transport, screen: Callable[[str, torch.Tensor], None] | None = None,
                 buffer_bytes: int = BUFFER_BYTES, depth: int = DEPTH):
        if buffer_bytes <= 0 or buffer_bytes % ALIGN:
            raise ValueError(f"buffer_bytes must be a positive multiple of {ALIGN}")
        self.transport, self.screen = transport, screen
        self.buffer_bytes, self.depth = buffer_bytes, max(1, depth)
        self._buffers: list[torch.Tensor] = []
        self._events: list = [None] * self.depth
        self._slot = self._fill = 0
        self._pending: list[tuple[str, torch.Tensor, torch.Tensor]] = []

    def __enter__(self) -> StagedLoader:
        return self

    def __exit__(self, exc_type, *exc) -> None:
        try:
            if exc_type is None:
                self.finish()
        finally:
            self.close()

    def _next_buffer(self) -> None:
        """Leave the current buffer (its copies are queued) for the next one in the ring, once that one's
        earlier copies are done."""
        self._events[self._slot] = self.transport.record()
        self._slot, self._fill = (self._slot + 1) % self.depth, 0
        if self._events[self._slot] is not None:
            self.transport.wait(self._events[self._slot])
            self._events[self._slot] = None

    def _buffer(self) -> torch.Tensor:
        if self._slot == len(self._buffers):  # allocated on first use: a tiny model needs one
            self._buffers.append(self.transport.buffer(self.buffer_bytes))
        return self._buffers[self._slot]

    def load(self, key: str, source: torch.Tensor, dtype: torch.dtype, keep: torch.Tensor | None = None
             ) -> torch.Tensor:
        """`source` (a host tensor) as a new `dtype` tensor on the transport's device. `keep`: the tensor handed
        to the screen should this one's sum not be finite (default: the new one; a host tensor of the same
        values, e.g. `source` when `dtype` is its own, lets the caller free the new one before `finish`)."""
        out = self.transport.empty(tuple(source.shape), dtype)
        flat_src, flat_out = source.reshape(-1), out.view(-1)  # a view: the file's tensors are contiguous
        size, done, total = out.element_size(), 0, out.numel()
        while done < total:
            space = (self.buffer_bytes - self._fill) // size
            if self._fill and space < max(1, min(total - done, MIN_PIECE // size)):  # an empty one takes any piece
                self._next_buffer()
                space = self.buffer_bytes // size
            count = min(space, total - done)
            piece = self._buffer()[self._fill:self._fill + count * size].view(dtype)
            piece.copy_(flat_src[done:done + count])  # the cast, on the CPU, into page-locked memory
            self.transport.copy(flat_out[done:done + count], piece)
            self._fill = min(self.buffer_bytes, _aligned(self._fill + count * size))
            done += count
        if out.is_floating_point() and total and self.screen is not None:
            self._pending.append((key, out if keep is None else keep, self.transport.finite(out)))
        return out

    def join(self) -> None:
        """Order the device's compute after every copy queued so far (no host wait): for a tensor used on the
        device before `finish`, e.g. quantised as soon as it is loaded."""
        self.transport.join()

    def finish(self) -> None:
        """Wait for every copy, then read the finite flags back once and screen the tensors that failed."""
        self.transport.finish()
        pending, self._pending = self._pending, []
        if not pending:
            return
        for (key, tensor, _), ok in zip(pending, self.transport.all_finite([f for _, _, f in pending])):
            if not ok and self.screen is not None:
                self.screen(key, tensor)

    def close(self) -> None:
        """Wait for the copies in flight, then drop the staging buffers."""
        self.transport.finish()
        self._buffers, self._events, self._pending = [], [None] * self.depth, []


def transport_for(device: torch.device):
    """The transport for loading onto `device`: a `CudaTransport` for a CUDA device while ENABLED, else None
    (the caller's per-tensor path)."""
    return CudaTransport(device) if ENABLED and device.type == "cuda" else None


def staged_loader(device: torch.device, screen: Callable[[str, torch.Tensor], None] | None, sizes: Iterable[int]):
    """A context manager giving a `StagedLoader` onto `device` (or None where `transport_for` has no transport).
    `sizes` (the byte size of every tensor the load makes) caps the buffers at the largest tensor, so a tiny
    model does not page-lock 192 MiB."""
    transport = transport_for(torch.device(device))
    if transport is None:
        return contextlib.nullcontext(None)
    largest = max(sizes, default=0)
    return StagedLoader(transport, screen, buffer_bytes=_aligned(max(1, min(BUFFER_BYTES, largest))))

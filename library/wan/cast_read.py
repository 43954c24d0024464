"""Reading safetensors tensors into another dtype with the read and the cast overlapped (the official A14B and
5B shards are fp32 and are loaded as bf16).

A reader thread reads the planned tensors' bytes, in the order they will be taken, into a few reused chunk
buffers (`os.preadv`, which releases the GIL: no memory map, so no page faults on the file and no mapped
pages to drop afterwards), while the caller's thread casts each chunk into the new tensor and screens the
chunk for NaN / infinity while it is still in cache. The reader also allocates each result and touches
one byte of each of its pages before reading its bytes, so the page faults of the fresh memory (as costly
as the cast itself on the development VM) happen on its core too. Reading chunk i + 1 overlaps casting chunk i; the file
is never resident beside the result, so peak memory is the result plus `depth` chunks. While a reader is
open, PyTorch's intra-op threads leave one core to the reader thread (one thread on a 2-core machine): with
both cores in every parallel region, each region's barrier waits for a descheduled thread and the cast
took 4x longer on the 2-core development VM. The values are
those of `tensor.to(dtype)`, bit for bit (the same conversion, chunk by chunk).
"""

from __future__ import annotations

import os
import queue
import threading
from dataclasses import dataclass
from pathlib import Path

import torch

from .checkpoint_files import Checkpoint, CheckpointError, SafetensorsFile

PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
CHUNK_BYTES = 8 << 20  # a multiple of every element size; small enough to stay in a core's cache
DEPTH = 3  # chunk buffers in flight: one being cast, the rest read ahead


@dataclass(frozen=True)
class _Job:
    key: str
    dtype: torch.dtype  # the result's
    source: torch.dtype  # the file's
    shape: tuple[int, ...]
    path: Path
    offset: int
    nbytes: int


def streamable(ckpt: Checkpoint, key: str) -> bool:
    """Whether `key` lies in a safetensors file (a `.pth` tensor comes from torch's own loader)."""
    return isinstance(_owner(ckpt, key), SafetensorsFile)


def _owner(ckpt: Checkpoint, key: str):
    path = ckpt.file_of(key)
    return next(f for f in ckpt.files if f.path == path)


class CastReader:
    """Streams the tensors of `plan` ([(file key, result dtype)], in the order `take` will ask for them) out of
    `ckpt`'s safetensors files. Use as a context manager (the reader thread stops on exit)."""

    def __init__(self, ckpt: Checkpoint, plan: list[tuple[str, torch.dtype]], chunk_bytes: int | None = None,
                 depth: int = DEPTH):
        chunk_bytes = chunk_bytes or CHUNK_BYTES
        if chunk_bytes % 8:
            raise ValueError("chunk_bytes must be a multiple of 8 (every element size)")
        self._jobs = []
        for key, dtype in plan:
            offset, nbytes = _owner(ckpt, key).span(key)
            self._jobs.append(_Job(key, dtype, ckpt.dtype(key), ckpt.shape(key), ckpt.file_of(key), offset, nbytes))
        self._next = 0
        self._free: queue.Queue = queue.Queue()
        self._full: queue.Queue = queue.Queue()
        for _ in range(max(1, depth) if self._jobs else 0):
            self._free.put(torch.empty(chunk_bytes, dtype=torch.uint8))
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._read_all, name="wan-cast-read", daemon=True)
        self._threads = None  # PyTorch's intra-op thread count before this reader set it to one
        if self._jobs:
            self._threads = torch.get_num_threads()
            torch.set_num_threads(max(1, min(self._threads, (os.cpu_count() or 2) - 1)))
            self._thread.start()

    def __enter__(self) -> CastReader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Stop the reader (it may be waiting for a free buffer), wait for it, restore the thread count."""
        self._stop.set()
        if self._thread.is_alive():
            self._free.put(None)
            self._thread.join()
        if self._threads is not None:
            torch.set_num_threads(self._threads)
            self._threads = None

    def _read_all(self) -> None:
        fds: dict[Path, int] = {}
        try:
            for job in self._jobs:
                fd = fds.get(job.path)
                if fd is None:
                    fd = fds[job.path] = os.open(job.path, os.O_RDONLY)
                out = torch.empty(job.shape, dtype=job.dtype)
                if out.numel():
                    out.view(-1).view(torch.uint8)[::PAGE].fill_(0)  # fault its pages in here, not in the cast
                self._full.put(out)
                pos = 0
                while pos < job.nbytes:
                    buf = self._free.get()
                    if buf is None or self._stop.is_set():
                        return
                    n = min(buf.numel(), job.nbytes - pos)
                    view = memoryview(buf.numpy())[:n]
                    got = 0
                    while got < n:
                        read = os.preadv(fd, [view[got:]], job.offset + pos + got)
                        if read <= 0:
                            raise CheckpointError(f"{job.path}: ended while reading tensor {job.key!r} (the file "
                                                  "was truncated after it was opened); fetch the file again")
                        got += read
                    self._full.put((buf, n))
                    pos += n
        except BaseException as exc:  # noqa: BLE001 - handed to the thread that takes the tensor, raised there
            self._full.put(exc)
        finally:
            for fd in fds.values():
                os.close(fd)

    def take(self, key: str) -> tuple[torch.Tensor, bool]:
        """The next planned tensor, cast, and whether every chunk's sum was finite (False: it may hold NaN or
        infinity, or a sum overflowed; the caller counts exactly)."""
        if self._next >= len(self._jobs) or self._jobs[self._next].key != key:
            expected = self._jobs[self._next].key if self._next < len(self._jobs) else "nothing"
            raise RuntimeError(f"CastReader: asked for {key!r}, the plan has {expected!r} next")
        job = self._jobs[self._next]
        self._next += 1
        out = self._full.get()  # allocated and paged in by the reader
        if isinstance(out, BaseException):
            raise out
        flat, done, finite = out.view(-1), 0, True
        floating = out.is_floating_point()
        while done < out.numel():
            item = self._full.get()
            if isinstance(item, BaseException):
                raise item
            buf, n = item
            chunk = buf[:n].view(job.source)
            part = flat[done:done + chunk.numel()]
            part.copy_(chunk)
            if floating and finite and not bool(torch.isfinite(part.sum())):
                finite = False
            done += chunk.numel()
            self._free.put(buf)
        return out, finite

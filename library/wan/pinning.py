"""Page-locking host memory of the size asked with cudaHostRegister (no power-of-two rounding).

PyTorch's caching host allocator (`pin_memory=True`) rounds every allocation up to the next power of two;
here a plain host tensor is registered instead (as `torch.cuda._pin_memory_utils` does), rounded up to whole
pages of its own. Used by the staged checkpoint loader (`staged_load.py`) and, through `library.runtime.pinned`, by
block swap and activation offload. The registration goes through a `pinner` so tests can record it.
"""

from __future__ import annotations

import mmap
import weakref

import torch


class CudaPinner:
    """Page-locks host memory with cudaHostRegister (portable) and releases it with cudaHostUnregister."""

    def register(self, tensor: torch.Tensor) -> None:
        error = int(torch.cuda.cudart().cudaHostRegister(tensor.data_ptr(), tensor.numel() * tensor.element_size(), 1))
        if error:
            raise RuntimeError(f"cudaHostRegister of {tensor.numel() * tensor.element_size() / 2**30:.2f} GiB of "
                               f"host memory failed (cudaError {error}); is the RAM locked by other processes?")

    def unregister(self, data_ptr: int) -> None:
        torch.cuda.cudart().cudaHostUnregister(data_ptr)


PAGE = mmap.PAGESIZE


def pinned_buffer(nbytes: int, pinner) -> torch.Tensor:
    """A uint8 host tensor of `nbytes`, page-locked by `pinner` (None: left pageable) until this tensor object
    is collected (keep it, not only views of it, for as long as the memory is used).

    What is registered is whole pages that belong to this buffer alone: the tensor is carved, page-aligned, out
    of an allocation one page larger than its size rounded up to pages. A plain allocation below glibc's mmap
    threshold (up to 32 MiB once larger blocks have been freed) comes from the heap and shares its first and
    last page with its neighbours, and the driver page-locks whole pages: a second buffer on a page already
    registered would be refused as already registered. The cost is at most two pages a buffer."""
    if pinner is None:
        return torch.empty(max(nbytes, 1), dtype=torch.uint8)
    pages = -(-max(nbytes, 1) // PAGE) * PAGE
    base = torch.empty(pages + PAGE, dtype=torch.uint8)
    start = -base.data_ptr() % PAGE
    region = base[start:start + pages]  # the pages registered
    pinner.register(region)
    buffer = region[:max(nbytes, 1)]
    weakref.finalize(buffer, pinner.unregister, region.data_ptr())
    return buffer

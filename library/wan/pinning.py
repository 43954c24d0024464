"""Page-locking host memory of an exact size with cudaHostRegister (no power-of-two rounding).

PyTorch's caching host allocator (`pin_memory=True`) rounds every allocation up to the next power of two;
here a plain host tensor of the exact size is registered instead (what `torch.cuda._pin_memory_utils`
does). Used by the staged checkpoint loader (`staged_load.py`) and, through `library.runtime.pinned`, by
block swap and activation offload. The registration goes through a `pinner` so tests can record it.
"""

from __future__ import annotations

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


def pinned_buffer(nbytes: int, pinner) -> torch.Tensor:
    """A uint8 host tensor of `nbytes`, page-locked by `pinner` (None: left pageable) until this tensor object
    is collected (keep it, not only views of it, for as long as the memory is used)."""
    buffer = torch.empty(max(nbytes, 1), dtype=torch.uint8)
    if pinner is not None:
        pinner.register(buffer)
        weakref.finalize(buffer, pinner.unregister, buffer.data_ptr())
    return buffer

"""Attention backends for the WAN DiT.

Everything that computes softmax(q k^T / sqrt(d)) v lives here, behind one function, so the model file
does not care which kernel runs. PyTorch SDPA is the default and always available; flash-attn 2,
flash-attn 3, xformers and SageAttention are used when installed. Asking for a backend that is not
installed is an error that says what to install. All backends take and return [B, L, H, D].
"""

from __future__ import annotations

import importlib
import logging
from typing import Callable

import torch
import torch.nn.functional as F

logger = logging.getLogger(__name__)

# backend name -> (module to import, pip package, one-line hint)
_OPTIONAL = {
    "flash_attn": ("flash_attn", "flash-attn", "FlashAttention 2 (Ampere or newer GPUs)"),
    "flash3": ("flash_attn_interface", "flash-attn 3 (hopper build)", "FlashAttention 3 (Hopper GPUs)"),
    "xformers": ("xformers.ops", "xformers", "xformers memory-efficient attention"),
    "sage_attn": ("sageattention", "sageattention", "SageAttention (inference only)"),
}
BACKENDS = ("sdpa", *_OPTIONAL)
_LOW_PRECISION = (torch.float16, torch.bfloat16)


def _sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    # SDPA wants [B, H, L, D]
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    return out.transpose(1, 2)


def _half(q, k, v):
    """Kernels that only run in fp16/bf16: cast fp32 inputs to bf16 and remember the dtype to return."""
    dtype = q.dtype
    if dtype not in _LOW_PRECISION:
        q, k, v = (t.to(torch.bfloat16) for t in (q, k, v))
    return q, k, v, dtype


def _flash_attn(q, k, v):
    module = importlib.import_module("flash_attn")
    q, k, v, dtype = _half(q, k, v)
    return module.flash_attn_func(q, k, v).to(dtype)


def _flash3(q, k, v):
    module = importlib.import_module("flash_attn_interface")
    q, k, v, dtype = _half(q, k, v)
    out = module.flash_attn_func(q, k, v)
    out = out[0] if isinstance(out, tuple) else out
    return out.to(dtype)


def _xformers(q, k, v):
    module = importlib.import_module("xformers.ops")
    return module.memory_efficient_attention(q, k, v)


def _sage_attn(q, k, v):
    module = importlib.import_module("sageattention")
    q, k, v, dtype = _half(q, k, v)
    return module.sageattn(q, k, v, tensor_layout="NHD").to(dtype)


_KERNELS: dict[str, Callable] = {
    "sdpa": _sdpa,
    "flash_attn": _flash_attn,
    "flash3": _flash3,
    "xformers": _xformers,
    "sage_attn": _sage_attn,
}


def check_backend(name: str) -> str:
    """Validate a backend name and that its package imports; returns the name. Clear errors otherwise."""
    if name not in _KERNELS:
        raise ValueError(f"unknown attention backend {name!r}; choose one of: {', '.join(BACKENDS)}")
    if name in _OPTIONAL:
        module, package, what = _OPTIONAL[name]
        try:
            importlib.import_module(module)
        except ImportError as exc:
            raise RuntimeError(
                f"attention backend {name!r} ({what}) was requested but is not installed ({exc}); "
                f"install `{package}` for your CUDA build, or use the default `sdpa`"
            ) from None
    return name


def attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, backend: str = "sdpa", split_batch: bool = False
) -> torch.Tensor:
    """Softmax attention, default scale 1/sqrt(D). q [B, Lq, H, D], k/v [B, Lk, H, D] -> [B, Lq, H, D].

    `split_batch` runs one sample at a time (`split_attn`): slower, but peak memory is that of batch 1.
    """
    kernel = _KERNELS[backend]
    if split_batch and q.shape[0] > 1:
        return torch.cat([kernel(q[i : i + 1], k[i : i + 1], v[i : i + 1]) for i in range(q.shape[0])])
    return kernel(q, k, v)

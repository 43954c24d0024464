"""Speed settings applied to a loaded model: `torch.compile` of the DiT blocks and the CUDA math flags
(`compile`, `compile_backend`, `compile_mode`, `compile_dynamic`, `compile_fullgraph`,
`compile_cache_size_limit`, `cuda_allow_tf32`, `cuda_cudnn_benchmark`).

Blocks are compiled one by one, not the whole model: every block has the same code, so one graph serves
all of them, and the parts around the blocks (per-sample text padding, RoPE tables) stay eager. Compile
after the LoRA hooks are attached, so the compiled graphs include them. Checkpointing, activation offload
and block swap wrap the call of a block and keep working around the compiled block.
"""

from __future__ import annotations

import logging

import torch

logger = logging.getLogger(__name__)

_DYNAMIC = {None: None, "auto": None, "true": True, "false": False}


def set_cuda_flags(compilation) -> None:
    """TF32 matmuls / convolutions and cuDNN autotuning, process-wide (no effect without CUDA)."""
    if compilation.cuda_allow_tf32:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        logger.info("TF32 matmuls allowed")
    if compilation.cuda_cudnn_benchmark:
        torch.backends.cudnn.benchmark = True


def compile_blocks(model: torch.nn.Module, compilation) -> int:
    """`torch.compile` each DiT block in place with the configured backend and mode; returns the count."""
    if not compilation.compile:
        return 0
    import torch._dynamo

    if compilation.compile_cache_size_limit:
        torch._dynamo.config.cache_size_limit = compilation.compile_cache_size_limit
    mode = None if compilation.compile_mode == "default" else compilation.compile_mode
    for block in model.blocks:
        block.compile(backend=compilation.compile_backend, mode=mode, fullgraph=compilation.compile_fullgraph,
                      dynamic=_DYNAMIC[compilation.compile_dynamic])
    logger.info("compiled %d blocks (backend %s, mode %s)", len(model.blocks), compilation.compile_backend,
                compilation.compile_mode)
    return len(model.blocks)

"""Speed settings applied to a loaded model: `torch.compile` of the DiT blocks and the CUDA math flags
(`compile`, `compile_backend`, `compile_mode`, `compile_dynamic`, `compile_fullgraph`,
`compile_cache_size_limit`, `cuda_allow_tf32`, `cuda_cudnn_benchmark`).

Blocks are compiled one by one, not the whole model: every block has the same code, so one graph serves
all of them, and the parts around the blocks (per-sample text padding, RoPE tables) stay eager. Compile
after the LoRA hooks are attached, so the compiled graphs include them. Checkpointing, activation offload
and block swap wrap the call of a block and keep working around the compiled block.

`compile` not set means: on for a CUDA device (`compile_wanted`), eager elsewhere; `compile = false` is
always eager.

Unless `compile_dynamic = false`, the model marks its token count dynamic before the first compiled call
(`WanModel.dynamic_tokens`), so one graph serves every bucket: five bucket shapes on the tiny model give
one graph instead of two (the first compiled static, the second recompiled dynamic). Before the blocks are
compiled, a small function goes through the same backend and mode, forward and backward, once per process:
when that fails (no C++ compiler, no Triton for this GPU) the blocks stay eager, with one warning.
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


_WORKS: dict[tuple, str | None] = {}  # (backend, mode, device) -> None, or why compiling fails there


def compile_problem(backend: str, mode: str | None, device: str) -> str | None:
    """None when `torch.compile` with this backend and mode compiles and runs a small function, forward and
    backward, on `device`; else the error, in one line. Tried once per process."""
    key = (backend, mode, device)
    if key not in _WORKS:
        try:
            fn = torch.compile(lambda t: torch.nn.functional.gelu(t * 2.0).sum(), backend=backend, mode=mode)
            x = torch.randn(8, 8, device=device, requires_grad=True)
            fn(x).backward()
            _WORKS[key] = None
        except Exception as exc:  # noqa: BLE001 - any failure means: run eagerly, and say why
            exc = getattr(exc, "inner_exception", None) or exc  # the backend's own error, not Dynamo's wrapper
            _WORKS[key] = f"{type(exc).__name__}: {(str(exc).strip().splitlines() or [''])[0]}"
    return _WORKS[key]


def compile_wanted(compilation, device=None) -> bool:
    """`compile` as set, or when it is not set (None), whether `device` (default: CUDA when available) is a
    CUDA device: compiled blocks are the default on GPUs, eager on the CPU."""
    if compilation.compile is not None:
        return bool(compilation.compile)
    if device is None:
        return torch.cuda.is_available()
    return torch.device(device).type == "cuda"


def compile_blocks(model: torch.nn.Module, compilation, device=None) -> int:
    """`torch.compile` each DiT block in place with the configured backend and mode; returns the count (0
    when compiling is off (`compile_wanted` for `device`), or does not work on this machine: then the
    blocks run eagerly, with a warning)."""
    if not compile_wanted(compilation, device):
        return 0
    import torch._dynamo

    if compilation.compile is None:
        logger.info("compiling the DiT blocks (the default on a CUDA GPU; `compile = false` runs them eagerly)")

    if compilation.compile_cache_size_limit:
        torch._dynamo.config.cache_size_limit = compilation.compile_cache_size_limit
    mode = None if compilation.compile_mode == "default" else compilation.compile_mode
    device = torch.device(device).type if device is not None else ("cuda" if torch.cuda.is_available() else "cpu")
    problem = compile_problem(compilation.compile_backend, mode, device)
    if problem is not None:
        if not getattr(compile_blocks, "warned", False):
            logger.warning("torch.compile (backend %s, mode %s) does not work on this %s (%s): the blocks run "
                           "eagerly", compilation.compile_backend, compilation.compile_mode, device, problem)
            compile_blocks.warned = True
        return 0
    dynamic = _DYNAMIC[compilation.compile_dynamic]
    for block in model.blocks:
        block.compile(backend=compilation.compile_backend, mode=mode, fullgraph=compilation.compile_fullgraph,
                      dynamic=dynamic)
    model.dynamic_tokens = dynamic is not False
    logger.info("compiled %d blocks (backend %s, mode %s)", len(model.blocks), compilation.compile_backend,
                compilation.compile_mode)
    return len(model.blocks)

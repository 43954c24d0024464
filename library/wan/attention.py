"""Attention backends for the WAN DiT.

Everything that computes softmax(q k^T / sqrt(d)) v lives here, behind one function, so the model file
does not care which kernel runs. PyTorch SDPA is always available; flash-attn 2, flash-attn 3, xformers
and SageAttention are used when installed and asked for (FlashAttention 3 also by default on Hopper,
below). Asking for a backend that is not installed is an error that says what to install. All backends
take and return [B, L, H, D].

Choices are made once per process and logged, never per call:

- An optional package is imported by `check_backend` (the model's `set_attention_backend`), once; the
  per-call path only looks the kernel up, so a compiled block has no graph break around attention.
- flash-attn >= 2.7 and FlashAttention 3 builds of 2025 implement their kernels as torch custom ops
  (fake kernels and autograd registered), so Dynamo puts them in the graph as they are. Older builds,
  xformers and SageAttention run inside this module's own custom op `wan_attention::opaque` while
  compiling: one node in the graph, whose backward recomputes the kernel's forward under autograd (one
  extra attention forward per backward; eager runs keep the package's own autograd).
- No backend asked for (`AUTO`, the config with no attention flag and generation without `--attn_mode`):
  FlashAttention 3 on a Hopper GPU (compute capability 9.x) where `flash_attn_interface` imports and
  registers its torch custom ops, else SDPA (`default_plan`, chosen once per process and logged). A backend
  named explicitly, `sdpa` included, is always exactly that backend.
- SDPA on CUDA: `sdpa_plan` orders its kernels for the GPU (cuDNN attention first on sm90 and newer,
  where PyTorch's default order would pick FlashAttention 2), applied around each call with
  `sdpa_kernel(..., set_priority=True)`, which Dynamo traces without a break.
"""

from __future__ import annotations

import importlib
import logging
import sys
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

logger = logging.getLogger(__name__)

# backend name -> (module to import, pip package, one-line hint)
_OPTIONAL = {
    "flash_attn": ("flash_attn", "flash-attn", "FlashAttention 2 (Ampere or newer GPUs)"),
    "flash3": ("flash_attn_interface", "flash-attn 3 (hopper build)", "FlashAttention 3 (Hopper GPUs)"),
    "xformers": ("xformers.ops", "xformers", "xformers memory-efficient attention"),
    "sage_attn": ("sageattention", "sageattention", "SageAttention (inference only)"),
}
BACKENDS = ("sdpa", *_OPTIONAL)
AUTO = "auto"  # no backend asked for: `default_plan` picks one (FlashAttention 3 on Hopper where installed)
_LOW_PRECISION = (torch.float16, torch.bfloat16)
# the torch custom op a package registers when its kernel is traceable by Dynamo (checked after import)
_PACKAGE_OPS = {"flash_attn": (("flash_attn", "_flash_attn_forward"),),
                "flash3": (("flash_attn_3", "_flash_attn_forward"), ("flash_attn_3", "fwd"))}
_OPAQUE = ("xformers", "sage_attn")  # run as one custom op of ours while compiling

_IMPORTED: dict[str, object] = {}  # backend -> its imported module, filled once by check_backend
_TRACEABLE: dict[str, bool] = {"sdpa": True}  # backend -> Dynamo can trace its kernel


# ---- the kernels: [B, L, H, D] in, [B, L, H, D] out ----------------------------------------------------


def _half(q, k, v):
    """Kernels that only run in fp16/bf16: cast fp32 inputs to bf16 and remember the dtype to return."""
    dtype = q.dtype
    if dtype not in _LOW_PRECISION:
        q, k, v = (t.to(torch.bfloat16) for t in (q, k, v))
    return q, k, v, dtype


def _sdpa(q, k, v):
    # SDPA wants [B, H, L, D]
    q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    order = _SDPA.order
    if order is None:
        return F.scaled_dot_product_attention(q, k, v).transpose(1, 2)
    with sdpa_kernel(list(order), set_priority=True):
        return F.scaled_dot_product_attention(q, k, v).transpose(1, 2)


def _flash_attn(q, k, v):
    q, k, v, dtype = _half(q, k, v)
    return _IMPORTED["flash_attn"].flash_attn_func(q, k, v).to(dtype)


def _flash3(q, k, v):
    q, k, v, dtype = _half(q, k, v)
    out = _IMPORTED["flash3"].flash_attn_func(q, k, v)
    out = out[0] if isinstance(out, tuple) else out  # builds of 2024 return (out, lse)
    return out.to(dtype)


def _xformers(q, k, v):
    return _IMPORTED["xformers"].memory_efficient_attention(q, k, v)


def _sage_attn(q, k, v):
    q, k, v, dtype = _half(q, k, v)
    return _IMPORTED["sage_attn"].sageattn(q, k, v, tensor_layout="NHD").to(dtype)


_KERNELS: dict[str, Callable] = {
    "sdpa": _sdpa,
    "flash_attn": _flash_attn,
    "flash3": _flash3,
    "xformers": _xformers,
    "sage_attn": _sage_attn,
}


# ---- one opaque graph node for kernels Dynamo cannot trace ------------------------------------------------


@torch.library.custom_op("wan_attention::opaque", mutates_args=())
def _opaque(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, backend: str) -> torch.Tensor:
    with torch.no_grad():
        return _KERNELS[backend](q, k, v).contiguous()


@_opaque.register_fake
def _(q, k, v, backend):
    return q.new_empty(q.shape)


def _xformers_backward(grad, q, k, v):
    ops = _IMPORTED["xformers"]
    out, lse = ops.memory_efficient_attention_forward_requires_grad(q, k, v)
    return ops.memory_efficient_attention_backward(grad, out, lse, q, k, v)


def _no_backward(grad, q, k, v):
    raise RuntimeError("SageAttention is inference only (it has no backward pass); train with sdpa, flash_attn, "
                       "flash3 or xformers")


_BACKWARDS: dict[str, Callable] = {"xformers": _xformers_backward, "sage_attn": _no_backward}


@torch.library.custom_op("wan_attention::opaque_backward", mutates_args=())
def _opaque_backward(grad: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                     backend: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The kernel's gradients through the package's own backward API (which recomputes the forward)."""
    dq, dk, dv = _BACKWARDS[backend](grad, q, k, v)
    return dq.contiguous(), dk.contiguous(), dv.contiguous()


@_opaque_backward.register_fake
def _(grad, q, k, v, backend):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _opaque_setup(ctx, inputs, output):
    q, k, v, backend = inputs
    ctx.save_for_backward(q, k, v)
    ctx.backend = backend


def _opaque_grad(ctx, grad):
    q, k, v = ctx.saved_tensors
    return (*_opaque_backward(grad.contiguous(), q, k, v, ctx.backend), None)


_opaque.register_autograd(_opaque_grad, setup_context=_opaque_setup)


# ---- choosing, once per process ---------------------------------------------------------------------------


def check_backend(name: str) -> str:
    """Validate a backend name and import its package (once per process); returns the name. Clear errors
    otherwise. SDPA's kernel order for the current CUDA device is chosen (and logged) here too. `AUTO`
    returns the backend `choose_default` picks for this process."""
    if name == AUTO:
        return choose_default()
    if name not in _KERNELS:
        raise ValueError(f"unknown attention backend {name!r}; choose one of: {', '.join(BACKENDS)}, or {AUTO}")
    if name == "sdpa":
        choose_sdpa()
    elif name not in _IMPORTED:
        module, package, what = _OPTIONAL[name]
        try:
            _IMPORTED[name] = importlib.import_module(module)
        except ImportError as exc:
            raise RuntimeError(
                f"attention backend {name!r} ({what}) was requested but is not installed ({exc}); "
                f"install `{package}` for your CUDA build, or use the default `sdpa`"
            ) from None
        _TRACEABLE[name] = name not in _OPAQUE
        _log_choice(name, module, package)
    return name


def _log_choice(name: str, module: str, package: str) -> None:
    version = getattr(sys.modules.get(module.split(".")[0]), "__version__", "unknown version")
    if name in _OPAQUE:
        logger.info("attention: %s from %s %s, one custom-op node in compiled graphs", name, package, version)
    elif any(_has_op(ns, op) for ns, op in _PACKAGE_OPS[name]):
        logger.info("attention: %s from %s %s, torch custom ops traced into compiled graphs", name, package, version)
    else:
        logger.warning("attention: %s from %s %s does not register torch custom ops: compiled blocks break their "
                       "graph at attention (flash-attn >= 2.7 and 2025 FlashAttention 3 builds do not)",
                       name, package, version)


def _has_op(namespace: str, op: str) -> bool:
    try:
        return hasattr(getattr(torch.ops, namespace), op)
    except (AttributeError, RuntimeError):
        return False


@dataclass(frozen=True)
class DefaultPlan:
    """The backend used when none is asked for, and why (for the log)."""

    backend: str
    reason: str


def default_plan(capability: tuple[int, int] | None, fa3_error: str | None, fa3_traceable: bool) -> DefaultPlan:
    """The default backend on a GPU of this compute capability (None: no CUDA device). `fa3_error`: why
    `flash_attn_interface` did not import (None: it did); `fa3_traceable`: it registers torch custom ops, so
    compiled blocks keep one graph. FlashAttention 3 is written for Hopper (sm90 only; about 640 / 500 TFLOP/s
    forward / backward on an H100 against 595 / 460 for cuDNN's attention, which SDPA runs first there)."""
    if capability is None:
        return DefaultPlan("sdpa", "no CUDA device")
    name = f"sm{capability[0]}{capability[1]}"
    if capability[0] != 9:
        return DefaultPlan("sdpa", f"{name}: FlashAttention 3 runs on Hopper (sm90) GPUs only")
    if fa3_error is not None:
        return DefaultPlan("sdpa", f"{name}: FlashAttention 3 (flash_attn_interface) is not installed: {fa3_error}")
    if not fa3_traceable:
        return DefaultPlan("sdpa", f"{name}: this FlashAttention 3 build registers no torch custom ops (compiled "
                                   "blocks would break their graph at attention); `flash3 = true` still uses it")
    return DefaultPlan("flash3", f"{name}: FlashAttention 3 is installed")


class _DefaultChoice:
    plan: DefaultPlan | None = None


_DEFAULT = _DefaultChoice()


def choose_default(refresh: bool = False) -> str:
    """The backend for a run that names none: chosen once per process (or again with `refresh`), logged,
    and checked as `check_backend` checks a named one; returns its name."""
    if _DEFAULT.plan is None or refresh:
        capability = torch.cuda.get_device_capability() if torch.cuda.is_available() else None
        error, traceable = "not tried", False
        if capability is not None and capability[0] == 9:
            try:
                importlib.import_module(_OPTIONAL["flash3"][0])  # check_backend keeps it (sys.modules has it)
                error, traceable = None, any(_has_op(ns, op) for ns, op in _PACKAGE_OPS["flash3"])
            except Exception as exc:  # noqa: BLE001 - ImportError, or a build whose CUDA library fails to load
                error = f"{type(exc).__name__}: {exc}"
        _DEFAULT.plan = default_plan(capability, error, traceable)
        logger.info("attention: no backend set: %s (%s)", _DEFAULT.plan.backend, _DEFAULT.plan.reason)
    return check_backend(_DEFAULT.plan.backend)


@dataclass(frozen=True)
class SdpaPlan:
    """SDPA's kernel order for one GPU (None: PyTorch's own order) and why, for the log."""

    order: tuple[SDPBackend, ...] | None
    reason: str


def sdpa_plan(capability: tuple[int, int] | None, enabled: tuple[SDPBackend, ...]) -> SdpaPlan:
    """The kernel order for SDPA on a GPU of this compute capability (None: no CUDA device), given the
    kernels that are enabled. PyTorch tries FlashAttention 2, memory-efficient, math, then cuDNN; on
    Hopper (sm90) and newer, cuDNN's attention kernels are written for the architecture (FlashAttention 2
    is an Ampere design: about 330 / 290 TFLOP/s forward / backward on an H100 against 640 / 500 for
    FlashAttention 3), so cuDNN goes first there and the others stay behind it as fallbacks for shapes or
    dtypes cuDNN does not take."""
    if capability is None:
        return SdpaPlan(None, "no CUDA device: PyTorch's CPU kernels")
    name = f"sm{capability[0]}{capability[1]}"
    if capability < (9, 0) or SDPBackend.CUDNN_ATTENTION not in enabled:
        why = "before Hopper" if capability < (9, 0) else "cuDNN attention is disabled"
        return SdpaPlan(None, f"{name}: PyTorch's order (FlashAttention 2 first; {why})")
    preferred = (SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION,
                 SDPBackend.MATH)
    order = tuple(b for b in preferred if b in enabled)
    return SdpaPlan(order + tuple(b for b in enabled if b not in order),
                    f"{name}: " + ", then ".join(b.name for b in order))


class _SdpaChoice:
    """The process's SDPA plan: chosen at the first `choose_sdpa`, logged once."""

    order: tuple[SDPBackend, ...] | None = None
    plan: SdpaPlan | None = None


_SDPA = _SdpaChoice()


def _enabled_sdpa_kernels() -> tuple[SDPBackend, ...]:
    """The SDPA kernels enabled now (the helper `sdpa_kernel` itself reads; includes OVERRIDEABLE)."""
    return tuple(torch.nn.attention._cur_sdpa_kernel_backends())


def choose_sdpa(refresh: bool = False) -> SdpaPlan:
    """Choose SDPA's kernel order for the current CUDA device, once per process (or again with
    `refresh`), and log it."""
    if _SDPA.plan is not None and not refresh:
        return _SDPA.plan
    capability = torch.cuda.get_device_capability() if torch.cuda.is_available() else None
    enabled = _enabled_sdpa_kernels()
    plan = sdpa_plan(capability, enabled)
    _SDPA.plan, _SDPA.order = plan, plan.order
    logger.info("attention: SDPA kernel order %s", plan.reason)
    return plan


def attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, backend: str = "sdpa", split_batch: bool = False
) -> torch.Tensor:
    """Softmax attention, default scale 1/sqrt(D). q [B, Lq, H, D], k/v [B, Lk, H, D] -> [B, Lq, H, D].

    `split_batch` runs one sample at a time (`split_attn`): slower, but peak memory is that of batch 1.
    """
    if backend not in _TRACEABLE:
        backend = check_backend(backend)  # normally done by WanModel.set_attention_backend (AUTO: resolved)
    if torch.compiler.is_compiling() and not _TRACEABLE[backend]:
        def kernel(q, k, v):
            return _opaque(q, k, v, backend)
    else:
        kernel = _KERNELS[backend]
    if split_batch and q.shape[0] > 1:
        return torch.cat([kernel(q[i : i + 1], k[i : i + 1], v[i : i + 1]) for i in range(q.shape[0])])
    return kernel(q, k, v)

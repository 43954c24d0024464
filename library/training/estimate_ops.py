"""The counting ops of the step estimate (`estimate.py`): attention and RMSNorm as one op each, forward and
backward, the way the CUDA kernels run them. They only exist on the meta device, where they record shapes;
called with data they raise."""

from __future__ import annotations

import torch


# ---- the counting attention op ---------------------------------------------------------------------------


@torch.library.custom_op("wan_estimate::attention", mutates_args=())
def _attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    raise RuntimeError("wan_estimate::attention only counts, on the meta device")


@_attention.register_fake
def _(q, k, v):
    return torch.empty_like(q)  # the layout of q, as the flash / cuDNN kernels allocate it


@torch.library.custom_op("wan_estimate::attention_backward", mutates_args=())
def _attention_backward(grad: torch.Tensor, q: torch.Tensor, k: torch.Tensor,
                        v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    raise RuntimeError("wan_estimate::attention_backward only counts, on the meta device")


@_attention_backward.register_fake
def _(grad, q, k, v):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


_attention.register_autograd(lambda ctx, grad: _attention_backward(grad, *ctx.saved_tensors),
                             setup_context=lambda ctx, inputs, output: ctx.save_for_backward(*inputs))


def counting_sdpa(q, k, v, *args, **kwargs):
    """`F.scaled_dot_product_attention` ([B, H, L, D]) as the counting op."""
    return _attention(q, k, v)


@torch.library.custom_op("wan_estimate::rms_norm", mutates_args=())
def _rms_norm(x: torch.Tensor) -> torch.Tensor:
    raise RuntimeError("wan_estimate::rms_norm only counts, on the meta device")


@_rms_norm.register_fake
def _(x):
    return torch.empty_like(x)


@torch.library.custom_op("wan_estimate::rms_norm_backward", mutates_args=())
def _rms_norm_backward(grad: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    raise RuntimeError("wan_estimate::rms_norm_backward only counts, on the meta device")


@_rms_norm_backward.register_fake
def _(grad, x):
    return torch.empty_like(x)


_rms_norm.register_autograd(lambda ctx, grad: _rms_norm_backward(grad, *ctx.saved_tensors),
                            setup_context=lambda ctx, inputs, output: ctx.save_for_backward(*inputs))


def counting_rms_norm(x, normalized_shape, weight=None, eps=None):
    """`F.rms_norm` as CUDA runs it (one fused kernel forward, one backward; on the meta device it would
    decompose into the CPU formula's pow, mean, rsqrt and multiplies)."""
    out = _rms_norm(x)
    return out * weight if weight is not None else out

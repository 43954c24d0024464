"""CPU stand-ins for the optional attention packages (flash-attn 2, flash-attn 3, xformers, SageAttention),
installed into `sys.modules` so `library.wan.attention` can be tested without CUDA or the packages.

Each stand-in computes exact softmax attention and is built the way the real package is where that matters
to `torch.compile`:

- flash-attn >= 2.7: `flash_attn_func` is an autograd.Function over the torch custom ops
  `flash_attn::_flash_attn_forward` / `_flash_attn_backward` (fake kernels registered).
- flash-attn 3 (hopper `flash_attn_interface`): `flash_attn_func` calls the custom op
  `flash_attn_3::_flash_attn_forward`, whose autograd is registered on the op.
- xformers and SageAttention: plain Python over tensors (their real dispatch code is not something
  Dynamo can be trusted to trace); `library.wan.attention` wraps them in custom ops of its own.

The stand-ins count their calls (`CALLS`) so a test can tell which kernel ran.
"""

from __future__ import annotations

import importlib.machinery
import sys
import types
from collections import Counter

import torch

CALLS: Counter = Counter()
_MODULES = ("flash_attn", "flash_attn_interface", "xformers", "xformers.ops", "sageattention")


def _forward(q, k, v):
    """q [B, Lq, H, D], k/v [B, Lk, H, D] -> out [B, Lq, H, D], lse [B, H, Lq] (fp32)."""
    scores = torch.einsum("bqhd,bkhd->bhqk", q.float(), k.float()) * q.shape[-1] ** -0.5
    lse = torch.logsumexp(scores, dim=-1)
    out = torch.einsum("bhqk,bkhd->bqhd", torch.exp(scores - lse[..., None]), v.float())
    return out.to(q.dtype).contiguous(), lse.contiguous()


def _backward(dout, q, k, v, out, lse):
    scale = q.shape[-1] ** -0.5
    qf, kf, vf, df = q.float(), k.float(), v.float(), dout.float()
    p = torch.exp(torch.einsum("bqhd,bkhd->bhqk", qf, kf) * scale - lse[..., None])  # [B, H, Lq, Lk]
    dv = torch.einsum("bhqk,bqhd->bkhd", p, df)
    dp = torch.einsum("bqhd,bkhd->bhqk", df, vf)
    delta = (df * out.float()).sum(-1).transpose(1, 2)  # [B, H, Lq]
    ds = p * (dp - delta[..., None]) * scale
    dq = torch.einsum("bhqk,bkhd->bqhd", ds, kf)
    dk = torch.einsum("bhqk,bqhd->bkhd", ds, qf)
    return dq.to(q.dtype).contiguous(), dk.to(k.dtype).contiguous(), dv.to(v.dtype).contiguous()


def _fake_forward(q, k, v):
    return torch.empty_like(q), q.new_empty(q.shape[0], q.shape[2], q.shape[1], dtype=torch.float32)


def _register_ops() -> dict:
    """The custom ops of the flash-attn 2 / 3 stand-ins, registered once per process."""
    if hasattr(_register_ops, "ops"):
        return _register_ops.ops

    @torch.library.custom_op("flash_attn::_flash_attn_forward", mutates_args=())
    def fa2_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        CALLS["flash_attn"] += 1
        return _forward(q, k, v)

    @torch.library.custom_op("flash_attn::_flash_attn_backward", mutates_args=())
    def fa2_backward(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                     lse: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return _backward(dout, q, k, v, out, lse)

    @torch.library.custom_op("flash_attn_3::_flash_attn_forward", mutates_args=())
    def fa3_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        CALLS["flash3"] += 1
        return _forward(q, k, v)

    fa2_forward.register_fake(_fake_forward)
    fa3_forward.register_fake(_fake_forward)
    fa2_backward.register_fake(lambda dout, q, k, v, out, lse: (torch.empty_like(q), torch.empty_like(k),
                                                                  torch.empty_like(v)))

    def setup(ctx, inputs, output):
        ctx.save_for_backward(*inputs, *output)

    def fa3_grad(ctx, dout, dlse):
        q, k, v, out, lse = ctx.saved_tensors
        return _backward(dout, q, k, v, out, lse)

    fa3_forward.register_autograd(fa3_grad, setup_context=setup)
    _register_ops.ops = {"fa2_forward": fa2_forward, "fa2_backward": fa2_backward, "fa3_forward": fa3_forward}
    return _register_ops.ops


class _FlashAttnFunc(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v):
        out, lse = torch.ops.flash_attn._flash_attn_forward(q, k, v)
        ctx.save_for_backward(q, k, v, out, lse)
        return out

    @staticmethod
    def backward(ctx, dout):
        return torch.ops.flash_attn._flash_attn_backward(dout, *ctx.saved_tensors)


def _flash_attn_module() -> types.ModuleType:
    module = types.ModuleType("flash_attn")
    module.__version__ = "2.8.3"
    module.flash_attn_func = lambda q, k, v, **kwargs: _FlashAttnFunc.apply(q, k, v)
    return module


def _flash3_module() -> types.ModuleType:
    module = types.ModuleType("flash_attn_interface")

    def flash_attn_func(q, k, v, **kwargs):
        out, lse = torch.ops.flash_attn_3._flash_attn_forward(q, k, v)
        return out, lse  # FA3 builds of 2024 return (out, lse); newer ones return out alone

    module.flash_attn_func = flash_attn_func
    return module


def _xformers_modules() -> tuple[types.ModuleType, types.ModuleType]:
    package, ops = types.ModuleType("xformers"), types.ModuleType("xformers.ops")
    package.__version__, package.ops = "0.0.32", ops

    def forward_requires_grad(q, k, v, attn_bias=None, p=0.0, scale=None, **kwargs):
        CALLS["xformers"] += 1
        return _forward(q, k, v)

    def backward(grad, output, lse, q, k, v, attn_bias=None, p=0.0, scale=None, **kwargs):
        return _backward(grad, q, k, v, output, lse)

    ops.memory_efficient_attention_forward_requires_grad = forward_requires_grad
    ops.memory_efficient_attention_backward = backward
    ops.memory_efficient_attention = lambda q, k, v, **kwargs: forward_requires_grad(q, k, v)[0]
    return package, ops


def _sage_module() -> types.ModuleType:
    module = types.ModuleType("sageattention")

    def sageattn(q, k, v, tensor_layout="HND", **kwargs):
        assert tensor_layout == "NHD"
        CALLS["sage_attn"] += 1
        return _forward(q, k, v)[0]

    module.sageattn = sageattn
    return module


def install() -> None:
    """Put every stand-in into `sys.modules` (the real packages must not be installed)."""
    _register_ops()
    package, ops = _xformers_modules()
    for name, module in (("flash_attn", _flash_attn_module()), ("flash_attn_interface", _flash3_module()),
                         ("xformers", package), ("xformers.ops", ops), ("sageattention", _sage_module())):
        module.__spec__ = importlib.machinery.ModuleSpec(name, None)
        sys.modules[name] = module


def uninstall() -> None:
    for name in _MODULES:
        sys.modules.pop(name, None)

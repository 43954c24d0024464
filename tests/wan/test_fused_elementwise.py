"""The fused elementwise pieces of a block (issue 17, lever 2) against the unfused formulas they replaced:
RMSNorm through `F.rms_norm`, the real-valued RoPE on (cos, sin) tables, modulation and the gated residual
as one `addcmul` each. fp32 within 1e-6 relative; bf16 exactly as before where the order of operations is
the official one (RMSNorm), else within one bf16 rounding."""

from __future__ import annotations

import pytest
import torch

from library.wan.model import RMSNorm, apply_rope, gated_residual, modulate, rope_axis_dims, rope_tables


def _rel(a, b):
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rms_norm_is_the_official_formula(dtype):
    torch.manual_seed(0)
    norm = RMSNorm(64)
    norm.weight.data = 1 + 0.1 * torch.randn(64)
    x = (3 * torch.randn(2, 9, 64)).to(dtype)
    xf = x.float()
    official = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-6)).to(dtype) * norm.weight.to(dtype)
    got = norm(x)
    assert got.dtype == dtype and torch.equal(got, official)


def _rope_reference(x, grid, head_dim):
    """Complex multiplication in float64 by the official per-axis angles (interleaved pairs)."""
    parts = []
    for axis, (size, dim) in enumerate(zip(grid, rope_axis_dims(head_dim))):
        inv = 1.0 / 10000.0 ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim)
        angle = torch.arange(size, dtype=torch.float64)[:, None] * inv
        shape = [1, 1, 1, angle.shape[1]]
        shape[axis] = size
        parts.append(angle.view(shape).expand(*grid, angle.shape[1]))
    angles = torch.cat(parts, -1).reshape(-1, head_dim // 2)  # [L, D/2]
    z = torch.view_as_complex(x.double().unflatten(-1, (-1, 2)).contiguous())  # [B, L, H, D/2]
    return torch.view_as_real(z * torch.polar(torch.ones_like(angles), angles)[None, :, None]).flatten(-2)


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-6), (torch.bfloat16, 8e-3)])
def test_rope_matches_complex_rotation(dtype, tol):
    grid, head_dim = (3, 4, 5), 24
    torch.manual_seed(1)
    x = torch.randn(2, 60, 3, head_dim).to(dtype)
    cos, sin = rope_tables(grid, head_dim, "cpu")
    got = apply_rope(x, cos, sin)
    assert got.dtype == dtype and got.shape == x.shape
    assert _rel(got, _rope_reference(x, grid, head_dim)) <= tol


def test_rope_gradient_is_the_inverse_rotation():
    grid, head_dim = (2, 3, 3), 16
    x = torch.randn(1, 18, 2, head_dim, dtype=torch.float64, requires_grad=True)
    cos, sin = (t.double() for t in rope_tables(grid, head_dim, "cpu"))
    grad = torch.randn(1, 18, 2, head_dim, dtype=torch.float64)
    (got,) = torch.autograd.grad(apply_rope(x, cos, sin), x, grad)
    inverse = apply_rope(grad, cos, torch.stack([-sin[..., 0], -sin[..., 1]], -1))  # rotate back
    assert torch.allclose(got, inverse, atol=1e-12)


@pytest.mark.parametrize("groups", [1, 3])
def test_modulate_and_gated_residual_match_the_plain_formulas(groups):
    torch.manual_seed(2)
    b, length, c = 2, 12, 16
    x, shift, scale, g = torch.randn(b, length, c), *(torch.randn(b, groups, c) for _ in range(3))
    y = torch.randn(b, length, c, dtype=torch.bfloat16)

    def grouped(t):
        return t.repeat_interleave(length // groups, dim=1)

    assert _rel(modulate(x, shift, scale), x * (1 + grouped(scale)) + grouped(shift)) <= 1e-6
    assert _rel(gated_residual(x, y, g), x + y.float() * grouped(g)) <= 1e-6
    assert gated_residual(x, y, g).dtype == torch.float32

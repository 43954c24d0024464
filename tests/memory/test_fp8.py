"""fp8 weights: quantisation error bounds, FP8Linear against its bf16 / fp32 reference, LoRA training
over it, whole-model conversion, and loading fp8_scaled files as stored."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file

from library.wan.fp8 import (FP8_MAX, FP8Config, FP8Linear, dequantize_weight, fp8_targets, quantize_model_fp8,
                             quantize_weight, relative_error)
from library.wan.loading import load_dit
from library.wan.variants import get_variant
from networks.lora_wan import create_network
from tests.helpers import random_official_dit_state
from tests.memory.conftest import tiny_inputs, tiny_model
from tests.wan.test_loading import to_fp8_scaled


def rows_of_different_scale(out=64, inp=48, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(out, inp, generator=g) * torch.logspace(-5, 0, out)[:, None]  # rows from 1e-5 to 1


def test_quantisation_error_bounds_and_round_trip():
    w = torch.randn(256, 128, generator=torch.Generator().manual_seed(0)) * 0.02
    for per_channel in (False, True):
        q, scale = quantize_weight(w, scaled=True, per_channel=per_channel)
        assert q.dtype == torch.float8_e4m3fn and scale.dtype == torch.float32
        assert scale.shape == ((256,) if per_channel else ())
        assert relative_error(w, q, scale) < 0.04  # 3 mantissa bits: <= 1/16 per element, ~2.5% overall
        deq = dequantize_weight(q, scale, torch.float32)
        assert deq.abs().max() <= w.abs().max() * (1 + 2**-4)  # the largest value maps onto 448, not past it
        q2, scale2 = quantize_weight(deq, True, per_channel)  # dequantised values are exactly representable
        assert torch.equal(dequantize_weight(q2, scale2, torch.float32), deq)


def test_per_channel_beats_per_tensor_when_rows_differ_and_scaling_beats_none_for_small_weights():
    w = rows_of_different_scale()
    small = slice(0, 8)  # the rows 1e5 times smaller than the largest fall into fp8's subnormals per tensor
    per_tensor = relative_error(w[small], *[t[small] if t.dim() else t for t in quantize_weight(w, True, False)])
    q, scale = quantize_weight(w, True, True)
    per_channel = relative_error(w[small], q[small], scale[small])
    assert per_channel < 0.04 and per_tensor > 3 * per_channel
    assert relative_error(w, q, scale) < 0.04
    small = torch.randn(128, 128, generator=torch.Generator().manual_seed(1)) * 2e-3  # fp8 subnormal range
    assert relative_error(small, *quantize_weight(small, False)) > 3 * relative_error(small, *quantize_weight(small))


def test_unscaled_clamps_and_zero_rows_stay_zero():
    w = torch.tensor([[1000.0, -1000.0, 0.5], [0.0, 0.0, 0.0]])
    q, scale = quantize_weight(w, scaled=False)
    assert scale is None and q.float()[0, :2].tolist() == [FP8_MAX, -FP8_MAX]
    q, scale = quantize_weight(w, scaled=True, per_channel=True)
    assert torch.isfinite(q.float()).all() and q.float()[1].abs().sum() == 0


def test_fp8_linear_matches_its_reference():
    torch.manual_seed(0)
    linear = nn.Linear(48, 64)
    layer, err = FP8Linear.from_linear(linear, FP8Config(per_channel=True))
    assert isinstance(layer, nn.Linear) and layer.weight.dtype == torch.float8_e4m3fn and 0 < err < 0.04
    assert not layer.weight.requires_grad
    x = torch.randn(2, 5, 48)
    deq = dequantize_weight(layer.weight, layer.scale_weight, torch.float32)
    torch.testing.assert_close(layer(x), F.linear(x, deq, linear.bias), rtol=1e-6, atol=1e-6)  # fp32 compute
    xb = x.bfloat16()
    out = layer(xb)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out, F.linear(xb, deq.bfloat16(), linear.bias.bfloat16()))
    full = linear(x)
    assert (out.float() - full).norm() / full.norm() < 0.05  # within the fp8 + bf16 error of the full layer
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert layer(x).dtype == torch.bfloat16


def test_backward_keeps_only_the_fp8_weight():
    torch.manual_seed(0)
    layer, _ = FP8Linear.from_linear(nn.Linear(32, 40))
    x = torch.randn(4, 32, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = layer(x)
    assert [t.dtype for t in saved if t.shape == layer.weight.shape] == [torch.float8_e4m3fn]
    g = torch.randn_like(y)
    y.backward(g)
    deq = dequantize_weight(layer.weight, layer.scale_weight, torch.float32)
    torch.testing.assert_close(x.grad, g @ deq)


def test_dtype_casts_keep_fp8_weights_and_fp32_scales():
    model = tiny_model(get_variant("t2v-tiny"))
    quantize_model_fp8(model)
    q = model.blocks[0].self_attn.q
    weight, scale = q.weight.clone(), q.scale_weight.clone()
    model.to(torch.bfloat16)
    assert q.weight.dtype == torch.float8_e4m3fn and torch.equal(q.weight.view(torch.uint8), weight.view(torch.uint8))
    assert q.scale_weight.dtype == torch.float32 and torch.equal(q.scale_weight, scale)


def test_lora_over_fp8_trains_only_the_lora():
    variant = get_variant("t2v-tiny")
    model = tiny_model(variant)
    quantize_model_fp8(model, scaled=True)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters()}
    torch.manual_seed(0)
    net = create_network(1.0, 4, 4, None, None, model)
    net.apply_to()
    assert all(isinstance(lo.org_module, FP8Linear) for lo in net.loras if lo.official_name.startswith("blocks."))
    opt = torch.optim.AdamW(net.parameters(), lr=1e-2)
    x, t, ctx = tiny_inputs(variant)
    target = torch.randn(1, 16, 3, 4, 4)
    losses = []
    for _ in range(4):
        loss = (model(x, t, ctx) - target).pow(2).mean()
        loss.backward()
        assert all(p.grad is None for p in model.parameters())
        assert all(lo.lora_up.weight.grad.abs().sum() > 0 for lo in net.loras)
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    for n, p in model.named_parameters():
        assert torch.equal(p.view(torch.uint8) if p.dtype == torch.float8_e4m3fn else p,
                           frozen[n].view(torch.uint8) if p.dtype == torch.float8_e4m3fn else frozen[n]), n


def test_quantize_model_converts_only_block_linears_and_stays_close():
    variant = get_variant("t2v-tiny")
    model, ref = tiny_model(variant), tiny_model(variant)
    targets = fp8_targets(model)
    report = quantize_model_fp8(model, scaled=True, per_channel=True)
    assert report.layers == len(targets) == 10 * variant.num_layers and set(report.errors) == set(targets)
    assert 0 < report.mean_error <= report.max_error < 0.04
    assert report.bytes_after < report.bytes_before / 3  # fp32 -> fp8 (+ scales)
    fp8 = {n for n, m in model.named_modules() if isinstance(m, FP8Linear)}
    assert fp8 == set(targets)
    assert not any(k in n for n in fp8 for k in ("embedding", "projection", "head", "norm"))
    assert model.text_embedding[0].weight.dtype == torch.float32 and model.compute_dtype == torch.float32
    x, t, ctx = tiny_inputs(variant)
    with torch.no_grad():
        a, b = ref(x, t, ctx), model(x, t, ctx)
    assert (a - b).norm() / a.norm() < 0.03


@pytest.fixture(scope="module")
def state():
    return random_official_dit_state(get_variant("t2v-tiny"))


@pytest.mark.parametrize("spelling", ["scale_weight", "weight_scale"])
def test_fp8_scaled_file_is_used_as_stored(tmp_path, state, spelling, monkeypatch):
    path = tmp_path / "fp8_scaled.safetensors"
    save_file({k: v.contiguous() for k, v in to_fp8_scaled(state, spelling).items()}, str(path))
    dequantised = load_dit(path, dtype=torch.float32)  # the existing path: dequantise to the dtype
    import library.wan.loading_fp8 as loading_module

    monkeypatch.setattr(loading_module, "quantize_weight",
                        lambda *a, **k: pytest.fail("re-quantised a stored fp8 weight"))
    model = load_dit(path, dtype=torch.float32, fp8=FP8Config())
    assert model.fp8_report.mode == "from file, scaled" and model.fp8_report.layers == 20
    with safe_open(str(path), "pt") as fh:
        for name in fp8_targets(dequantised):
            layer = model.get_submodule(name)
            assert isinstance(layer, FP8Linear)
            assert torch.equal(layer.weight.view(torch.uint8), fh.get_tensor(f"{name}.weight").view(torch.uint8))
            assert torch.equal(layer.scale_weight, fh.get_tensor(f"{name}.{spelling}").float())
            deq = dequantize_weight(layer.weight, layer.scale_weight, torch.float32)
            assert torch.equal(deq, dequantised.get_submodule(name).weight), name
    assert type(model.text_embedding[0]) is nn.Linear and type(model.head.head) is nn.Linear
    x, t, ctx = tiny_inputs(get_variant("t2v-tiny"))
    with torch.no_grad():
        torch.testing.assert_close(model(x, t, ctx), dequantised(x, t, ctx), rtol=1e-5, atol=1e-5)


def test_other_files_are_quantised_while_loading_like_converting(tmp_path, state):
    path = tmp_path / "bf16.safetensors"
    save_file({k: v.bfloat16().contiguous() for k, v in state.items()}, str(path))
    loaded = load_dit(path, dtype=torch.bfloat16, fp8=FP8Config(per_channel=True))
    converted = load_dit(path, dtype=torch.bfloat16)
    quantize_model_fp8(converted, per_channel=True)
    for name in fp8_targets(tiny_model(get_variant("t2v-tiny"))):
        a, b = loaded.get_submodule(name), converted.get_submodule(name)
        assert torch.equal(a.weight.view(torch.uint8), b.weight.view(torch.uint8))
        assert torch.equal(a.scale_weight, b.scale_weight) and torch.equal(a.bias, b.bias)
    assert set(loaded.fp8_report.errors) == set(fp8_targets(tiny_model(get_variant("t2v-tiny"))))
    assert loaded.blocks[0].modulation.dtype == torch.float32 and loaded.compute_dtype == torch.bfloat16


@pytest.mark.gpu
def test_scaled_mm_forward_close_to_dequantised_on_gpu():
    from library.wan.fp8 import scaled_mm_supported

    if not scaled_mm_supported(torch.device("cuda"), 256, 512):
        pytest.skip("GPU without fp8 tensor cores (needs compute capability 8.9+)")
    torch.manual_seed(0)
    linear = nn.Linear(256, 512, device="cuda", dtype=torch.bfloat16)
    for per_channel in (False, True):
        slow, _ = FP8Linear.from_linear(linear, FP8Config(per_channel=per_channel))
        fast, _ = FP8Linear.from_linear(linear, FP8Config(per_channel=per_channel, use_scaled_mm=True))
        x = torch.randn(3, 100, 256, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        a, b = slow(x), fast(x)
        assert not fast._scaled_mm_failed
        assert (a.float() - b.float()).norm() / a.float().norm() < 0.05
        b.sum().backward()
        assert x.grad is not None and torch.isfinite(x.grad).all()


@pytest.mark.gpu
def test_fp8_model_on_gpu_close_to_bf16():
    variant = get_variant("t2v-tiny")
    model, ref = tiny_model(variant).cuda().bfloat16(), tiny_model(variant).cuda().bfloat16()
    quantize_model_fp8(model)
    x, t, ctx = tiny_inputs(variant)
    with torch.no_grad():
        a, b = ref(x.cuda(), t.cuda(), [c.cuda() for c in ctx]), model(x.cuda(), t.cuda(), [c.cuda() for c in ctx])
    assert (a - b).norm() / a.norm() < 0.05

"""Attention backends: the same numbers from every kernel, no graph break in a compiled block whichever
backend runs (CPU stand-ins for the CUDA packages, tests/wan/attention_standins.py), each package imported
once, and SDPA's kernel order chosen once per process for the GPU (faked device capabilities)."""

from __future__ import annotations

import dataclasses
import importlib
import logging

import pytest
import torch
import torch._dynamo
from torch._dynamo.utils import counters
from torch.nn.attention import SDPBackend

from library.wan import attention as attn
from library.wan.model import WanModel
from library.wan.variants import get_variant
from tests.wan import attention_standins

BACKENDS = ("sdpa", "flash_attn", "flash3", "xformers", "sage_attn")
TRAINABLE = ("sdpa", "flash_attn", "flash3", "xformers")


@pytest.fixture
def standins(monkeypatch):
    """The stand-in packages installed, this module's import cache and SDPA choice fresh, Dynamo reset."""
    attention_standins.install()
    monkeypatch.setattr(attn, "_IMPORTED", {})
    monkeypatch.setattr(attn, "_TRACEABLE", {"sdpa": True})
    monkeypatch.setattr(attn, "_SDPA", attn._SdpaChoice())
    torch._dynamo.reset()
    yield attention_standins.CALLS
    torch._dynamo.reset()
    attention_standins.uninstall()


def _qkv(dtype=torch.float32, lq=10, lk=7):
    torch.manual_seed(0)
    return [torch.randn(2, n, 3, 16, dtype=dtype, requires_grad=True) for n in (lq, lk, lk)]


def _reference(q, k, v):
    """Plain softmax attention in float64."""
    q, k, v = (t.detach().double().requires_grad_(True) for t in (q, k, v))
    p = torch.softmax(torch.einsum("bqhd,bkhd->bhqk", q, k) / q.shape[-1] ** 0.5, dim=-1)
    return torch.einsum("bhqk,bkhd->bqhd", p, v), (q, k, v)


def _rel(a, b):
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


@pytest.mark.parametrize("backend", BACKENDS)
def test_every_backend_computes_attention(standins, backend):
    """fp32 kernels (sdpa, xformers) within 1e-5 of float64 attention, forward and gradients; the kernels
    that only run in bf16 (flash-attn 2 / 3, SageAttention) within bf16 rounding (1e-2)."""
    q, k, v = _qkv()
    attn.check_backend(backend)
    out = attn.attention(q, k, v, backend)
    ref, ref_inputs = _reference(q, k, v)
    tol = 1e-5 if backend in ("sdpa", "xformers") else 1e-2
    assert out.dtype == torch.float32 and _rel(out, ref) <= tol
    if backend != "sage_attn":
        grad = torch.randn_like(out)
        got = torch.autograd.grad(out, (q, k, v), grad)
        want = torch.autograd.grad(ref, ref_inputs, grad.double())
        assert all(_rel(g, w) <= tol for g, w in zip(got, want))
    assert backend == "sdpa" or standins[backend] >= 1


def _block_and_args(backend, layers=1):
    variant = dataclasses.replace(get_variant("t2v-tiny"), num_layers=layers)
    torch.manual_seed(0)
    model = WanModel(variant)
    torch.nn.init.normal_(model.head.head.weight, std=0.2)  # zero from init_weights: the loss would be 0
    model.set_attention_backend(backend)
    inputs = (torch.randn(1, variant.in_dim, 3, 4, 6), torch.tensor([500.0]), [torch.randn(7, variant.text_dim)])
    return model, inputs


def _block_args(model, inputs):
    """The arguments the model passes to its first block."""
    captured = {}
    block = model.blocks[0]

    def grab(*args):
        captured["args"] = args
        raise StopIteration

    block.forward, original = grab, block.forward
    with pytest.raises(StopIteration), torch.no_grad():
        model(*inputs)
    block.forward = original
    return captured["args"]


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_block_is_one_graph_for_every_backend(standins, backend):
    """Before: 9 graphs and 8 breaks per block for every optional backend (`importlib` on each call)."""
    model, inputs = _block_and_args(backend)
    explained = torch._dynamo.explain(model.blocks[0])(*_block_args(model, inputs))
    assert (explained.graph_count, explained.graph_break_count) == (1, 0), explained.break_reasons


@pytest.mark.parametrize("backend", TRAINABLE)
def test_compiled_blocks_train_like_eager_ones_without_breaks(standins, backend):
    """Two blocks compiled (aot_eager: Dynamo + AOT autograd, where the fake kernels and the registered
    backward matter), forward and backward: one graph for both blocks, no break, same loss and gradients."""
    model, inputs = _block_and_args(backend, layers=2)
    model.enable_gradient_checkpointing(True)
    model.requires_grad_(True)

    def loss_and_grads():
        model.zero_grad()
        loss = model(*inputs).square().mean()
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in model.blocks.parameters()]

    eager_loss, eager_grads = loss_and_grads()
    counters.clear()
    for block in model.blocks:
        block.compile(backend="aot_eager")
    loss, grads = loss_and_grads()
    assert sum(counters["graph_break"].values()) == 0, dict(counters["graph_break"])
    assert counters["stats"]["unique_graphs"] == 1
    assert _rel(loss, eager_loss) <= 1e-5
    assert max(_rel(g, w) for g, w in zip(grads, eager_grads) if w.abs().max() > 0) <= 1e-4


def test_compiled_inference_with_sage_attention(standins):
    model, inputs = _block_and_args("sage_attn", layers=2)
    with torch.no_grad():
        eager = model(*inputs)
        for block in model.blocks:
            block.compile(backend="aot_eager")
        counters.clear()
        compiled = model(*inputs)
    assert sum(counters["graph_break"].values()) == 0
    assert _rel(compiled, eager) <= 1e-6


def test_sage_attention_refuses_a_backward_pass_while_compiled(standins):
    q, k, v = _qkv()
    attn.check_backend("sage_attn")
    out = torch.compile(lambda q, k, v: attn.attention(q, k, v, "sage_attn"), backend="aot_eager")(q, k, v)
    with pytest.raises(RuntimeError, match="inference only"):
        out.sum().backward()


def test_packages_are_imported_once(standins, monkeypatch):
    imports = []
    real = importlib.import_module
    monkeypatch.setattr(importlib, "import_module", lambda name, *a: imports.append(name) or real(name, *a))
    q, k, v = _qkv()
    for _ in range(3):
        attn.check_backend("flash3")
        attn.attention(q, k, v, "flash3")
    assert imports.count("flash_attn_interface") == 1


def test_old_flash_attention_builds_are_named_in_a_warning(standins, monkeypatch, caplog):
    monkeypatch.setattr(attn, "_PACKAGE_OPS", {"flash_attn": (("no_such_namespace", "fwd"),)})
    with caplog.at_level(logging.INFO, logger=attn.__name__):
        attn.check_backend("flash_attn")
    assert any(r.levelno == logging.WARNING and "break their graph" in r.getMessage() for r in caplog.records)


# ---- SDPA's kernel order -----------------------------------------------------------------------------------

ALL = (SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH, SDPBackend.CUDNN_ATTENTION,
       SDPBackend.OVERRIDEABLE)


@pytest.mark.parametrize("capability, first", [(None, None), ((8, 0), None), ((8, 9), None),
                                               ((9, 0), SDPBackend.CUDNN_ATTENTION),
                                               ((10, 0), SDPBackend.CUDNN_ATTENTION)])
def test_sdpa_order_per_gpu(capability, first):
    plan = attn.sdpa_plan(capability, ALL)
    if first is None:
        assert plan.order is None
    else:
        assert plan.order[:4] == (SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION,
                                  SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH)
        assert set(plan.order) == set(ALL)  # nothing enabled is switched off: the others stay as fallbacks


def test_sdpa_order_keeps_a_disabled_cudnn_disabled():
    enabled = tuple(b for b in ALL if b != SDPBackend.CUDNN_ATTENTION)
    assert attn.sdpa_plan((9, 0), enabled).order is None
    assert SDPBackend.FLASH_ATTENTION not in attn.sdpa_plan((9, 0), (SDPBackend.CUDNN_ATTENTION,
                                                                     SDPBackend.MATH)).order


def test_sdpa_choice_is_made_once_per_process_and_logged(standins, monkeypatch, caplog):
    """A faked H100 (sm90): cuDNN first, logged once however many models and forward passes follow."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    with caplog.at_level(logging.INFO, logger=attn.__name__):
        for _ in range(3):
            WanModel(get_variant("t2v-tiny")).set_attention_backend("sdpa")
    lines = [r.getMessage() for r in caplog.records if "SDPA kernel order" in r.getMessage()]
    assert lines == ["attention: SDPA kernel order sm90: CUDNN_ATTENTION, then FLASH_ATTENTION, then "
                     "EFFICIENT_ATTENTION, then MATH"]
    assert attn._SDPA.order[0] == SDPBackend.CUDNN_ATTENTION


def test_sdpa_with_a_kernel_order_is_one_graph_and_the_same_numbers(standins, monkeypatch):
    """The order is applied around each SDPA call (`sdpa_kernel(..., set_priority=True)`), inside the
    compiled graph, and restored after it."""
    model, inputs = _block_and_args("sdpa")
    args = _block_args(model, inputs)
    with torch.no_grad():
        plain = model.blocks[0](*args)
    monkeypatch.setattr(attn._SDPA, "order", attn.sdpa_plan((9, 0), ALL).order)
    before = torch._C._get_sdp_priority_order()
    explained = torch._dynamo.explain(model.blocks[0])(*args)
    assert (explained.graph_count, explained.graph_break_count) == (1, 0), explained.break_reasons
    with torch.no_grad():
        ordered = model.blocks[0](*args)
    assert torch._C._get_sdp_priority_order() == before
    assert _rel(ordered, plain) <= 1e-6

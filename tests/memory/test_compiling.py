"""Compiled blocks (issue 17, lever 2): one graph for every bucket shape, and a backend that cannot compile
on this machine leaves the blocks eager with one warning."""

from __future__ import annotations

import dataclasses
import logging

import pytest
import torch
import torch._dynamo
from torch._dynamo.utils import counters

from library.config.schema import CompileArgs
from library.runtime import compiling
from library.runtime.compiling import compile_blocks
from library.wan.model import WanModel
from library.wan.variants import get_variant

BUCKETS = [(3, 4, 6), (5, 4, 4), (2, 6, 8), (3, 8, 8), (5, 6, 6)]  # latent (F, H, W) of five buckets


@pytest.fixture
def fresh_dynamo():
    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()


def _model(layers=3):
    torch.manual_seed(0)
    return WanModel(dataclasses.replace(get_variant("t2v-tiny"), num_layers=layers)).requires_grad_(False)


def _run_buckets(model):
    v = model.variant
    with torch.no_grad():
        return [model(torch.randn(1, v.in_dim, *shape), torch.tensor([500.0]), [torch.randn(7, v.text_dim)])
                for shape in BUCKETS]


@pytest.mark.parametrize("dynamic, graphs", [(None, 1), ("false", len(BUCKETS))])
def test_one_graph_serves_every_bucket(fresh_dynamo, dynamic, graphs):
    model = _model()
    assert compile_blocks(model, CompileArgs(compile=True, compile_backend="eager", compile_dynamic=dynamic)) == 3
    counters.clear()  # the backend check's own small graph
    _run_buckets(model)
    assert counters["stats"]["unique_graphs"] == graphs


def test_a_backend_that_cannot_compile_leaves_the_blocks_eager_with_one_warning(fresh_dynamo, monkeypatch,
                                                                                caplog):
    @torch._dynamo.register_backend(name="wan_test_broken")
    def broken(gm, example_inputs):
        raise RuntimeError("no C++ compiler found\nmore detail")

    monkeypatch.setattr(compiling, "_WORKS", {})
    monkeypatch.delattr(compile_blocks, "warned", raising=False)
    eager = _model()
    expected = _run_buckets(eager)
    with caplog.at_level(logging.WARNING, logger=compiling.__name__):
        models = [_model(), _model()]
        args = CompileArgs(compile=True, compile_backend="wan_test_broken")
        assert [compile_blocks(m, args) for m in models] == [0, 0]
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "no C++ compiler found" in warnings[0] and "run eagerly" in warnings[0]
    assert all(block._compiled_call_impl is None for block in models[0].blocks)
    assert all(torch.equal(a, b) for a, b in zip(_run_buckets(models[0]), expected))


def test_compile_defaults_to_on_for_cuda_and_off_elsewhere(monkeypatch):
    """`compile` not set: compiled on a CUDA device, eager on the CPU; set, it decides everywhere."""
    from library.config import config_from_dict

    unset = config_from_dict({}).compilation
    assert unset.compile is None
    assert compiling.compile_wanted(unset, "cuda") and compiling.compile_wanted(unset, torch.device("cuda", 1))
    assert not compiling.compile_wanted(unset, "cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # no device given: CUDA when there is one
    assert compiling.compile_wanted(unset)
    off = config_from_dict({"compile": False}).compilation
    on = config_from_dict({"compile": "true"}).compilation
    assert not compiling.compile_wanted(off, "cuda") and compiling.compile_wanted(on, "cpu")


def test_unset_compile_on_cuda_compiles_the_blocks_and_false_does_not(fresh_dynamo, monkeypatch, caplog):
    """The default on a (pretended) CUDA device goes through the same path as `compile = true`, with the
    backend check run on the CPU tensors this test has; `compile = false` leaves the blocks eager."""
    monkeypatch.setattr(compiling, "compile_problem", lambda backend, mode, device: None)
    model = _model()
    with caplog.at_level(logging.INFO, logger=compiling.__name__):
        assert compile_blocks(model, CompileArgs(compile_backend="eager"), "cuda") == 3
    assert "the default on a CUDA GPU" in caplog.text
    assert all(block._compiled_call_impl is not None for block in model.blocks)
    eager = _model()
    assert compile_blocks(eager, CompileArgs(compile=False, compile_backend="eager"), "cuda") == 0
    assert compile_blocks(eager, CompileArgs(compile_backend="eager"), "cpu") == 0
    assert all(block._compiled_call_impl is None for block in eager.blocks)


def test_compile_flag_takes_an_optional_value():
    from library.config import load_config

    assert load_config(["--compile"]).compilation.compile is True
    assert load_config(["--compile", "false"]).compilation.compile is False
    assert load_config([]).compilation.compile is None

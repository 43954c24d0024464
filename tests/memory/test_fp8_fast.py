"""`fp8_fast` (issue 17, lever 6): the training key for fp8 matmuls of the frozen fp8 base. Its rule, the
planner planning with fp8 weights, the dispatch (fp8 matmuls only where the device has them, one warning
and dequantised bf16 matmuls elsewhere), and a tiny LoRA step through the real `torch._scaled_mm` (it runs
on the CPU in torch 2.13) against the dequantising path."""

from __future__ import annotations

import logging

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from library.config import ConfigError, config_from_dict, validate
from library.config.schema import MemoryArgs
from library.runtime import memory as runtime_memory
from library.runtime.memory import apply_memory_features, fp8_config
from library.training.planning.lora import Settings, plan_memory
from library.wan import fp8
from library.wan.fp8 import FP8Linear
from library.wan.model import WanModel
from library.wan.variants import get_variant
from tests.helpers import attach_trained_lora, random_official_dit_state

VALID = {"dit": "low.safetensors", "dataset_config": "data.toml"}


def test_fp8_fast_needs_fp8_weights_or_the_planner():
    with pytest.raises(ConfigError, match="`fp8_fast` multiplies the fp8 block weights in fp8: it needs `fp8_base"):
        validate(config_from_dict({**VALID, "fp8_fast": True}))
    assert validate(config_from_dict({**VALID, "fp8_fast": True, "fp8_base": True, "fp8_scaled": True})).memory.fp8_fast
    assert validate(config_from_dict({**VALID, "fp8_fast": True, "auto_memory": True})).memory.fp8_fast
    with pytest.raises(ConfigError, match="`fp8_fast` cannot be used with full fine-tuning"):
        validate(config_from_dict({**VALID, "fp8_fast": True, "auto_memory": True, "full_fine_tune": True,
                                   "learning_rate": 1e-5}))
    assert fp8_config(MemoryArgs(fp8_base=True, fp8_scaled=True, fp8_fast=True)).use_scaled_mm
    assert not fp8_config(MemoryArgs(fp8_base=True, fp8_scaled=True)).use_scaled_mm


def test_planner_with_fp8_fast_plans_fp8_weights():
    plain = plan_memory(80, "t2v-A14B", 832, 480, 81)
    fast = plan_memory(80, "t2v-A14B", 832, 480, 81, fp8=True)
    # bf16 weights: every block's attention kept only with the block inputs offloaded
    assert plain.rung == Settings(checkpointing=True, offload_activations=True, keep_attention=True)
    # fp8 weights leave room to keep the attention outputs: 14.3 + 2.3 + 46.5 + 5.6 GiB; the skip stage then
    # offloads the block inputs to leave the last 4 blocks unchecked (test_skip_blocks.py)
    assert fast.rung == Settings(fp8=True, checkpointing=True, keep_attention=True) and fast.fits
    assert fast.settings == Settings(fp8=True, checkpointing=True, offload_activations=True, keep_attention=True,
                                     skip_blocks=4)
    assert all(s.fp8 for s, _ in fast.candidates)
    memory = fast.apply(MemoryArgs(fp8_fast=True))
    assert memory.fp8_base and memory.fp8_scaled and memory.fp8_fast and memory.gradient_checkpointing_keep_attention


class ScaledMM(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.calls = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.calls += str(func).startswith("aten._scaled_mm")
        return func(*args, **(kwargs or {}))


def _model(seed: int = 1) -> WanModel:
    variant = get_variant("t2v-tiny")
    model = WanModel(variant)
    model.load_state_dict(random_official_dit_state(variant, seed))
    return model.requires_grad_(False).to(torch.bfloat16)


def _step(model):
    """One bf16 LoRA step: the loss and the LoRA gradients."""
    torch.manual_seed(0)
    network = attach_trained_lora(model)
    x, context = torch.randn(1, 16, 3, 4, 6), [torch.randn(5, model.variant.text_dim)]
    counter = ScaledMM()
    with counter:
        loss = model(x, torch.tensor([400.0]), context).float().square().mean()
        loss.backward()
    return loss.detach(), [p.grad.float().clone() for p in network.parameters()], counter.calls


def test_without_fp8_tensor_cores_one_warning_and_dequantised_matmuls(monkeypatch, caplog):
    monkeypatch.setattr(runtime_memory._fp8_matmuls, "warned", False)
    memory = MemoryArgs(fp8_base=True, fp8_scaled=True, fp8_fast=True)
    with caplog.at_level(logging.INFO, logger=runtime_memory.__name__):
        models = [_model(), _model()]  # two experts: one warning
        setups = [apply_memory_features(m, memory, "cpu") for m in models]
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "compute capability 8.9+" in warnings[0] and "not a CPU" in warnings[0]
    assert all("dequantised to bf16" in " ".join(s.notes) for s in setups)
    layers = [m for m in models[0].modules() if isinstance(m, FP8Linear)]
    assert layers and all(layer.use_scaled_mm for layer in layers)
    _, _, calls = _step(models[0])
    assert calls == 0  # the CPU has no fp8 tensor cores: every matmul dequantised


def test_lora_step_with_fp8_matmuls_against_the_dequantised_path(monkeypatch):
    """With the device check passed (`torch._scaled_mm` runs on the CPU), the forward and the input gradient of
    every fp8 Linear run in fp8; the loss and the LoRA gradients stay within the fp8 error of the bf16 path."""
    reference = _model()
    apply_memory_features(reference, MemoryArgs(fp8_base=True, fp8_scaled=True), "cpu")
    ref_loss, ref_grads, ref_calls = _step(reference)
    for module in (fp8, runtime_memory):  # as if this were an sm89+ GPU
        monkeypatch.setattr(module, "scaled_mm_supported", lambda device, i, o: True)
    model = _model()
    setup = apply_memory_features(model, MemoryArgs(fp8_base=True, fp8_scaled=True, fp8_fast=True), "cpu")
    assert "20 fp8 Linear layers multiply in fp8" in " ".join(setup.notes)
    loss, grads, calls = _step(model)
    layers = [m for m in model.modules() if isinstance(m, FP8Linear)]
    # every forward, and the input gradient of every layer whose input needs one: not the cross-attention k / v
    # (text context) of the 2 blocks, nor q / k / v of the first block (its input precedes every LoRA)
    assert ref_calls == 0 and len(layers) == 20 and calls == 20 + (20 - 2 * 2 - 3)
    assert not any(layer._scaled_mm_failed for layer in layers)
    assert abs(loss - ref_loss) / ref_loss < 0.05
    total = torch.cat([g.flatten() for g in grads])
    ref_total = torch.cat([g.flatten() for g in ref_grads])
    assert (total - ref_total).norm() / ref_total.norm() < 0.1


def test_fp16_compute_dequantises_with_one_warning(monkeypatch, caplog):
    """PyTorch's row-wise fp8 matmul (always used for the input gradient) writes bf16 only outside cuBLAS 12.9 on
    Hopper, and a failure inside a compiled block would pass the layer's fallback: an fp16 model dequantises,
    with one warning naming the setting to change, even where the device has fp8 tensor cores."""
    for module in (fp8, runtime_memory):  # as if this were an sm89+ GPU
        monkeypatch.setattr(module, "scaled_mm_supported", lambda device, i, o: True)
    monkeypatch.setattr(runtime_memory._fp8_matmuls, "warned", False)
    with caplog.at_level(logging.INFO, logger=runtime_memory.__name__):
        models = [_model().to(torch.float16), _model().to(torch.float16)]  # two experts: one warning
        setups = [apply_memory_features(m, MemoryArgs(fp8_base=True, fp8_scaled=True, fp8_fast=True), "cpu")
                  for m in models]
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "computes in float16" in warnings[0] and 'mixed_precision = "bf16"' in warnings[0]
    assert all("dequantised for each matmul" in " ".join(s.notes) for s in setups)
    layer = next(m for m in models[0].modules() if isinstance(m, FP8Linear))
    x = torch.randn(2, 7, layer.in_features)
    for dtype, calls in ((torch.float16, 0), (torch.float32, 0), (torch.bfloat16, 1)):
        counter = ScaledMM()
        with counter:
            layer(x.to(dtype))
        assert counter.calls == calls, dtype

"""`gradient_checkpointing_keep_attention_blocks` (issue 17, lever 4): selective checkpointing in the last K
blocks only. The config key and its rules, a LoRA step keeping one of two blocks' attention that equals plain
checkpointing, the planner's largest K that fits, and the roofline estimate between none and all."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from library.config import ConfigError, config_from_dict, validate
from library.config.schema import MemoryArgs
from library.runtime.memory import apply_memory_features
from library.training.estimate import StepSetup, estimate_step
from library.training.planning.lora import (CUDA_CONTEXT_GIB, FRAGMENTATION, GIB, KEEP_PER_C, KEEP_PER_HEAD,
                                            Settings, Workload, estimate, plan_memory)
from library.training.gpu_rates import GPUS
from library.wan.model import WanModel
from library.wan.variants import get_variant
from tests.helpers import attach_trained_lora, random_official_dit_state
from tests.wan.test_selective_checkpointing import AttentionCalls

VALID = {"dit": "low.safetensors", "dataset_config": "data.toml", "task": "t2v-A14B"}
KEY = "gradient_checkpointing_keep_attention_blocks"


def test_config_key_parses_and_is_validated():
    cfg = validate(config_from_dict({**VALID, "gradient_checkpointing": True, KEY: "12"}))
    assert cfg.memory.gradient_checkpointing_keep_attention_blocks == 12
    assert config_from_dict(VALID).memory.gradient_checkpointing_keep_attention_blocks == 0  # none by default
    with pytest.raises(ConfigError, match=f"`{KEY}` needs `gradient_checkpointing"):
        validate(config_from_dict({**VALID, KEY: 3}))
    with pytest.raises(ConfigError, match="remove `gradient_checkpointing_keep_attention_blocks`"):
        validate(config_from_dict({**VALID, "gradient_checkpointing": True, KEY: 3,
                                   "gradient_checkpointing_keep_attention": True}))
    with pytest.raises(ConfigError, match="is more than the 40 blocks"):
        validate(config_from_dict({**VALID, "gradient_checkpointing": True, KEY: 41}))
    with pytest.raises(ConfigError, match=KEY):
        config_from_dict({**VALID, "gradient_checkpointing": True, KEY: -1})


def _lora_step(kept: int):
    """One fp32 LoRA step of the tiny model (2 blocks) through `apply_memory_features`: loss, LoRA gradients,
    self + cross attention forwards run."""

    variant = get_variant("t2v-tiny")
    model = WanModel(variant)
    model.load_state_dict(random_official_dit_state(variant, 1))
    model.requires_grad_(False)
    setup = apply_memory_features(model, MemoryArgs(gradient_checkpointing=True,
                                                    gradient_checkpointing_keep_attention_blocks=kept), "cpu")
    assert setup.keep_attention_blocks == model.checkpoint_keep_attention_blocks == kept
    assert [b.checkpoint_keep_attention for b in model.blocks] == [i >= len(model.blocks) - kept for i in range(2)]
    torch.manual_seed(0)
    network = attach_trained_lora(model)
    x, context = torch.randn(1, 16, 3, 4, 6), [torch.randn(5, variant.text_dim)]
    calls = AttentionCalls()
    with calls:
        loss = model(x, torch.tensor([400.0]), context).square().mean()
        loss.backward()
    return loss.detach(), [p.grad.clone() for p in network.parameters()], calls.forward


def test_keeping_one_of_two_blocks_equals_plain_checkpointing():
    plain_loss, plain_grads, plain_calls = _lora_step(0)
    loss, grads, calls = _lora_step(1)
    assert plain_calls == 8 and calls == 7  # only the last block's self-attention is not recomputed
    assert torch.allclose(loss, plain_loss, rtol=1e-5, atol=0)
    for a, b in zip(grads, plain_grads):
        assert ((a - b).norm() / b.norm().clamp_min(1e-30)).item() <= 1e-5
    assert any(b.abs().max() > 0 for b in plain_grads)


def test_planner_keeps_the_largest_number_of_blocks_that_fits():
    """A14B at 832x480x81 on an 80 GB card whose host cannot hold the offloaded block inputs (24.4 GiB): keeping
    every block's attention needs 81.3 GiB, plain checkpointing 69 GiB; the plan keeps as many blocks' as the
    budget holds, counted per block."""
    v = get_variant("t2v-A14B")
    vram = GPUS["h100"].memory_gib
    budget = (vram - CUDA_CONTEXT_GIB) * FRAGMENTATION
    w = Workload(v, 832, 480, 81)
    none = estimate(w, Settings(checkpointing=True)).total
    every = estimate(w, Settings(checkpointing=True, keep_attention=True)).total
    assert none < budget < every
    plan = plan_memory(vram, "t2v-A14B", 832, 480, 81, host_ram_gb=24)
    k = plan.rung.keep_attention_blocks
    assert plan.fits and plan.rung == Settings(checkpointing=True, keep_attention_blocks=k) and 0 < k < v.num_layers
    rung = plan.candidates[-2][1]
    assert rung.total <= plan.budget_gb == pytest.approx(budget)
    per_block = (KEEP_PER_C * v.dim + KEEP_PER_HEAD * v.num_heads) * w.tokens / GIB
    assert rung.total == pytest.approx(none + (k - 1) * per_block)
    assert estimate(w, Settings(checkpointing=True, keep_attention_blocks=k + 1)).total > budget  # the largest
    # the skip stage: the last kept block not checkpointed at all, in about the same memory
    assert plan.settings == Settings(checkpointing=True, keep_attention_blocks=k - 1, skip_blocks=1)
    memory = plan.apply(MemoryArgs(gradient_checkpointing_keep_attention=True))
    assert memory.gradient_checkpointing_keep_attention_blocks == k - 1
    assert memory.gradient_checkpointing_skip_blocks == 1 and not memory.gradient_checkpointing_keep_attention
    assert f"keeping attention in {k} blocks" in plan.table()


def test_estimate_keeping_some_blocks_lies_between_none_and_all():
    base = StepSetup(get_variant("t2v-1.3B"), 256, 256, 17, rank=16)
    base = dataclasses.replace(base, variant=dataclasses.replace(base.variant, num_layers=3))
    times = [estimate_step(dataclasses.replace(base, keep_attention_blocks=k), "h100", "flash3", compiled=True)
             for k in (0, 1, 3)]
    assert times[0].seconds > times[1].seconds > times[2].seconds
    assert "keeping self-attention in the last 1 of 3 blocks" in times[1].table()
    every = estimate_step(dataclasses.replace(base, keep_attention=True), "h100", "flash3", compiled=True)
    assert every.seconds == pytest.approx(times[2].seconds)

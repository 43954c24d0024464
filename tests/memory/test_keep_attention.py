"""`gradient_checkpointing_keep_attention` (issue 17, lever 4): the config key and its rule, the planner's rung
(taken when it fits, counted in the estimate with the bytes a block really keeps), and a LoRA training step
through `apply_memory_features` that equals plain checkpointing."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from library.config import ConfigError, config_from_dict, validate
from library.config.schema import MemoryArgs
from library.runtime.memory import apply_memory_features
from library.training.planning.lora import (GIB, KEEP_PER_C, KEEP_PER_HEAD, Settings, Workload, estimate,
                                            plan_memory)
from library.wan import model as wan_model
from library.wan.model import WanModel, rope_tables
from library.wan.variants import get_variant
from tests.helpers import attach_trained_lora, random_official_dit_state

VALID = {"dit": "low.safetensors", "dataset_config": "data.toml"}


def test_config_key_parses_and_needs_checkpointing():
    cfg = config_from_dict({**VALID, "gradient_checkpointing": True, "gradient_checkpointing_keep_attention": True})
    assert validate(cfg).memory.gradient_checkpointing_keep_attention
    assert not config_from_dict(VALID).memory.gradient_checkpointing_keep_attention  # off by default
    with pytest.raises(ConfigError, match="`gradient_checkpointing_keep_attention` needs `gradient_checkpointing"):
        validate(config_from_dict({**VALID, "gradient_checkpointing_keep_attention": "true"}))


def test_planner_keeps_attention_when_it_fits_and_not_otherwise():
    big = plan_memory(141, "t2v-A14B", 832, 480, 81)  # an H200
    assert big.rung == Settings(checkpointing=True, keep_attention=True) and big.fits  # + skip (test_skip_blocks)
    assert big.apply(MemoryArgs()).gradient_checkpointing_keep_attention
    # 69.0 GiB plain, 81.3 GiB keeping attention: no room without offload, whose host memory is too much here
    h100 = plan_memory(80, "t2v-A14B", 832, 480, 81, host_ram_gb=16)
    assert h100.settings.checkpointing and not h100.settings.keep_attention and h100.fits  # some blocks' only
    assert not h100.settings.offload_activations
    assert not h100.apply(MemoryArgs(gradient_checkpointing_keep_attention=True)).gradient_checkpointing_keep_attention
    small = plan_memory(64, "t2v-A14B", 832, 480, 81)  # the block inputs offloaded: 57.6 GiB keeping every block's
    assert small.rung == Settings(checkpointing=True, offload_activations=True, keep_attention=True)
    assert small.apply(MemoryArgs()).gradient_checkpointing_keep_attention
    rows = [s for s, _ in small.candidates]
    assert rows.index(Settings(checkpointing=True, keep_attention=True)) == rows.index(small.rung) - 1
    assert "ckpt+offload keeping attention" in small.table()
    no_host = plan_memory(64, "t2v-A14B", 832, 480, 81, host_ram_gb=16)  # nothing without host memory fits 64 GiB
    assert not no_host.fits and "no: host RAM" in no_host.table() and "more host RAM" in no_host.table()


def test_estimate_counts_the_kept_outputs_of_every_other_block():
    v = get_variant("t2v-A14B")
    w = Workload(v, 832, 480, 81)
    extra = estimate(w, Settings(checkpointing=True, keep_attention=True)).total - estimate(
        w, Settings(checkpointing=True)).total
    per_block = (2 * v.dim + 4 * v.num_heads) * w.tokens  # bf16 output [T, C] and fp32 log-sum-exp [H, T]
    assert extra == pytest.approx((v.num_layers - 1) * per_block / GIB)
    assert 0.31 < per_block / GIB < 0.32 and 12.3 < extra < 12.5


class _KeptBytes(TorchDispatchMode):
    """Sums the output bytes of the ops the selective-checkpointing policy keeps (MUST_SAVE)."""
    def __init__(self):
        super().__init__()
        self.bytes = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        policy = wan_model._self_attention_policy(None, func, *args, **kwargs)
        if policy == torch.utils.checkpoint.CheckpointPolicy.MUST_SAVE:
            flat = out if isinstance(out, (tuple, list)) else (out,)
            self.bytes += sum(t.numel() * t.element_size() for t in flat if isinstance(t, torch.Tensor))
        return out


@pytest.mark.parametrize("c,heads", [(128, 4), (256, 8)])
def test_kept_bytes_match_the_planner(c, heads):
    """The bytes one bf16 block keeps under the policy, per token, against KEEP_PER_C * C + KEEP_PER_HEAD * H."""
    v = dataclasses.replace(get_variant("t2v-tiny"), dim=c, ffn_dim=2 * c, num_heads=heads, num_layers=1, name="probe")
    model = WanModel(v).requires_grad_(False).to(torch.bfloat16)
    tokens = 512
    x, e0 = torch.randn(1, tokens, c), torch.randn(1, 1, 6, c)
    ctx = torch.randn(1, 64, c, dtype=torch.bfloat16)
    rope = rope_tables((tokens // 64, 8, 8), c // heads, "cpu")
    kept = _KeptBytes()
    with kept, torch.no_grad():
        model.blocks[0](x, e0, ctx, rope, "sdpa", False, torch.bfloat16)
    assert kept.bytes == (KEEP_PER_C * c + KEEP_PER_HEAD * heads) * tokens


def _lora_step(keep: bool):
    """One fp32 LoRA step of the tiny model set up as training does: loss and every LoRA gradient."""
    variant = get_variant("t2v-tiny")
    model = WanModel(variant)
    model.load_state_dict(random_official_dit_state(variant, 1))
    model.requires_grad_(False)
    memory = MemoryArgs(gradient_checkpointing=True, gradient_checkpointing_keep_attention=keep)
    setup = apply_memory_features(model, memory, "cpu")
    assert setup.keep_attention == keep and model.checkpoint_keep_attention == keep
    torch.manual_seed(0)
    network = attach_trained_lora(model)
    x, context = torch.randn(1, 16, 3, 4, 6), [torch.randn(5, variant.text_dim)]
    loss = model(x, torch.tensor([400.0]), context).square().mean()
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in network.parameters()]


def test_training_step_keeping_attention_equals_plain_checkpointing():
    plain_loss, plain_grads = _lora_step(False)
    loss, grads = _lora_step(True)
    assert torch.allclose(loss, plain_loss, rtol=1e-5, atol=0)
    for a, b in zip(grads, plain_grads):
        assert ((a - b).norm() / b.norm().clamp_min(1e-30)).item() <= 1e-5
    assert any(b.abs().max() > 0 for b in plain_grads)

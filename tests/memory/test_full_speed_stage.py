"""The full fine-tuning planner's speed stages (planning/full.py): on top of the ladder rung that fits, kept
self-attention in every checkpointed block (`gradient_checkpointing_keep_attention`), then the last N blocks
unchecked (`gradient_checkpointing_skip_blocks`), each only where the card has room; their memory is the rung's
plus exactly what they keep; fsdp rungs are left alone; the plan's settings reach the memory keys, the config
rules, a full fine-tuning step (the same gradients) and the step estimate's `--full --plan`."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from library.config import config_from_dict, validate
from library.config.schema import FineTuneArgs, MemoryArgs
from library.runtime.memory import apply_memory_features
from library.training.planning.full import (ACT_FULL_PER_C, ACT_FULL_PER_F, FullSettings, FullWorkload, estimate_full,
                                            plan_full, speed_stages, state_bytes)
from library.training.planning.lora import CUDA_CONTEXT_GIB, FRAGMENTATION, GIB, KEEP_PER_C, KEEP_PER_HEAD
from library.wan.variants import get_variant
from tests.helpers import tool
from tests.memory.conftest import deep_tiny, tiny_inputs, tiny_model

BF16_CKPT = FullSettings(full_bf16=True, checkpointing=True)
MASTERS_CKPT = FullSettings(checkpointing=True)
FIVE_B = ("ti2v-5B", 1280, 704, 121)  # 27,280 tokens


def _card(total_gib: float) -> float:
    """The card whose usable memory is `total_gib`."""
    return CUDA_CONTEXT_GIB + total_gib / FRAGMENTATION


def _work(task: str, width: int, height: int, frames: int) -> FullWorkload:
    return FullWorkload(get_variant(task), width, height, frames)


def test_an_80_gib_card_keeps_attention_and_skips_the_last_blocks():
    plan = plan_full(80, *FIVE_B)
    w, s = plan.workload, plan.settings
    assert plan.fits and plan.rung == BF16_CKPT
    assert s == dataclasses.replace(BF16_CKPT, keep_attention=True, skip_blocks=4)
    assert plan.estimate == estimate_full(w, s) and plan.estimate.total <= plan.budget_gb
    assert estimate_full(w, dataclasses.replace(s, skip_blocks=5)).total > plan.budget_gb  # the largest N
    # the table: the rung, then the extended row it chose
    assert [c for c, _ in plan.candidates[-2:]] == [BF16_CKPT, s]
    rows = plan.table().splitlines()
    assert rows[-2].startswith("->  bf16, ckpt, keeping attention, skipping the last 4 blocks")
    assert rows[-1].startswith("plan: bf16, ckpt, keeping attention, skipping the last 4 blocks")


def test_each_stage_only_where_the_card_has_room():
    w = _work(*FIVE_B)
    rung, keep = estimate_full(w, BF16_CKPT).total, estimate_full(w, dataclasses.replace(BF16_CKPT,
                                                                                         keep_attention=True)).total
    assert rung < keep
    # between the rung and keeping attention: no kept attention; the last block unchecked costs nothing
    short = plan_full(_card((rung + keep) / 2), *FIVE_B)
    assert short.settings == dataclasses.replace(BF16_CKPT, skip_blocks=1)
    # keeping attention fits, skipping a second block does not
    kept = plan_full(_card(keep + 0.5), *FIVE_B)
    assert kept.settings == dataclasses.replace(BF16_CKPT, keep_attention=True, skip_blocks=1)
    assert estimate_full(w, dataclasses.replace(kept.settings, skip_blocks=2)).total > kept.budget_gb
    # none of them: a config that allows neither, a rung without checkpointing, a budget below every stage
    plain = plan_full(80, *FIVE_B, allow=lambda s: not (s.keep_attention or s.skip_blocks))
    assert plain.settings == BF16_CKPT and plain.candidates[-1][0] == BF16_CKPT
    roomy = plan_full(400, "t2v-1.3B", 832, 480, 81)
    assert roomy.settings == FullSettings() and len(roomy.candidates) == 1
    assert speed_stages(w, BF16_CKPT, rung - 0.5, None) is None


def test_the_stages_hold_exactly_what_they_keep():
    """fp32 masters, t2v-1.3B at 832x480x81: the rung peaks at the first checkpointed block's backward pass (every
    block input, the recomputed block); keeping attention adds the other blocks' kept outputs; skipping N blocks
    moves the peak to the last block's backward pass: N whole blocks (and their bf16 weight copies) instead of
    N inputs and one recomputed block."""
    w = _work("t2v-1.3B", 832, 480, 81)
    v, t = w.variant, w.tokens
    layers, c = v.num_layers, v.dim
    keep = (KEEP_PER_C * c + KEEP_PER_HEAD * v.num_heads) * t  # 2 C + 4 H bytes a token
    block = (ACT_FULL_PER_C * c + ACT_FULL_PER_F * v.ffn_dim) * t + 16 * c * v.text_len  # activations, context
    block_input, block_cast = 4 * c * t, state_bytes(w, MASTERS_CKPT).block_cast
    assert block_cast > 0  # fp32 masters: autocast saves a bf16 copy of each weight of a block without checkpointing
    base = estimate_full(w, MASTERS_CKPT)
    kept = estimate_full(w, dataclasses.replace(MASTERS_CKPT, keep_attention=True))
    assert base.peak == kept.peak == "backward" and kept.copies == base.copies and kept.grads == base.grads
    assert (kept.activations - base.activations) * GIB == pytest.approx((layers - 1) * keep)
    for n in (5, 12):
        skipping = estimate_full(w, dataclasses.replace(MASTERS_CKPT, keep_attention=True, skip_blocks=n))
        assert skipping.grads == base.grads  # the first gradients, as at the rung's peak
        assert (skipping.activations - base.activations) * GIB == pytest.approx(
            (layers - n) * keep - n * block_input + (n - 1) * block)
        assert (skipping.copies - base.copies) * GIB == pytest.approx((n - 1) * block_cast)
    # activation offload: only the checkpointed blocks' inputs go to the host, the last checkpointed one's stays
    offload = FullSettings(True, True, True, True)
    for n in (0, 1, 12):
        e = estimate_full(w, dataclasses.replace(offload, skip_blocks=n))
        assert e.host * GIB == pytest.approx((layers - n - 1) * block_input)
    # skipping every block is no checkpointing
    assert estimate_full(w, dataclasses.replace(MASTERS_CKPT, skip_blocks=layers)) == estimate_full(w, FullSettings())


def test_fsdp_rungs_are_left_alone():
    plan = plan_full(80, "t2v-A14B", 832, 480, 81, processes=8)
    assert plan.settings == FullSettings(checkpointing=True, fsdp=True) == plan.rung
    assert plan.candidates[-1][0] == plan.settings and "keeping attention" not in plan.table()
    w = FullWorkload(get_variant("t2v-1.3B"), 832, 480, 81, processes=4)
    for s in (FullSettings(True, True, fsdp=True), FullSettings(True, True, True, fsdp=True, fsdp_cpu_offload=True)):
        assert speed_stages(w, s, 1e6, None) is None


def test_apply_sets_the_memory_keys_and_the_config_accepts_them():
    s = dataclasses.replace(BF16_CKPT, keep_attention=True, skip_blocks=3)
    memory, finetune = s.apply(MemoryArgs(gradient_checkpointing_keep_attention_blocks=2), FineTuneArgs())
    assert memory.gradient_checkpointing and memory.gradient_checkpointing_keep_attention
    assert memory.gradient_checkpointing_skip_blocks == 3 and memory.gradient_checkpointing_keep_attention_blocks == 0
    assert finetune.full_fine_tune and finetune.full_bf16
    plain, _ = BF16_CKPT.apply(MemoryArgs(gradient_checkpointing_keep_attention=True,
                                          gradient_checkpointing_skip_blocks=2), FineTuneArgs())
    assert not plain.gradient_checkpointing_keep_attention and plain.gradient_checkpointing_skip_blocks == 0
    cfg = validate(config_from_dict({"dit": "low.safetensors", "dataset_config": "data.toml", "task": "ti2v-5B",
                                     "full_fine_tune": True, "mixed_precision": "bf16", "full_bf16": True,
                                     "gradient_checkpointing": True, "gradient_checkpointing_keep_attention": True,
                                     "gradient_checkpointing_skip_blocks": 4}))
    assert cfg.memory.gradient_checkpointing_skip_blocks == 4 and cfg.finetune.full_fine_tune


def _full_step(variant, memory: MemoryArgs):
    """One fp32 step with every weight training: the loss and every gradient."""
    model = tiny_model(variant).requires_grad_(True)
    apply_memory_features(model, memory, "cpu")
    loss = model(*tiny_inputs(variant)).square().mean()
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in model.parameters()]


def test_a_full_fine_tuning_step_with_the_stages_equals_checkpointing():
    variant = deep_tiny(4)
    ref_loss, ref = _full_step(variant, MemoryArgs(gradient_checkpointing=True))
    s = FullSettings(checkpointing=True, keep_attention=True, skip_blocks=1)
    loss, grads = _full_step(variant, s.apply(MemoryArgs(), FineTuneArgs())[0])
    assert ((loss - ref_loss).abs() / ref_loss.abs()).item() <= 1e-5
    for g, r in zip(grads, ref):
        assert ((g - r).norm() / r.norm().clamp_min(1e-30)).item() <= 1e-5


def test_the_estimate_command_takes_the_stages_from_the_plan(capsys):
    benchmark_wan = tool("benchmark_wan")
    w = _work("t2v-tiny", 64, 64, 5)
    fastest, ckpt = estimate_full(w, FullSettings()).total, estimate_full(w, MASTERS_CKPT).total
    cap = _card((fastest + ckpt) / 2)  # checkpointing needed: the stages on top of it
    small = ["--estimate", "--task", "t2v-tiny", "--width", "64", "--height", "64", "--frames", "5", "--full"]
    assert benchmark_wan.main(small + ["--plan", "--vram_cap_gb", repr(cap)]) == 0
    out = capsys.readouterr().out
    assert "plan: fp32 masters, ckpt, keeping attention, skipping the last block" in out
    assert "keeping self-attention in every checkpointed block, the last 1 of 2 blocks not checkpointed" in out


def test_the_measured_benchmark_plans_with_the_stages(monkeypatch):
    """`tools/benchmark_wan.py --full --plan` (measured): the plan's memory keys reach the run's config, and the
    planner's figure printed beside the measurement is the extended settings'."""
    benchmark_wan = tool("benchmark_wan")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    args = benchmark_wan.parse_args(["--task", "ti2v-5B", "--width", "1280", "--height", "704", "--frames", "121",
                                     "--full", "--plan", "--vram_cap_gb", "80", "--host_ram_gb", "512"])
    cfg = benchmark_wan._config(args)
    m = cfg.memory
    assert m.gradient_checkpointing and m.gradient_checkpointing_keep_attention
    assert m.gradient_checkpointing_skip_blocks == 4 and cfg.full_bf16
    assert cfg.planned_gib == pytest.approx(plan_full(80, *FIVE_B, host_ram_gb=512).estimate.total)

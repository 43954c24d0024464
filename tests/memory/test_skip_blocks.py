"""`gradient_checkpointing_skip_blocks` (issue 17, partial checkpointing): the last N blocks are not
checkpointed. A fp32 LoRA step with N = 0, 1 or every block equals plain checkpointing and no checkpointing,
with and without kept attention and activation offload (the CPU stand-in offloader); skipped blocks run their
forward pass once; the config rules; the planner's choice of N; the estimate of skipping every block equals
no checkpointing."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from library.config import ConfigError, config_from_dict, validate
from library.config.schema import MemoryArgs
from library.runtime.memory import ActivationOffloader, apply_memory_features
from library.training.estimate import StepSetup, estimate_step, trace_step
from library.training.gpu_rates import GPUS
from library.training.planning.lora import Settings, Workload, estimate, plan_memory
from library.wan.variants import get_variant
from tests.memory.conftest import deep_tiny, tiny_inputs, tiny_model
from tests.memory.test_block_swap import with_lora
from tests.wan.test_selective_checkpointing import AttentionCalls

LAYERS = 4
KEY = "gradient_checkpointing_skip_blocks"
VALID = {"dit": "low.safetensors", "dataset_config": "data.toml", "task": "t2v-A14B"}
KEEP = {"none": {}, "all": {"gradient_checkpointing_keep_attention": True},
        "two": {"gradient_checkpointing_keep_attention_blocks": 2}}


@pytest.fixture(scope="module")
def variant():
    return deep_tiny(LAYERS)


def lora_step(variant, memory: MemoryArgs, offloader: ActivationOffloader | None = None):
    """One fp32 LoRA step through `apply_memory_features`: (setup, model, loss, LoRA gradients, attention
    forwards run, forward calls of each block)."""
    model = tiny_model(variant)
    setup = apply_memory_features(model, memory, "cpu", offloader=offloader)
    net = with_lora(model)
    runs = [0] * len(model.blocks)
    for i, block in enumerate(model.blocks):
        block.register_forward_pre_hook(lambda *_, i=i: runs.__setitem__(i, runs[i] + 1))
    calls = AttentionCalls()
    with calls:
        loss = model(*tiny_inputs(variant)).square().mean()
        loss.backward()
    grads = [p.grad.clone() for p in net.parameters()]
    return setup, model, loss.detach(), grads, calls.forward, runs


def _step(variant, memory: MemoryArgs, offloader: ActivationOffloader | None = None):
    """`lora_step` without the model: loss, LoRA gradients, attention forwards run, forward calls of each block."""
    setup, _, loss, grads, calls, runs = lora_step(variant, memory, offloader)
    return setup, loss, grads, calls, runs


@pytest.fixture(scope="module")
def references(variant):
    return {"ckpt": _step(variant, MemoryArgs(gradient_checkpointing=True)), "none": _step(variant, MemoryArgs())}


def _close(a, b) -> None:
    _, loss, grads, _, _ = a
    _, ref_loss, ref_grads, _, _ = b
    assert ((loss - ref_loss).abs() / ref_loss.abs()).item() <= 1e-5
    for g, r in zip(grads, ref_grads):
        assert ((g - r).norm() / r.norm().clamp_min(1e-30)).item() <= 1e-5


@pytest.mark.parametrize("offload", [False, True])
@pytest.mark.parametrize("keep", sorted(KEEP))
@pytest.mark.parametrize("skip", [0, 1, LAYERS])
def test_skipping_blocks_equals_checkpointing_and_none(variant, references, skip, keep, offload):
    trace = []
    offloader = ActivationOffloader(torch.device("cpu"), trace=trace) if offload else None
    memory = MemoryArgs(gradient_checkpointing=True, gradient_checkpointing_cpu_offload=offload, **KEEP[keep],
                        **{KEY: skip})
    result = _step(variant, memory, offloader)
    setup, _, _, calls, runs = result
    _close(result, references["ckpt"])
    _close(result, references["none"])
    checkpointed = LAYERS - skip
    kept = {"none": 0, "all": checkpointed, "two": min(2, checkpointed)}[keep]
    assert setup.skip_blocks == skip and setup.keep_attention_blocks == kept
    assert runs == [2] * checkpointed + [1] * skip  # skipped blocks run their forward pass once
    # two attention forwards a block (self, cross); a checkpointed block recomputes both unless it keeps its self's
    assert calls == 2 * LAYERS + 2 * checkpointed - kept
    assert references["ckpt"][3] == 4 * LAYERS and references["none"][3] == 2 * LAYERS
    if skip:
        assert ("skipping the last block" if skip == 1 else f"skipping the last {skip} blocks") in setup.summary()
    if offload:  # only the checkpointed blocks' inputs go to the host, the last checkpointed one's stays
        assert offloader.offloaded == max(0, checkpointed - 1)
        if skip == 1:
            assert trace == [("offload", 0), ("offload", 1), ("fetch", 1), ("fetch", 0), ("use", 1), ("use", 0)]


def test_skipped_and_kept_blocks_of_the_model(variant):
    model = tiny_model(variant)
    model.enable_gradient_checkpointing(True, keep_attention_blocks=2, skip_blocks=1)
    assert [b.checkpoint_skip for b in model.blocks] == [False, False, False, True]
    assert [b.checkpoint_keep_attention for b in model.blocks] == [False, True, True, False]  # K among checkpointed
    model.enable_gradient_checkpointing(True, keep_attention=True, skip_blocks=9)  # clamped to the blocks
    assert model.checkpoint_skip_blocks == LAYERS and model.checkpoint_keep_attention_blocks == 0
    model.enable_gradient_checkpointing(False, skip_blocks=2)
    assert model.checkpoint_skip_blocks == 0 and not any(b.checkpoint_skip for b in model.blocks)


def test_block_swap_ignores_skip_blocks(variant):
    from library.runtime.block_swap import HostTransport

    model = tiny_model(variant)
    setup = apply_memory_features(model, MemoryArgs(gradient_checkpointing=True, blocks_to_swap=2, **{KEY: 2}), "cpu",
                                  transport=HostTransport())
    assert setup.skip_blocks == 0 and model.checkpoint_skip_blocks == 0
    assert any("ignored with block swap" in note for note in setup.notes)


def test_config_key_parses_and_is_validated():
    ckpt = {**VALID, "gradient_checkpointing": True}
    cfg = validate(config_from_dict({**ckpt, KEY: "3", "gradient_checkpointing_keep_attention_blocks": 37}))
    assert cfg.memory.gradient_checkpointing_skip_blocks == 3
    assert config_from_dict(VALID).memory.gradient_checkpointing_skip_blocks == 0
    assert validate(config_from_dict({**ckpt, KEY: 40})).memory.gradient_checkpointing_skip_blocks == 40
    with pytest.raises(ConfigError, match=f"`{KEY}` needs `gradient_checkpointing"):
        validate(config_from_dict({**VALID, KEY: 1}))
    with pytest.raises(ConfigError, match=f"`{KEY}` = 41 is more than the 40 blocks"):
        validate(config_from_dict({**ckpt, KEY: 41}))
    with pytest.raises(ConfigError, match="`gradient_checkpointing_keep_attention_blocks` = 38 counts among the "
                                          f"checkpointed blocks, but `{KEY}` = 3"):
        validate(config_from_dict({**ckpt, KEY: 3, "gradient_checkpointing_keep_attention_blocks": 38}))
    with pytest.raises(ConfigError, match=f"`{KEY}` = 2 cannot be combined with `blocks_to_swap` = 5"):
        validate(config_from_dict({**ckpt, KEY: 2, "blocks_to_swap": 5}))
    with pytest.raises(ConfigError, match=KEY):
        config_from_dict({**ckpt, KEY: -1})


# ---- the planner and the estimate ------------------------------------------------------------------------------


def _settings(plan):
    return dataclasses.replace(plan.settings, skip_blocks=0)


def test_planner_skips_the_largest_number_of_blocks_that_fits(capsys):
    h100, h200 = GPUS["h100"].memory_gib, GPUS["h200"].memory_gib
    keep_all = Settings(checkpointing=True, offload_activations=True, keep_attention=True)
    plans = {"h100": plan_memory(h100, "t2v-A14B", 832, 480, 81), "h200": plan_memory(h200, "t2v-A14B", 832, 480, 81),
             "h100 fp8": plan_memory(h100, "t2v-A14B", 832, 480, 81, fp8=True),
             "h100 49 frames": plan_memory(h100, "t2v-A14B", 832, 480, 49),
             "h100 two experts": plan_memory(h100, "t2v-A14B", 832, 480, 81, experts=2, host_ram_gb=128)}
    with capsys.disabled():
        print("\nskipped blocks: " + ", ".join(f"{k} {p.settings.skip_blocks}" for k, p in plans.items()))
    for name, plan in plans.items():
        assert plan.fits and plan.estimate.total <= plan.budget_gb, name
        bigger = dataclasses.replace(plan.settings, skip_blocks=plan.settings.skip_blocks + 1)
        assert estimate(plan.workload, bigger).total > plan.budget_gb, name  # the largest N
        assert plan.candidates[-1][0] == plan.settings and "skipping the last" in plan.table()
        memory = plan.apply(MemoryArgs())
        assert memory.gradient_checkpointing_skip_blocks == plan.settings.skip_blocks
    # attention the GPU keeps stays there (moving it to the host would skip one block more: 0.3% by the estimate)
    on_host = dataclasses.replace(keep_all, offload_attention=True)
    assert _settings(plans["h100"]) == _settings(plans["h200"]) == keep_all
    assert 1 <= plans["h100"].settings.skip_blocks < plans["h200"].settings.skip_blocks
    assert plans["h100 fp8"].settings.skip_blocks > plans["h100"].settings.skip_blocks
    assert plans["h100 49 frames"].settings.skip_blocks > plans["h100"].settings.skip_blocks
    assert _settings(plans["h100 two experts"]) == dataclasses.replace(keep_all, offload_inactive=True)
    # host RAM: the offloaded inputs fit 16 GiB only without offload: keeping K blocks, skipping some
    short = plan_memory(h100, "t2v-A14B", 832, 480, 81, host_ram_gb=16)
    assert not short.settings.offload_activations and short.settings.skip_blocks >= 1
    assert short.estimate.host == 0
    # block swap rungs (the 24 GiB A14B plan) get no skip
    assert plan_memory(24, "t2v-A14B", 832, 480, 81).settings == dataclasses.replace(on_host, fp8=True,
                                                                                     blocks_to_swap=35)


@pytest.mark.parametrize("experts,host", [(1, None), (1, 16), (2, None), (2, 40)])
def test_a_bigger_card_never_skips_fewer_blocks_on_the_same_rung(experts, host):
    previous = None
    for vram in range(16, 200, 4):
        plan = plan_memory(vram, "t2v-A14B", 832, 480, 81, experts=experts, host_ram_gb=host)
        if previous is not None and plan.fits and previous.rung == plan.rung:
            assert plan.settings.skip_blocks >= previous.settings.skip_blocks, (vram, previous.settings, plan.settings)
        previous = plan


def test_skip_moves_activations_from_inputs_to_full_blocks():
    w = Workload(get_variant("t2v-A14B"), 832, 480, 81)
    none = estimate(w, Settings()).total
    ckpt = Settings(checkpointing=True)
    assert estimate(w, dataclasses.replace(ckpt, skip_blocks=40)).total == pytest.approx(none)
    totals = [estimate(w, dataclasses.replace(ckpt, skip_blocks=n)).total for n in range(1, 41)]
    assert totals == sorted(totals)  # each skipped block holds more
    assert estimate(w, dataclasses.replace(ckpt, skip_blocks=1)).total <= estimate(w, ckpt).total  # the last is free
    offload = Settings(checkpointing=True, offload_activations=True, skip_blocks=10)
    assert estimate(w, offload).host == pytest.approx(29 * 4 * 5120 * 32760 / 2**30)


def test_estimate_skipping_every_block_equals_no_checkpointing():
    small = dataclasses.replace(get_variant("t2v-1.3B"), num_layers=4)
    setup = StepSetup(small, 416, 240, 17)
    none = estimate_step(dataclasses.replace(setup, checkpointing=False), "h100")
    every = estimate_step(dataclasses.replace(setup, skip_blocks=4), "h100")
    ckpt = estimate_step(setup, "h100")
    one = estimate_step(dataclasses.replace(setup, skip_blocks=1, keep_attention=True,
                                            offload_activations=True), "h100")
    assert every.seconds == pytest.approx(none.seconds, rel=1e-3) and every.kernels == none.kernels
    assert none.seconds < one.seconds < ckpt.seconds
    assert "the last 1 of 4 blocks not checkpointed" in one.table() and one.offload.blocks == 2
    assert len(trace_step(dataclasses.replace(setup, skip_blocks=2))) < len(trace_step(setup))


@pytest.mark.gpu
def test_cuda_offload_with_skipped_blocks_equals_plain_checkpointing(variant):
    """The real offloader (side stream, pinned buffers) with the last block unchecked, on CUDA."""

    def run(memory):
        model = tiny_model(variant)
        setup = apply_memory_features(model, memory, "cuda")
        net = with_lora(model)
        net.to("cuda")
        x, t, ctx = tiny_inputs(variant)
        loss = model(x.cuda(), t.cuda(), [c.cuda() for c in ctx]).square().mean()
        loss.backward()
        torch.cuda.synchronize()
        return setup, loss.item(), [p.grad.cpu() for p in net.parameters()]

    _, plain_loss, plain = run(MemoryArgs(gradient_checkpointing=True))
    setup, loss, grads = run(MemoryArgs(gradient_checkpointing=True, gradient_checkpointing_cpu_offload=True,
                                        gradient_checkpointing_keep_attention=True, **{KEY: 1}))
    assert setup.activation_offload and setup.skip_blocks == 1
    assert loss == pytest.approx(plain_loss, rel=1e-5)
    for a, b in zip(grads, plain):
        assert ((a - b).norm() / b.norm().clamp_min(1e-30)).item() <= 1e-5

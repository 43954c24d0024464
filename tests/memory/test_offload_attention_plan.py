"""Kept self-attention on the host (`gradient_checkpointing_offload_attention`, issue 17: speed on 24 GB cards) in
the LoRA planner and the step estimate: the rung's place in the ladder, its GPU and host bytes against the
planner's constants, the host RAM check falling back to the rungs without it, `apply`, each block's copy in the
estimate's replay, and the option through `tools/benchmark_wan.py`."""

from __future__ import annotations

import dataclasses

import pytest

from library.config import config_from_dict, validate
from library.config.schema import MemoryArgs
from library.training.benchmark import BenchConfig
from library.training.estimate import GPUS, StepSetup, estimate_step, trace_step
from library.training.estimate_cli import estimate_argv
from library.training.estimate_offload import copy_bytes, host_copy_wait
from library.training.planning.lora import (GIB, KEEP_PER_C, KEEP_PER_HEAD, Settings, Workload, _candidates, estimate,
                                            kept_bytes, plan_memory)
from library.wan.variants import get_variant
from tests.helpers import tool

A14B = Workload(get_variant("t2v-A14B"), 832, 480, 81)
OFFLOAD = Settings(checkpointing=True, offload_activations=True)
ON_GPU = dataclasses.replace(OFFLOAD, keep_attention=True)
ON_HOST = dataclasses.replace(ON_GPU, offload_attention=True)
RTX_4090 = GPUS["4090"].memory_gib


@pytest.fixture(scope="module")
def benchmark_wan():
    benchmark_wan = tool("benchmark_wan")
    return benchmark_wan


# ---- the planner -----------------------------------------------------------------------------------------------


def test_the_rung_comes_after_keeping_attention_on_the_gpu_and_before_recomputing_it():
    ladder = list(_candidates(A14B))
    assert ladder[2:4] == [ON_GPU, ON_HOST]
    assert ladder.index(Settings(checkpointing=True, keep_attention_blocks=39)) == 4  # no offload, some kept
    some = Settings(checkpointing=True, offload_activations=True, keep_attention_blocks=20)
    assert ladder.index(dataclasses.replace(some, offload_attention=True)) == ladder.index(some) + 1  # K: GPU, host
    assert dataclasses.replace(some, keep_attention_blocks=1, offload_attention=True) not in ladder  # sends nothing
    fp8 = [s for s in ladder if s.fp8]
    assert fp8[0] == dataclasses.replace(ON_HOST, fp8=True)
    assert fp8[1:40] == [dataclasses.replace(ON_HOST, fp8=True, blocks_to_swap=n) for n in range(1, 40)]
    assert fp8[40] == dataclasses.replace(OFFLOAD, fp8=True) and fp8[41] == Settings(True, True, True, 1)
    assert ladder.index(OFFLOAD) < ladder.index(fp8[0]) and len(ladder) == len(set(ladder))
    fast = list(_candidates(A14B, fp8=True))  # fp8 weights everywhere: swap keeping attention before recomputing
    assert all(s.fp8 for s in fast) and len(fast) == len(set(fast))
    assert fast[3] == dataclasses.replace(ON_HOST, fp8=True)
    assert fast[4] == dataclasses.replace(ON_HOST, fp8=True, blocks_to_swap=1)
    assert fast.index(dataclasses.replace(OFFLOAD, fp8=True)) > fast.index(fp8[39])


def test_gpu_and_host_bytes_against_the_constants():
    v, t = A14B.variant, A14B.tokens
    keep = (KEEP_PER_C * v.dim + KEEP_PER_HEAD * v.num_heads) * t
    assert kept_bytes(A14B) == keep and 0.3 < keep / GIB < 0.33
    plain, gpu, host = (estimate(A14B, s) for s in (OFFLOAD, ON_GPU, ON_HOST))
    # the GPU: plain ckpt + offload and one block's kept outputs coming back (the last block's are its own)
    assert host.activations - plain.activations == pytest.approx(keep / GIB)
    assert gpu.activations - plain.activations == pytest.approx(39 * keep / GIB)
    # the host: the 39 offloaded inputs and the kept outputs of those 39 blocks (the last keeps both on the GPU)
    assert plain.host == gpu.host == pytest.approx(39 * 4 * v.dim * t / GIB)
    assert host.host - plain.host == pytest.approx(39 * keep / GIB)
    some = dataclasses.replace(OFFLOAD, keep_attention_blocks=10, offload_attention=True)
    assert estimate(A14B, some).host - plain.host == pytest.approx(9 * keep / GIB)
    assert estimate(A14B, some).activations == pytest.approx(host.activations)
    one = dataclasses.replace(some, keep_attention_blocks=1)  # the last block's only: nothing goes, nothing comes
    assert estimate(A14B, one) == estimate(A14B, dataclasses.replace(one, offload_attention=False))
    # skipping N blocks: at the last block's backward pass only the last checkpointed block's outputs are kept
    skip = dataclasses.replace(ON_HOST, skip_blocks=5)
    e = estimate(A14B, skip)
    assert e.host - estimate(A14B, dataclasses.replace(OFFLOAD, skip_blocks=5)).host == pytest.approx(34 * keep / GIB)
    assert e.activations < estimate(A14B, dataclasses.replace(ON_GPU, skip_blocks=5)).activations - 30 * keep / GIB
    # meaningless without offload or kept attention: not applied, not counted
    assert not dataclasses.replace(ON_HOST, offload_activations=False).attention_on_host
    assert not dataclasses.replace(ON_HOST, keep_attention=False).attention_on_host
    assert ON_HOST.sent_blocks(40) == 39 and skip.sent_blocks(40) == 34


def test_the_24_gb_plan_keeps_attention_on_the_host_and_falls_back_without_the_host_ram():
    plan = plan_memory(RTX_4090, "t2v-A14B", 832, 480, 81)
    assert plan.fits and plan.settings == dataclasses.replace(ON_HOST, fp8=True, blocks_to_swap=36)
    assert plan.settings.label() == "fp8, ckpt+offload keeping attention on the host, swap 36"
    assert 48 < plan.estimate.host < 49 and "keeping attention on the host, swap 36 (21.6 GiB" in plan.table()
    assert plan_memory(RTX_4090, "t2v-A14B", 832, 480, 81, host_ram_gb=64).settings == plan.settings
    # 43.2 GiB usable: the inputs and 35 swapped blocks fit, the kept outputs with them do not
    short = plan_memory(RTX_4090, "t2v-A14B", 832, 480, 81, host_ram_gb=48)
    assert short.fits and short.settings == Settings(True, True, True, 35)  # the plan before the new rung
    assert not short.settings.attention_on_host and short.estimate.host < 43.2
    # TI2V-5B at 1280x704x121: every block's attention on the host, not 12 of 30 on the GPU
    ti2v = plan_memory(RTX_4090, "ti2v-5B", 1280, 704, 121)
    assert ti2v.rung == ON_HOST and ti2v.settings == dataclasses.replace(ON_HOST, skip_blocks=1)


def test_apply_sets_the_key_only_where_it_means_something():
    plan = plan_memory(RTX_4090, "t2v-A14B", 832, 480, 81)
    memory = plan.apply(MemoryArgs())
    assert memory.gradient_checkpointing_offload_attention and memory.gradient_checkpointing_cpu_offload
    assert memory.gradient_checkpointing_keep_attention and memory.blocks_to_swap == 36
    cfg = config_from_dict({"dit": "low.safetensors", "dataset_config": "data.toml"})
    validate(dataclasses.replace(cfg, memory=memory))  # the config's rule accepts it
    ti2v = plan_memory(RTX_4090, "ti2v-5B", 1280, 704, 121)
    assert ti2v.apply(MemoryArgs()).gradient_checkpointing_offload_attention
    gone = dataclasses.replace(OFFLOAD, skip_blocks=2, offload_attention=True)  # K - N = 0 after the skip stage
    assert not dataclasses.replace(plan, settings=gone).apply(MemoryArgs()).gradient_checkpointing_offload_attention
    assert not dataclasses.replace(plan, settings=ON_GPU).apply(MemoryArgs()).gradient_checkpointing_offload_attention


# ---- the step estimate -----------------------------------------------------------------------------------------

# four blocks, 1 s of forward and 2 s of backward compute each (as tests/memory/test_estimate_swap.py)
STARTS, SECONDS = list(range(8)), [1, 1, 1, 1, 2, 2, 2, 2]
FORWARD, BACKWARD = [0, 1, 2, 3], {3: 4, 2: 5, 1: 6, 0: 7}


def test_each_block_copies_its_own_bytes_in_the_replay():
    """Inputs of 1 s a copy; blocks 1 and 2 send their kept outputs too (blocks 1-3 keep attention, block 3 is the
    last and keeps it on the GPU), 2 s more each. Forward: the copies end at 1, 4 and 7 s. Backward: block 2's
    comes back from 7 s (when block 3's backward pass begins at 4 s the stream is busy), ready at 10 s, wanted at
    6 s: 4 s of waiting; block 1's from 10 s, ready at 13 s, wanted at 12 s: 1 s more; block 0's (1 s) hides."""
    assert copy_bytes(1.0, 2.0, 4, 2) == [1.0, 3.0, 3.0, 1.0]
    assert copy_bytes(1.0, 2.0, 4, 0) == [1.0] * 4 and copy_bytes(1.0, 2.0, 4, 3) == [3.0, 3.0, 3.0, 1.0]
    assert host_copy_wait(STARTS, SECONDS, FORWARD, BACKWARD, 4, copy_bytes(1.0, 2.0, 4, 2)) == pytest.approx(5.0)
    assert host_copy_wait(STARTS, SECONDS, FORWARD, BACKWARD, 4, 1.0) == 0  # the inputs alone hide
    assert host_copy_wait(STARTS, SECONDS, FORWARD, BACKWARD, 4, [1.0] * 4) == 0
    # with block 3 swapped (1 s a copy) the weights queue on the same direction as the copies back
    both = host_copy_wait(STARTS, SECONDS, FORWARD, BACKWARD, 4, copy_bytes(1.0, 2.0, 4, 2), {3: 1.0})
    assert both >= 5.0


@pytest.fixture(scope="module")
def small():
    """A 1.3B-wide model of 4 blocks at 1,280 tokens, keeping attention with activation offload, traced once."""
    variant = dataclasses.replace(get_variant("t2v-1.3B"), num_layers=4)
    setup = StepSetup(variant, 256, 256, 17, rank=16, keep_attention=True, offload_activations=True)
    return setup, trace_step(setup)


def test_the_estimate_sends_the_kept_outputs_of_every_kept_block_but_the_last(small, monkeypatch):
    setup, kernels = small
    v, t = setup.variant, setup.tokens()
    inputs, keep = 4 * v.dim * t, (KEEP_PER_C * v.dim + KEEP_PER_HEAD * v.num_heads) * t
    plain = estimate_step(setup, "h100", compiled=True, kernels=kernels)
    host = estimate_step(dataclasses.replace(setup, offload_attention=True), "h100", compiled=True, kernels=kernels)
    o = host.offload
    assert plain.offload.attention_blocks == 0 and o.blocks == 3 and o.attention_blocks == 3
    assert o.gb_each_way == pytest.approx(3 * (inputs + keep) / 1e9)
    assert o.copy_s == pytest.approx(inputs / 51.2e9) and o.attention_copy_s == pytest.approx(keep / 51.2e9)
    assert host.seconds == pytest.approx(plain.seconds)  # the same compute; the copies hide on the H100
    table = host.table()
    assert "activations and kept attention offloaded" in table and "kept self-attention outputs of 3 of them" in table
    some = estimate_step(dataclasses.replace(setup, keep_attention=False, keep_attention_blocks=2,
                                             offload_attention=True), "h100", compiled=True, kernels=kernels)
    assert some.offload.attention_blocks == 1  # K = 2: only the first of the two sends
    skipped = estimate_step(dataclasses.replace(setup, skip_blocks=1, offload_attention=True), "h100", compiled=True,
                            kernels=kernels)
    assert skipped.offload.blocks == skipped.offload.attention_blocks == 2
    monkeypatch.setitem(GPUS, "slow", dataclasses.replace(GPUS["h100"], host_link=("a slow link", 0.5)))
    slow_plain = estimate_step(setup, "slow", compiled=True, kernels=kernels)
    slow = estimate_step(dataclasses.replace(setup, offload_attention=True), "slow", compiled=True, kernels=kernels)
    assert slow.offload.exposed_s > slow_plain.offload.exposed_s > 0
    assert slow.seconds == pytest.approx(plain.seconds + slow.offload.exposed_s)
    swap = dataclasses.replace(setup, blocks_to_swap=2)
    swapped = estimate_step(dataclasses.replace(swap, offload_attention=True), "slow", compiled=True, kernels=kernels)
    assert swapped.swap.exposed_s > estimate_step(swap, "slow", compiled=True, kernels=kernels).swap.exposed_s
    with pytest.raises(ValueError, match="needs activation offload and kept attention"):
        estimate_step(dataclasses.replace(setup, keep_attention=False, offload_attention=True), "h100", kernels=kernels)


def test_the_command_option_and_the_estimate_argv(benchmark_wan, capsys):
    small = ["--estimate", "--task", "t2v-tiny", "--width", "64", "--height", "64", "--frames", "5",
             "--network_dim", "4", "--gpu", "4090", "--offload_activations"]
    assert benchmark_wan.main(small + ["--keep_attention", "--offload_attention"]) == 0
    out = capsys.readouterr().out
    assert "activations and kept attention offloaded" in out and "kept self-attention outputs of" in out
    assert benchmark_wan.main(small + ["--offload_attention"]) == 2
    assert "add --offload_activations and --keep_attention" in capsys.readouterr().err
    args = benchmark_wan.parse_args(["--cpu", "--task", "t2v-tiny", "--width", "64", "--height", "64", "--frames", "5",
                                     "--offload_activations", "--keep_attention_blocks", "2", "--offload_attention"])
    cfg = benchmark_wan._config(args)  # a measured run puts it into MemoryArgs
    assert cfg.memory.gradient_checkpointing_offload_attention and cfg.memory.gradient_checkpointing_cpu_offload
    again = benchmark_wan.parse_args(["--estimate", *estimate_argv(cfg)])
    assert again.offload_attention and again.keep_attention_blocks == 2 and again.gradient_checkpointing_cpu_offload
    plan = plan_memory(RTX_4090, "t2v-A14B", 832, 480, 81)  # the planner's choice, applied as a measured run would
    planned = BenchConfig(get_variant("t2v-A14B"), 832, 480, 81, memory=plan.apply(MemoryArgs()), compile=True)
    args = benchmark_wan.parse_args(["--estimate", *estimate_argv(planned)])
    assert args.offload_attention and args.keep_attention and args.blocks_to_swap == 36 and args.fp8_scaled
    assert not benchmark_wan.parse_args(["--estimate", *estimate_argv(
        BenchConfig(get_variant("t2v-1.3B"), 64, 64, 5, memory=MemoryArgs()))]).offload_attention

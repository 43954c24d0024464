"""Activation offload with kept attention in the planner and the step estimate (issue 17): the rung order,
the host RAM check, and the offload copies costed at the host link's rate, overlapped with the compute."""

from __future__ import annotations

import dataclasses

import pytest

from library.training.estimate import StepSetup, estimate_step, trace_step
from library.training.estimate_offload import exposed_seconds
from library.training.gpu_rates import GPUS
from library.training.planning import host as host_ram
from library.training.planning.lora import GIB, Settings, Workload, _candidates, estimate, plan_memory
from library.wan.variants import get_variant
from tests.helpers import tool

H100 = GPUS["h100"].memory_gib
KEEP_ALL_OFFLOADED = Settings(checkpointing=True, offload_activations=True, keep_attention=True)
ON_HOST = dataclasses.replace(KEEP_ALL_OFFLOADED, offload_attention=True)  # test_offload_attention_plan.py


def test_h100_keeps_every_block_with_offload_when_the_host_holds_the_inputs():
    plan = plan_memory(H100, "t2v-A14B", 832, 480, 81, host_ram_gb=64)
    assert plan.fits and plan.rung == KEEP_ALL_OFFLOADED
    rung = plan.candidates[-2][1]
    inputs = 39 * 4 * 5120 * 32760 / GIB  # every block input but the last one's, fp32
    assert rung.host == pytest.approx(inputs) and 24 < inputs < 25
    assert rung.total < plan.budget_gb - 15  # 57.6 of 74.7 GiB: the skip stage spends the rest on 3 blocks
    assert plan.settings == dataclasses.replace(KEEP_ALL_OFFLOADED, skip_blocks=3)  # attention stays on the GPU
    assert plan.estimate.host == pytest.approx(36 * inputs / 39)  # the skipped blocks' inputs are not offloaded
    assert "22.5 GiB of host RAM for the GPU" in plan.table()
    short = plan_memory(H100, "t2v-A14B", 832, 480, 81, host_ram_gb=16)  # 14.4 usable: the inputs do not fit
    assert short.fits and short.rung == Settings(checkpointing=True, keep_attention_blocks=19)
    assert short.settings == Settings(checkpointing=True, keep_attention_blocks=18, skip_blocks=1)
    rows = {s: cell for s, cell in zip((s for s, _ in short.candidates), short.table().splitlines()[2:])}
    assert rows[KEEP_ALL_OFFLOADED].endswith("no: host RAM")
    assert plan_memory(H100, "t2v-A14B", 832, 480, 81).rung == KEEP_ALL_OFFLOADED  # host not checked


def test_the_ladder_puts_offloaded_keep_all_right_after_keep_all():
    w = Workload(get_variant("t2v-A14B"), 832, 480, 81)
    ladder = list(_candidates(w))
    assert ladder[1:4] == [Settings(checkpointing=True, keep_attention=True), KEEP_ALL_OFFLOADED, ON_HOST]
    assert ladder[4] == Settings(checkpointing=True, keep_attention_blocks=39)
    offloaded_some = ladder.index(Settings(checkpointing=True, offload_activations=True, keep_attention_blocks=39))
    assert ladder.index(Settings(checkpointing=True)) < offloaded_some
    # K = 39 .. 1 with the kept outputs on the GPU, and K = 39 .. 2 with them on the host
    assert ladder.index(Settings(checkpointing=True, offload_activations=True)) == offloaded_some + 39 + 38
    # offload frees more than keeping every block's attention costs: no rung without offload needs less
    for name, size in (("t2v-A14B", (832, 480, 81)), ("ti2v-5B", (1280, 704, 121)), ("t2v-1.3B", (832, 480, 81))):
        w = Workload(get_variant(name), *size)
        assert estimate(w, KEEP_ALL_OFFLOADED).total < estimate(w, Settings(checkpointing=True)).total


def test_24_gib_plans_are_unchanged_or_better():
    a14b = plan_memory(24, "t2v-A14B", 832, 480, 81)  # was fp8 + ckpt + offload + swap 34 (before that the same)
    assert a14b.settings == dataclasses.replace(ON_HOST, fp8=True, blocks_to_swap=35) and a14b.fits
    ti2v = plan_memory(24, "ti2v-5B", 1280, 704, 121)  # was keeping 15 blocks' attention, plain ckpt + offload before
    assert ti2v.fits and ti2v.settings.offload_activations and ti2v.settings.keep_attention
    assert ti2v.settings.attention_on_host and not ti2v.settings.fp8 and not ti2v.settings.blocks_to_swap


def test_two_experts_offload_the_inactive_one_before_giving_up_kept_attention():
    roomy = plan_memory(H100, "t2v-A14B", 832, 480, 81, experts=2, host_ram_gb=128)
    assert roomy.rung == dataclasses.replace(KEEP_ALL_OFFLOADED, offload_inactive=True)
    assert 51 < roomy.candidates[-2][1].host < 52  # the inputs and the inactive bf16 expert
    assert roomy.settings.skip_blocks == 2 and not roomy.settings.attention_on_host
    tight = plan_memory(H100, "t2v-A14B", 832, 480, 81, experts=2, host_ram_gb=40)  # 36 usable: the expert only
    k = tight.rung.keep_attention_blocks  # both experts' LoRA and optimizer state on the GPU: fewer than 19
    assert tight.rung == Settings(checkpointing=True, offload_inactive=True, keep_attention_blocks=k) and 0 < k < 19


@pytest.mark.parametrize("host", [None, 16, 40, 64])
def test_a_bigger_card_never_gets_a_later_candidate(host):
    for experts in (1, 2):
        w = Workload(get_variant("t2v-A14B"), 832, 480, 81, experts=experts)
        ladder = list(_candidates(w))
        previous = len(ladder)
        for vram in range(16, 200, 4):
            plan = plan_memory(vram, "t2v-A14B", 832, 480, 81, experts=experts, host_ram_gb=host)
            index = ladder.index(plan.rung)  # (test_skip_blocks.py: the skip stage on top of it)
            assert index <= previous, (vram, host, plan.settings)
            previous = index


def test_host_ram_is_mem_available_shared_among_local_processes(tmp_path, monkeypatch):
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:       134217728 kB\nMemAvailable:   67108864 kB\n")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    assert host_ram.detect_host_ram_gb(str(meminfo)) == pytest.approx(16.0)
    monkeypatch.delenv("LOCAL_WORLD_SIZE")
    assert host_ram.detect_host_ram_gb(str(meminfo)) == pytest.approx(64.0)
    assert host_ram.detect_host_ram_gb(str(tmp_path / "absent")) is None


def test_plan_memory_cli_takes_the_host_ram(capsys):
    cli = tool("plan_memory")
    assert cli.main(["--vram_gb", "79.2", "--host_ram_gb", "16"]) == 0
    out = capsys.readouterr().out
    assert "14.4 GiB of host RAM usable" in out and "no: host RAM" in out
    assert "plan: bf16, ckpt keeping attention in 18 blocks, skipping the last block (74.0 GiB)" in out
    assert cli.main(["--vram_gb", "79.2", "--host_ram_gb", "64"]) == 0
    out = capsys.readouterr().out
    assert "bf16, ckpt+offload keeping attention      " in out and "57.6      24.4   yes" in out
    assert "plan: bf16, ckpt+offload keeping attention, skipping the last 3 blocks (73.3 GiB; 22.5 GiB of host" in out


# ---- the step estimate ---------------------------------------------------------------------------------------


def test_exposed_time_of_a_hand_made_schedule():
    """Three blocks of 1 s forward and 2 s backward: a 0.5 s copy hides; a 3 s copy makes the backward wait
    for block 1's input (queued behind the forward's copies: ready at 9 s, wanted at 5 s) and block 0's (ready
    at 12 s, wanted at 11 s)."""
    starts, seconds = [0, 1, 2, 3, 4, 5], [1, 1, 1, 2, 2, 2]
    forward, backward = [0, 1, 2], {2: 3, 1: 4, 0: 5}
    assert exposed_seconds(starts, seconds, forward, backward, 0.5) == 0
    assert exposed_seconds(starts, seconds, forward, backward, 3.0) == pytest.approx(5.0)


def test_estimate_adds_only_the_exposed_copies(monkeypatch):
    base = StepSetup(get_variant("t2v-1.3B"), 256, 256, 17, rank=16, keep_attention=True)
    base = dataclasses.replace(base, variant=dataclasses.replace(base.variant, num_layers=3))
    setup = dataclasses.replace(base, offload_activations=True)
    kernels = trace_step(setup)
    assert len(kernels.marks.forward) == len(kernels.marks.backward) == 3
    plain = estimate_step(base, "h100", "flash3", compiled=True, kernels=kernels)
    fast = estimate_step(setup, "h100", "flash3", compiled=True, kernels=kernels)
    o = fast.offload
    assert plain.offload is None and o.blocks == 2
    assert o.gb_each_way == pytest.approx(2 * 4 * 1536 * setup.tokens() / 1e9)
    assert o.copy_s == pytest.approx(4 * 1536 * setup.tokens() / 51.2e9)
    assert o.exposed_s == 0 and fast.seconds == pytest.approx(plain.seconds)  # the compute hides every copy
    assert "activations offloaded" in fast.table() and "over PCIe 5.0 x16 at 51.2 GB/s" in fast.table()
    monkeypatch.setitem(GPUS, "slow", dataclasses.replace(GPUS["h100"], host_link=("a slow link", 0.5)))
    slow = estimate_step(setup, "slow", "flash3", compiled=True, kernels=kernels)
    assert slow.offload.exposed_s > slow.offload.copy_s > 0
    assert slow.seconds == pytest.approx(plain.seconds + slow.offload.exposed_s)


def test_every_gpu_states_its_host_link():
    assert {g.host_link[0] for g in GPUS.values()} == {"PCIe 5.0 x16", "PCIe 4.0 x16"}
    assert GPUS["a100"].host_link == GPUS["4090"].host_link == ("PCIe 4.0 x16", 25.6)
    assert GPUS["h100"].host_link == GPUS["h200"].host_link == GPUS["5090"].host_link == ("PCIe 5.0 x16", 51.2)

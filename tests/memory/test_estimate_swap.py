"""Block swap in the step estimate (issue 17: the estimate covers the settings `auto_memory` gives a 24 GB card,
which swap blocks): the swapped blocks' weights cross the host link before each use, in the order
`library.runtime.block_swap` issues them, sharing the host-to-device direction with activation offload's copies
back; the step waits where the compute reaches a block before its weights."""

from __future__ import annotations

import dataclasses

import pytest

from library.training.estimate import GPUS, StepSetup, estimate_step, trace_step
from library.training.estimate_offload import exposed_seconds, host_copy_wait
from library.wan.variants import get_variant
from tests.helpers import tool

# four blocks, 1 s of forward and 2 s of backward compute each: block i's forward at i s, its backward pass
# (recomputation included) from 4 s on, block 3 first
STARTS, SECONDS = list(range(8)), [1, 1, 1, 1, 2, 2, 2, 2]
FORWARD, BACKWARD = [0, 1, 2, 3], {3: 4, 2: 5, 1: 6, 0: 7}


def test_swap_waits_of_a_hand_made_schedule():
    """Blocks 1-3 swapped, one block of prefetch, 3 s a copy. Forward: block 1's copy starts with block 0 (ready
    at 3 s, wanted at 1 s: 2 s of waiting), block 2's with block 1 (ready at 6 s, wanted at 4 s), block 3's with
    block 2 (ready at 9 s, wanted at 7 s); blocks 2 and 3 stay for the backward pass, block 1 goes. Backward:
    block 1's copy starts with block 2's backward pass at 12 s, ready at 15 s, wanted at 14 s. 7 s in all."""
    swapped = {1: 3.0, 2: 3.0, 3: 3.0}
    assert host_copy_wait(STARTS, SECONDS, FORWARD, BACKWARD, 0, 0.0, swapped) == pytest.approx(7.0)
    fast = {i: 0.5 for i in swapped}
    assert host_copy_wait(STARTS, SECONDS, FORWARD, BACKWARD, 0, 0.0, fast) == 0  # every copy hides
    # two blocks of prefetch: block 2's copy starts at 0 s too, behind block 1's, and block 1 stays for the
    # backward pass
    assert host_copy_wait(STARTS, SECONDS, FORWARD, BACKWARD, 0, 0.0, swapped, prefetch=2) == pytest.approx(6.0)


def test_weights_and_activations_share_the_host_to_device_direction():
    """Offloaded inputs of blocks 0-2 (1.5 s a copy) with block 3 swapped (1.5 s): alone each hides, or nearly;
    together the backward pass's copies queue on one direction of the link and the wait grows."""
    offload_only = exposed_seconds(STARTS, SECONDS, FORWARD, BACKWARD, 1.5)
    assert host_copy_wait(STARTS, SECONDS, FORWARD, BACKWARD, 4, 1.5) == offload_only
    swap_only = host_copy_wait(STARTS, SECONDS, FORWARD, BACKWARD, 0, 0.0, {2: 1.5, 3: 1.5})
    both = host_copy_wait(STARTS, SECONDS, FORWARD, BACKWARD, 4, 1.5, {1: 1.5, 2: 1.5, 3: 1.5})
    assert both > max(offload_only, swap_only)


@pytest.fixture(scope="module")
def small():
    """A 1.3B-wide model of 4 blocks at 1,280 tokens, checkpointed, and its traced step."""
    variant = dataclasses.replace(get_variant("t2v-1.3B"), num_layers=4)
    setup = StepSetup(variant, 256, 256, 17, rank=16)
    return setup, trace_step(setup)


def test_the_estimate_adds_the_wait_for_swapped_weights(small, monkeypatch):
    setup, kernels = small
    plain = estimate_step(setup, "h100", compiled=True, kernels=kernels)
    swap = dataclasses.replace(setup, blocks_to_swap=2)
    h100 = estimate_step(swap, "h100", compiled=True, kernels=kernels)
    block = kernels.block_bytes[-1]
    assert len(set(kernels.block_bytes)) == 1 and block > 2 * 1536 * 1536 * 4  # bf16, at least the attention
    s = h100.swap
    assert plain.swap is None and s.blocks == 2 and s.gb_per_pass == pytest.approx(2 * block / 1e9)
    # 1.8 ms a block's weights over PCIe 5.0 against about 1 ms of forward compute at 1,280 tokens: exposed
    assert s.load_s == pytest.approx(block / 51.2e9) and s.exposed_s > 0
    assert h100.seconds == pytest.approx(plain.seconds + s.exposed_s)
    assert "2 blocks swapped" in h100.table() and "estimated block swap  2 blocks" in h100.table()
    monkeypatch.setitem(GPUS, "fast", dataclasses.replace(GPUS["h100"], host_link=("a fast link", 1e6)))
    fast = estimate_step(swap, "fast", compiled=True, kernels=kernels)
    assert fast.swap.exposed_s == 0 and fast.seconds == plain.seconds
    monkeypatch.setitem(GPUS, "slow", dataclasses.replace(GPUS["h100"], host_link=("a slow link", 0.5)))
    slow = estimate_step(swap, "slow", compiled=True, kernels=kernels)
    assert slow.swap.exposed_s > slow.swap.load_s > 0
    assert slow.seconds == pytest.approx(plain.seconds + slow.swap.exposed_s)
    both = estimate_step(dataclasses.replace(swap, offload_activations=True), "slow", compiled=True, kernels=kernels)
    alone = estimate_step(dataclasses.replace(setup, offload_activations=True), "slow", compiled=True, kernels=kernels)
    assert both.swap.exposed_s > max(slow.swap.exposed_s, alone.offload.exposed_s)  # one link for both
    assert both.seconds == pytest.approx(plain.seconds + both.swap.exposed_s)
    assert "exposed: with block swap's copies" in both.table()
    with pytest.raises(ValueError, match="cannot be combined with skip_blocks"):
        estimate_step(dataclasses.replace(swap, skip_blocks=1), "h100", kernels=kernels)
    with pytest.raises(ValueError, match="need checkpointing"):
        estimate_step(dataclasses.replace(swap, checkpointing=False), "h100", kernels=kernels)


def test_the_command_estimates_block_swap_and_the_24_gb_plan(capsys):
    benchmark_wan = tool("benchmark_wan")
    small = ["--estimate", "--task", "t2v-tiny", "--width", "64", "--height", "64", "--frames", "5",
             "--network_dim", "4"]
    assert benchmark_wan.main(small + ["--gpu", "4090", "--blocks_to_swap", "1"]) == 0
    out = capsys.readouterr().out
    assert "1 blocks swapped" in out and "over PCIe 4.0 x16 at 25.6 GB/s" in out
    assert benchmark_wan.main(small + ["--gpu", "4090", "--blocks_to_swap", "1", "--no_gradient_checkpointing"]) == 2
    assert "block swap and activation offload need gradient checkpointing" in capsys.readouterr().err
    # a 24 GB plan of one A14B expert at 832x480x81 swaps blocks: estimated, not refused; `--vram_cap_gb` plans
    # for the cap (an H100 capped as `--compare_cap 24` caps it)
    assert benchmark_wan.main(["--estimate", "--gpu", "h100", "--plan", "--vram_cap_gb", "24"]) == 0
    out = capsys.readouterr().out
    assert "-> " in out and "keeping attention on the host, swap 35" in out and "35 blocks swapped" in out
    assert "the kept self-attention outputs of 39 of them" in out and "estimated step time" in out

"""Block swap and activation offload: the residency schedule with a CPU stand-in for the GPU transport,
gradients identical to a plain run, and `apply_memory_features` as a clear no-op without CUDA."""

from __future__ import annotations

import logging

import pytest
import torch

from library.config.schema import MemoryArgs
from library.runtime.block_swap import BlockSwapper, HostTransport
from library.runtime.memory import ActivationOffloader, BlockRunner, apply_memory_features, place_model
from library.wan.fp8 import FP8Linear
from networks.lora_wan import create_network
from tests.memory.conftest import deep_tiny, tiny_inputs, tiny_model

LAYERS = 6


def with_lora(model, seed=1):
    torch.manual_seed(seed)
    net = create_network(1.0, 4, 4, None, None, model)
    net.apply_to()
    for lora in net.loras:  # non-zero up weights, so every LoRA weight gets a gradient
        torch.nn.init.normal_(lora.lora_up.weight, std=0.1)
    return net


def step(model, net, variant):
    x, t, ctx = tiny_inputs(variant)
    out = model(x, t, ctx)
    out.square().mean().backward()
    return out.detach(), {lo.lora_name: (lo.lora_down.weight.grad.clone(), lo.lora_up.weight.grad.clone())
                          for lo in net.loras}


def residency_probe(model, swapper):
    """(block, resident?) at every block call, recomputations in the backward pass included."""
    seen = []
    for i, block in enumerate(model.blocks):
        block.register_forward_pre_hook(lambda mod, args, i=i: seen.append((i, swapper.is_resident(i))))
    return seen


@pytest.fixture(scope="module")
def variant():
    return deep_tiny(LAYERS)


@pytest.fixture(scope="module")
def reference(variant):
    model = tiny_model(variant)
    model.enable_gradient_checkpointing(True)
    return step(model, with_lora(model), variant)


def test_forward_only_streams_each_swapped_block_once(variant):
    model = tiny_model(variant)
    trace = []
    swapper = BlockSwapper(model.blocks, 3, HostTransport(), prefetch=1, trace=trace)
    model.block_runner = BlockRunner(swapper)
    seen = residency_probe(model, swapper)
    with torch.no_grad():
        model(*tiny_inputs(variant))
    assert seen == [(i, True) for i in range(LAYERS)]
    assert trace == [("load", 3), ("use", 3), ("load", 4), ("drop", 3), ("use", 4), ("load", 5), ("drop", 4),
                     ("use", 5), ("drop", 5)]
    assert swapper.max_resident <= 2 and not swapper._resident
    assert all(p.device.type == "cpu" for p in model.blocks[5].parameters())


@pytest.mark.parametrize("prefetch", [1, 2])
def test_training_step_with_swap_gives_identical_gradients(variant, reference, prefetch):
    model = tiny_model(variant)
    model.enable_gradient_checkpointing(True)
    net = with_lora(model)
    trace = []
    swapper = BlockSwapper(model.blocks, 3, HostTransport(), prefetch=prefetch, trace=trace)
    model.block_runner = BlockRunner(swapper)
    seen = residency_probe(model, swapper)
    out, grads = step(model, net, variant)
    ref_out, ref_grads = reference
    assert torch.equal(out, ref_out)
    for name, (down, up) in ref_grads.items():
        assert torch.equal(grads[name][0], down) and torch.equal(grads[name][1], up), name
    # every call of a block (forward, then the recomputation of the backward pass) found it resident
    assert [i for i, _ in seen] == list(range(LAYERS)) + list(reversed(range(LAYERS)))
    assert all(resident for _, resident in seen)
    assert swapper.max_resident <= prefetch + 2 and not swapper._resident
    uses = [i for what, i in trace if what == "use"]
    assert uses[:3] == [3, 4, 5] and sorted(uses[3:], reverse=True) == uses[3:]  # backward in reverse order
    if prefetch == 1:  # blocks 4 and 5 stay for the backward pass; block 3 comes back once
        assert trace == [("load", 3), ("use", 3), ("load", 4), ("drop", 3), ("use", 4), ("load", 5), ("use", 5),
                         ("load", 3), ("drop", 5), ("use", 3), ("drop", 4), ("drop", 3)]


def test_leftovers_are_dropped_at_the_next_forward(variant):
    model = tiny_model(variant)
    model.enable_gradient_checkpointing(True)
    with_lora(model)
    swapper = BlockSwapper(model.blocks, 2, HostTransport())
    model.block_runner = BlockRunner(swapper)
    model(*tiny_inputs(variant))  # a forward with gradients whose backward never runs (a skipped batch)
    assert swapper._resident == {4, 5}
    with torch.no_grad():
        model(*tiny_inputs(variant))
    assert not swapper._resident


def test_bad_swap_counts_are_errors(variant):
    model = tiny_model(variant)
    for n in (0, LAYERS):
        with pytest.raises(ValueError, match="between 1 and 5"):
            BlockSwapper(model.blocks, n, HostTransport())


def test_checkpoint_input_offload_gives_identical_gradients(variant, reference):
    model = tiny_model(variant)
    model.enable_gradient_checkpointing(True)
    net = with_lora(model)
    offloader = ActivationOffloader(torch.device("cpu"))
    swapper = BlockSwapper(model.blocks, 2, HostTransport())
    model.block_runner = BlockRunner(swapper, offloader)
    out, grads = step(model, net, variant)
    assert torch.equal(out, reference[0])
    assert all(torch.equal(grads[k][j], reference[1][k][j]) for k in grads for j in (0, 1))
    assert offloader.offloaded == LAYERS  # exactly one tensor per block: its residual-stream input


def test_apply_memory_features_without_cuda_is_a_logged_no_op(variant, caplog):
    model = tiny_model(variant)
    memory = MemoryArgs(blocks_to_swap=3, gradient_checkpointing=True, gradient_checkpointing_cpu_offload=True,
                        use_pinned_memory_for_block_swap=True)
    with caplog.at_level(logging.INFO, logger="library.runtime.memory"):
        setup = apply_memory_features(model, memory, "cpu")
    assert "block swap needs a CUDA device: blocks_to_swap = 3 is ignored on cpu" in caplog.text
    assert "activation offload needs a CUDA device" in caplog.text
    assert model.block_runner is None and model.gradient_checkpointing
    assert setup.blocks_to_swap == 0 and not setup.activation_offload
    assert all(p.device.type == "cpu" for p in model.parameters())


def test_apply_memory_features_with_a_transport_swaps_and_turns_on_checkpointing(variant, caplog):
    model = tiny_model(variant)
    memory = MemoryArgs(blocks_to_swap=2, fp8_base=True, fp8_scaled=True)
    with caplog.at_level(logging.WARNING, logger="library.runtime.memory"):
        setup = apply_memory_features(model, memory, "cpu", transport=HostTransport())
    assert "turning on gradient_checkpointing" in caplog.text and model.gradient_checkpointing
    assert isinstance(model.block_runner.swapper, BlockSwapper) and setup.blocks_to_swap == 2
    assert isinstance(model.blocks[0].ffn[0], FP8Linear) and setup.fp8.layers == 10 * LAYERS
    net = with_lora(model)
    out, _ = step(model, net, variant)
    assert torch.isfinite(out).all()


def test_place_model_leaves_swapped_blocks_in_host_memory(variant):
    model = tiny_model(variant)
    model.block_runner = BlockRunner(BlockSwapper(model.blocks, 2, HostTransport()))
    place_model(model, "meta")  # any other device shows what moved
    assert all(p.is_meta for i in range(4) for p in model.blocks[i].parameters())
    assert all(p.device.type == "cpu" for i in (4, 5) for p in model.blocks[i].parameters())
    assert model.head.head.weight.is_meta


@pytest.mark.gpu
def test_block_swap_and_offload_on_cuda_match_and_save_memory(variant):
    def run(memory):
        model = tiny_model(variant)
        apply_memory_features(model, memory, "cuda")
        net = with_lora(model)
        net.to("cuda")
        x, t, ctx = tiny_inputs(variant)
        torch.cuda.synchronize()
        out = model(x.cuda(), t.cuda(), [c.cuda() for c in ctx])
        out.square().mean().backward()
        torch.cuda.synchronize()
        return out.detach().cpu(), [lo.lora_up.weight.grad.cpu() for lo in net.loras]

    plain = run(MemoryArgs(gradient_checkpointing=True))
    swapped = run(MemoryArgs(gradient_checkpointing=True, blocks_to_swap=3, use_pinned_memory_for_block_swap=True,
                             gradient_checkpointing_cpu_offload=True))
    torch.testing.assert_close(swapped[0], plain[0])
    for a, b in zip(swapped[1], plain[1]):
        torch.testing.assert_close(a, b)

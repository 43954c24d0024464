"""Activation offload together with selective checkpointing (issue 17): the offloader's saved-tensor hooks
take each checkpointed block input to the host while `create_selective_checkpoint_contexts` keeps the
self-attention outputs; a LoRA step through `apply_memory_features` with both equals plain checkpointing
(fp32, CPU stand-in offloader that keeps clones), and the last block's input stays on the device with the
block before's copy back started when the last block's backward pass begins."""

from __future__ import annotations

import pytest
import torch

from library.config.schema import MemoryArgs
from library.runtime.memory import ActivationOffloader, BlockRunner
from tests.memory.conftest import deep_tiny, tiny_inputs, tiny_model
from tests.memory.test_block_swap import with_lora
from tests.memory.test_skip_blocks import lora_step

LAYERS = 4


@pytest.fixture(scope="module")
def variant():
    return deep_tiny(LAYERS)


def _step(variant, memory: MemoryArgs, offloader: ActivationOffloader | None = None):
    setup, model, loss, grads, calls, _ = lora_step(variant, memory, offloader)
    assert any(g.abs().max() > 0 for g in grads)
    return setup, model, loss, grads, calls


@pytest.fixture(scope="module")
def plain(variant):
    return _step(variant, MemoryArgs(gradient_checkpointing=True))


@pytest.mark.parametrize("keep", [{"gradient_checkpointing_keep_attention": True},
                                  {"gradient_checkpointing_keep_attention_blocks": 2}])
def test_offload_with_kept_attention_equals_plain_checkpointing(variant, plain, keep):
    trace = []
    offloader = ActivationOffloader(torch.device("cpu"), trace=trace)
    memory = MemoryArgs(gradient_checkpointing=True, gradient_checkpointing_cpu_offload=True, **keep)
    setup, model, loss, grads, calls = _step(variant, memory, offloader)
    assert setup.activation_offload and setup.keep_attention and model.block_runner.offloader is offloader
    kept = setup.keep_attention_blocks
    assert kept == (LAYERS if "gradient_checkpointing_keep_attention" in keep else 2)
    assert "keeping self-attention" in setup.summary() and "activations offloaded" in setup.summary()
    _, _, plain_loss, plain_grads, plain_calls = plain
    assert calls == plain_calls - kept  # the kept blocks' self-attention is not run again
    assert ((loss - plain_loss).abs() / plain_loss.abs()).item() <= 1e-5
    for a, b in zip(grads, plain_grads):
        assert ((a - b).norm() / b.norm().clamp_min(1e-30)).item() <= 1e-5
    # every block input but the last one's went to the host; block 2's copy back started when the last block's
    # backward pass began, and each later one when the block after it took its input
    assert offloader.offloaded == LAYERS - 1
    assert trace == [("offload", 0), ("offload", 1), ("offload", 2),
                     ("fetch", 2), ("fetch", 1), ("use", 2), ("fetch", 0), ("use", 1), ("use", 0)]


def test_runner_without_a_block_count_offloads_every_input(variant):
    model = tiny_model(variant)
    model.enable_gradient_checkpointing(True, keep_attention=True)
    with_lora(model)
    offloader = ActivationOffloader(torch.device("cpu"))
    model.block_runner = BlockRunner(None, offloader)
    model(*tiny_inputs(variant)).square().mean().backward()
    assert offloader.offloaded == LAYERS

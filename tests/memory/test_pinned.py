"""Exact-size pinned host memory (issue 17, lever 7): one arena for the swapped blocks, pooled buffers for
offloaded activations, and the activation reloads prefetched one block ahead. A recording pinner stands in
for cudaHostRegister, so the bookkeeping runs on the CPU."""

from __future__ import annotations

import pytest
import torch

from library.runtime.block_swap import BlockSwapper, HostTransport
from library.runtime.memory import ActivationOffloader, BlockRunner
from library.runtime.pinned import HostBufferPool, PinnedArena, pinned_bytes
from library.training.estimate import meta_model
from library.wan.pinning import PAGE, pinned_buffer
from library.wan.variants import get_variant
from tests.memory.conftest import deep_tiny, tiny_inputs, tiny_model
from tests.memory.test_block_swap import step, with_lora

GIB = 2**30


class RecordingPinner:
    def __init__(self):
        self.registered, self.unregistered = [], []

    def register(self, tensor):
        self.registered.append(tensor.numel() * tensor.element_size())

    def unregister(self, data_ptr):
        self.unregistered.append(data_ptr)


def _fp8_block_tensors(block):
    """The tensors of one block as fp8 block swap holds them: Linear weights in float8 with an fp32 scale
    per output row, biases bf16, norms and modulation fp32."""
    out = []
    for name, p in block.named_parameters():
        if name.endswith("weight") and p.dim() == 2:
            out += [torch.empty(p.shape, dtype=torch.float8_e4m3fn, device="meta"),
                    torch.empty(p.shape[0], dtype=torch.float32, device="meta")]
        else:
            out.append(torch.empty(p.shape, dtype=p.dtype, device="meta"))
    return out


def test_the_issue_figures_for_34_swapped_fp8_a14b_blocks():
    """Pinned one tensor at a time, torch's host allocator rounds each to a power of two: 17.0 GiB for
    34 blocks; the arena takes the exact 11.1 GiB. One 640 MiB activation buffer would take 1 GiB."""
    block = meta_model(get_variant("t2v-A14B")).blocks[0]
    tensors = _fp8_block_tensors(block) * 34
    assert round(pinned_bytes(tensors, rounded=True) / GIB, 1) == 17.0
    assert round(pinned_bytes(tensors, rounded=False) / GIB, 1) == 11.1
    activation = torch.empty(1, 32760, 5120, device="meta")  # a checkpointed block input, fp32
    assert pinned_bytes([activation], rounded=True) == GIB and pinned_bytes([activation], rounded=False) < 0.63 * GIB


def test_swapped_blocks_live_in_one_exact_arena_and_train_alike():
    variant = deep_tiny(6)
    reference = tiny_model(variant)
    reference.enable_gradient_checkpointing(True)
    expected = step(reference, with_lora(reference), variant)

    model = tiny_model(variant)
    model.enable_gradient_checkpointing(True)
    items = [t for i in (3, 4, 5) for t in model.blocks[i].state_dict().values()]
    pinner = RecordingPinner()
    swapper = BlockSwapper(model.blocks, 3, HostTransport(), pin_memory=True, pinner=pinner)
    pages = -(-swapper.arena.nbytes // PAGE) * PAGE  # registered in whole pages of the arena's own
    assert swapper.arena.nbytes == pinned_bytes(items, rounded=False) and pinner.registered == [pages]
    arena = swapper.arena.buffer.untyped_storage().data_ptr()
    assert {s.host.untyped_storage().data_ptr() for i in (3, 4, 5) for s in swapper._slots[i]} == {arena}
    model.block_runner = BlockRunner(swapper)
    out, grads = step(model, with_lora(model), variant)
    assert torch.equal(out, expected[0])
    assert all(torch.equal(grads[k][j], expected[1][k][j]) for k in grads for j in (0, 1))


def test_an_arena_refuses_more_than_it_holds():
    arena = PinnedArena(1024)
    arena.take((100,), torch.float32)  # 400 bytes, aligned to 512
    with pytest.raises(RuntimeError, match="full"):
        arena.take((200,), torch.float32)


def test_the_buffer_pool_reuses_the_smallest_buffer_that_fits():
    pinner = RecordingPinner()
    pool = HostBufferPool(pinner)
    big, small = pool.get(4096), pool.get(1024)
    pool.put(big)
    pool.put(small)
    assert pool.get(1000) is small and pool.get(2000) is big
    assert pool.get(100).numel() == 100 and pinner.registered == [PAGE] * 3 and pool.registered == 5220
    view = HostBufferPool.view(big, (4, 8), torch.float32)
    assert view.shape == (4, 8) and view.untyped_storage().data_ptr() == big.untyped_storage().data_ptr()


def test_activation_reloads_are_prefetched_one_block_ahead():
    """Backward brings block i's input back and, before block i runs, starts block i-1's copy."""
    variant = deep_tiny(4)
    model = tiny_model(variant)
    model.enable_gradient_checkpointing(True)
    net = with_lora(model)
    trace = []
    offloader = ActivationOffloader(torch.device("cpu"), trace=trace)
    model.block_runner = BlockRunner(None, offloader)
    model(*tiny_inputs(variant)).square().mean().backward()
    assert trace == [("offload", 0), ("offload", 1), ("offload", 2), ("offload", 3),
                     ("fetch", 3), ("fetch", 2), ("use", 3), ("fetch", 1), ("use", 2), ("fetch", 0), ("use", 1),
                     ("use", 0)]
    assert all(lo.lora_up.weight.grad is not None for lo in net.loras)


def test_registered_pages_belong_to_one_buffer_alone():
    """The driver page-locks whole pages and refuses a page already registered: every buffer registers
    page-aligned whole pages inside its own allocation, so small buffers next to each other on the heap never
    share one (4 KiB staging buffers of a tiny model, 64-byte ones here)."""
    pinner = RecordingPinner()
    regions = []
    pinner.register = lambda t: regions.append((t.data_ptr(), t.numel()))
    buffers = [pinned_buffer(n, pinner) for n in (64, 64, 100, PAGE, PAGE + 1, 3 << 20)]
    assert [b.numel() for b in buffers] == [64, 64, 100, PAGE, PAGE + 1, 3 << 20]
    for buffer, (start, size) in zip(buffers, regions):
        assert start % PAGE == 0 and size % PAGE == 0 and buffer.data_ptr() == start and buffer.numel() <= size
        base = buffer.untyped_storage()
        assert base.data_ptr() <= start and start + size <= base.data_ptr() + base.nbytes()
    spans = sorted(regions)
    assert all(a + n <= b for (a, n), (b, _) in zip(spans, spans[1:]))  # no page registered twice

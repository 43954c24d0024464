"""Selective checkpointing (issue 17, lever 4): with `keep_attention` the self-attention kernel's outputs are
kept and not recomputed in the backward pass; loss and gradients are those of plain checkpointing, bit for
bit, for SDPA and for the flash-attn stand-ins, eager and compiled."""

from __future__ import annotations

import contextlib

import pytest
import torch
import torch._dynamo
from torch.utils._python_dispatch import TorchDispatchMode

from library.wan.model import WanModel
from library.wan.variants import get_variant
from tests.helpers import random_official_dit_state
from tests.wan.test_attention import standins  # noqa: F401 - the fixture


class AttentionCalls(TorchDispatchMode):
    """Counts the attention forward kernels that run (SDPA's CPU kernel, the stand-ins' custom ops)."""

    def __init__(self):
        super().__init__()
        self.forward = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func)
        if ("attention" in name or "attn" in name) and "backward" not in name:
            self.forward += 1
        return func(*args, **(kwargs or {}))


def _step(keep: bool, backend: str = "sdpa", compiled: bool = False):
    variant = get_variant("t2v-tiny")
    model = WanModel(variant)
    model.load_state_dict(random_official_dit_state(variant, 1))
    model.set_attention_backend(backend)
    model.enable_gradient_checkpointing(True, keep_attention=keep)
    if compiled:
        for block in model.blocks:
            block.compile(backend="aot_eager")
    torch.manual_seed(0)
    x, context = torch.randn(1, 16, 3, 4, 6), [torch.randn(5, variant.text_dim)]
    calls = AttentionCalls()
    with calls if not compiled else contextlib.nullcontext():  # Dynamo does not trace under a dispatch mode
        loss = model(x, torch.tensor([400.0]), context).square().mean()
        loss.backward()
    return loss.detach(), [p.grad.clone() for p in model.parameters()], calls.forward


@pytest.mark.parametrize("backend", ["sdpa", "flash_attn", "flash3"])
def test_keeping_attention_skips_its_recomputation_and_changes_nothing(standins, backend):
    plain_loss, plain_grads, plain_calls = _step(False, backend)
    loss, grads, calls = _step(True, backend)
    blocks = 2
    assert plain_calls == 4 * blocks  # self + cross per block, forward and recomputation
    assert calls == 3 * blocks  # the self-attention of each block is not recomputed
    assert torch.equal(loss, plain_loss) and all(torch.equal(a, b) for a, b in zip(grads, plain_grads))


def test_keeping_attention_works_in_compiled_blocks(standins):
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    plain_loss, plain_grads, _ = _step(False)
    loss, grads, _ = _step(True, compiled=True)
    assert counters["stats"]["unique_graphs"] >= 1 and sum(counters["graph_break"].values()) == 0
    torch._dynamo.reset()
    assert torch.allclose(loss, plain_loss, rtol=1e-6)
    assert max(((a - b).abs().max() / b.abs().max().clamp_min(1e-12)).item() for a, b in zip(grads, plain_grads)
               if b.abs().max() > 0) <= 1e-5


def test_keep_attention_needs_checkpointing():
    model = WanModel(get_variant("t2v-tiny"))
    model.enable_gradient_checkpointing(False, keep_attention=True)
    assert not model.checkpoint_keep_attention

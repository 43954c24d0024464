"""`gradient_checkpointing_offload_attention` (issue 17): with activation offload and kept attention, each
offloaded block input takes its block's kept self-attention outputs to the host and brings them back with it.
A LoRA step equals keeping them on the device bit for bit (fp32 and bf16; SDPA, the flash-attn stand-ins and the
opaque op; every block kept or the last K; 0 or 1 skipped blocks; eager and compiled), runs the attention forward
no more often, and the offloader's trace and the stores' bookkeeping show where each block's outputs went (the
CPU stand-in offloader keeps clones); the config key reaches `apply_memory_features`; a CUDA run with the real
offloader."""

from __future__ import annotations

import contextlib
import gc

import pytest
import torch

from library.config import config_from_dict, validate
from library.config.schema import MemoryArgs
from library.runtime.block_swap import HostTransport
from library.runtime.kept_attention import KeptAttention
from library.runtime.memory import ActivationOffloader, apply_memory_features
from tests.memory.conftest import deep_tiny, tiny_inputs, tiny_model
from tests.memory.test_block_swap import with_lora
from tests.wan.test_attention import standins  # noqa: F401 - the fixture
from tests.wan.test_selective_checkpointing import AttentionCalls

LAYERS = 4
VALID = {"dit": "low.safetensors", "dataset_config": "data.toml", "task": "t2v-A14B"}
KEEP_ALL = {"gradient_checkpointing_keep_attention": True}


def _memory(offload_attention: bool, **extra) -> MemoryArgs:
    return MemoryArgs(gradient_checkpointing=True, gradient_checkpointing_cpu_offload=True,
                      gradient_checkpointing_offload_attention=offload_attention, **{**KEEP_ALL, **extra})


def _step(memory: MemoryArgs, layers: int = LAYERS, backend: str = "sdpa", dtype=torch.float32,
          compiled: bool = False, during=None):
    """One LoRA step with the CPU stand-in offloader: (setup, model, offloader trace, loss, LoRA gradients,
    attention forwards run). `during(model, offloader)` runs between the forward and the backward pass."""
    variant = deep_tiny(layers)
    model = tiny_model(variant).to(dtype)
    trace = []
    offloader = ActivationOffloader(torch.device("cpu"), trace=trace)
    setup = apply_memory_features(model, memory, "cpu", offloader=offloader)
    model.set_attention_backend(backend)
    net = with_lora(model).to(dtype)
    if compiled:
        for block in model.blocks:
            block.compile(backend="aot_eager")
    calls = AttentionCalls()
    with calls if not compiled else contextlib.nullcontext():  # Dynamo does not trace under a counting mode
        loss = model(*tiny_inputs(variant)).square().mean()
        if during is not None:
            during(model, offloader)
        loss.backward()
    grads = [p.grad.clone() for p in net.parameters()]
    assert any(g.abs().max() > 0 for g in grads)
    return setup, model, trace, loss.detach(), grads, calls.forward


@pytest.fixture(scope="module")
def on_device():
    """Keeping the attention on the device: fp32, SDPA, every block, eager (LAYERS blocks and 2)."""
    return {LAYERS: _step(_memory(False)), 2: _step(_memory(False), layers=2)}


def _equal(a, b) -> None:
    assert torch.equal(a[3], b[3]) and all(torch.equal(x, y) for x, y in zip(a[4], b[4]))


@pytest.mark.parametrize("skip", [0, 1])
@pytest.mark.parametrize("keep", [KEEP_ALL, {"gradient_checkpointing_keep_attention_blocks": 2}],
                         ids=["all", "two"])
def test_offloaded_attention_equals_keeping_it_on_the_device(on_device, keep, skip):
    extra = {"gradient_checkpointing_keep_attention": False, **keep, "gradient_checkpointing_skip_blocks": skip}
    device = on_device[LAYERS] if keep == KEEP_ALL and not skip else _step(_memory(False, **extra))
    setup, model, trace, *_, calls = result = _step(_memory(True, **extra))
    _equal(result, device)
    assert calls == device[5]  # the kept self-attention is not run again
    assert setup.attention_offload and "kept self-attention outputs too" in setup.summary()
    assert isinstance(model.keep_attention_context_fn, KeptAttention)
    # the offloaded inputs and, after each input of a block keeping its attention, its output and log-sum-exp
    checkpointed = LAYERS - skip
    kept = range(checkpointed - setup.keep_attention_blocks, checkpointed - 1)  # the last one's stay
    n, inputs, riders = 0, [], {}
    for block in range(checkpointed - 1):
        inputs.append(n)
        riders[n] = [n + 1, n + 2] if block in kept else []
        n += 1 + len(riders[n])
    assert [e for e in trace if e[0] == "offload"] == [("offload", i) for i in range(n)]
    assert [e for e in device[2] if e[0] == "offload"] == [("offload", i) for i in range(len(inputs))]
    # backward: each input comes back with its riders, the one before starts when it is used, then its riders
    expected = [("fetch", m) for m in [inputs[-1], *riders[inputs[-1]]]]
    for j in reversed(range(len(inputs))):
        if j:
            expected += [("fetch", m) for m in [inputs[j - 1], *riders[inputs[j - 1]]]]
        expected += [("use", m) for m in [inputs[j], *riders[inputs[j]]]]
    assert trace[n:] == expected


@pytest.mark.parametrize("backend", ["flash_attn", "flash3"])
def test_attention_stand_ins(standins, backend):
    device = _step(_memory(False), backend=backend)
    result = _step(_memory(True), backend=backend)
    _equal(result, device)
    assert result[5] == device[5] == 3 * LAYERS  # self + cross forward, cross again in each recomputation
    assert len([e for e in result[2] if e[0] == "offload"]) == (LAYERS - 1) * 3  # input, output, log-sum-exp


def test_bf16():
    device = _step(_memory(False), dtype=torch.bfloat16)
    result = _step(_memory(True), dtype=torch.bfloat16)
    assert result[3].dtype == torch.float32 and result[4][0].dtype == torch.bfloat16
    _equal(result, device)


def test_device_references_are_dropped_after_the_forward_pass():
    seen = {}

    def during(model, offloader):
        gc.collect()
        stores = list(model.keep_attention_context_fn.stores)
        seen["counts"] = sorted(store.counts() for store in stores)
        seen["riders"] = [len(ref().riders) for ref in offloader._waiting]

    _step(_memory(True), during=during)
    # one store per checkpointed block: the last block's outputs on the device, the others' as host copies only
    assert seen["counts"] == [(0, 2)] * (LAYERS - 1) + [(2, 0)]
    assert seen["riders"] == [2] * (LAYERS - 1)


@pytest.mark.parametrize("backend", ["sdpa", "xformers"])
def test_compiled_blocks(standins, on_device, backend):
    """Compiled, xformers runs as this package's opaque op, which returns the attention output only."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    eager = on_device[2]
    result = _step(_memory(True), layers=2, backend=backend, compiled=True)
    assert counters["stats"]["unique_graphs"] >= 1 and sum(counters["graph_break"].values()) == 0
    torch._dynamo.reset()
    sent = 2 if backend == "xformers" else 3  # block 0's input and attention outputs; block 1 keeps its own
    assert [e for e in result[2] if e[0] == "offload"] == [("offload", n) for n in range(sent)]
    if backend == "xformers":  # a block: self and cross forward, cross recomputed, both again in their backward
        assert standins["xformers"] == 2 * 5
    assert torch.allclose(result[3], eager[3], rtol=1e-6)
    assert max(((a - b).abs().max() / b.abs().max().clamp_min(1e-12)).item() for a, b in zip(result[4], eager[4])
               if b.abs().max() > 0) <= 1e-5


def test_the_config_key_reaches_the_model():
    cfg = validate(config_from_dict({**VALID, "gradient_checkpointing": True,
                                     "gradient_checkpointing_cpu_offload": True,
                                     "gradient_checkpointing_keep_attention_blocks": 3,
                                     "gradient_checkpointing_offload_attention": True}))
    assert cfg.memory.gradient_checkpointing_offload_attention
    model = tiny_model(deep_tiny(LAYERS))
    setup = apply_memory_features(model, cfg.memory, "cpu", offloader=ActivationOffloader(torch.device("cpu")))
    assert setup.attention_offload and setup.keep_attention_blocks == 3
    assert "(activations offloaded, kept self-attention outputs too)" in setup.summary()
    assert model.keep_attention_context_fn.offloader is model.block_runner.offloader
    setup = apply_memory_features(model, _memory(False), "cpu", offloader=ActivationOffloader(torch.device("cpu")))
    assert not setup.attention_offload and model.keep_attention_context_fn is None  # torch's contexts, as before
    assert setup.summary().endswith("(activations offloaded); no block swap")
    # on a CPU without a stand-in offloader, offload and the key are ignored with a note
    setup = apply_memory_features(model, cfg.memory, "cpu")
    assert not setup.activation_offload and not setup.attention_offload and model.keep_attention_context_fn is None
    assert any("gradient_checkpointing_offload_attention" in note for note in setup.notes)
    # without activation offload there is nothing to ride with
    memory = MemoryArgs(gradient_checkpointing=True, gradient_checkpointing_keep_attention=True,
                        gradient_checkpointing_offload_attention=True)
    setup = apply_memory_features(model, memory, "cpu")
    assert not setup.attention_offload and any("is ignored" in note for note in setup.notes)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_step_equals_keeping_attention_on_the_gpu():
    """The real offloader (side stream, pinned buffers, events): the same step, less GPU memory held after the
    forward pass by about the kept outputs of every checkpointed block but the last."""
    variant = deep_tiny(LAYERS)

    def run(offload_attention: bool):
        model = tiny_model(variant)
        setup = apply_memory_features(model, _memory(offload_attention), "cuda")
        net = with_lora(model)
        net.to("cuda")
        x, t, ctx = tiny_inputs(variant)
        x = torch.nn.functional.interpolate(x, size=(3, 32, 32))  # 768 tokens: outputs well over allocator rounding
        gc.collect()
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        loss = model(x.cuda(), t.cuda(), [c.cuda() for c in ctx]).square().mean()
        torch.cuda.synchronize()
        torch.empty(1, device="cuda")  # the allocator has seen the side stream's copies end
        held = torch.cuda.memory_allocated() - before
        loss.backward()
        torch.cuda.synchronize()
        return setup, model, loss.item(), [p.grad.cpu() for p in net.parameters()], held

    _, _, device_loss, device_grads, device_held = run(False)
    setup, model, loss, grads, held = run(True)
    # each of the first LAYERS - 1 blocks sent its input, attention output and log-sum-exp (SDPA's fused kernels
    # return those two large tensors besides small RNG state)
    assert setup.attention_offload and model.block_runner.offloader.offloaded == 3 * (LAYERS - 1)
    assert loss == pytest.approx(device_loss, rel=1e-5)
    for a, b in zip(grads, device_grads):
        assert ((a - b).norm() / b.norm().clamp_min(1e-30)).item() <= 1e-5
    tokens, v = 3 * 16 * 16, variant
    kept = (LAYERS - 1) * tokens * (v.dim * 4 + v.num_heads * 4)  # fp32 output and log-sum-exp
    assert device_held - held >= kept // 2


def test_with_block_swap_as_the_24_gb_plans_run_it():
    """The 24 GB plans swap the last blocks, offload the inputs and keep every block's attention on the host:
    with swapped blocks the kept outputs still ride with their inputs, and the step is the on-device one."""
    def step(offload_attention: bool):
        variant = deep_tiny(6)
        model = tiny_model(variant)
        trace = []
        memory = _memory(offload_attention, blocks_to_swap=3)
        setup = apply_memory_features(model, memory, "cpu", transport=HostTransport(),
                                      offloader=ActivationOffloader(torch.device("cpu"), trace=trace))
        net = with_lora(model)
        loss = model(*tiny_inputs(variant)).square().mean()
        loss.backward()
        return setup, trace, loss.detach(), [p.grad.clone() for p in net.parameters()]

    kept, sent = step(False), step(True)
    assert sent[0].blocks_to_swap == 3 and sent[0].attention_offload and not kept[0].attention_offload
    assert torch.equal(kept[2], sent[2]) and all(torch.equal(a, b) for a, b in zip(kept[3], sent[3]))
    assert len(sent[1]) == 3 * len(kept[1])  # each offloaded input takes its attention output and log-sum-exp

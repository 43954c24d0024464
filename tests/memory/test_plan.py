"""The memory planner: parameter counts against the model, sensible and monotone choices, the activation
coefficients re-measured on a scaled-down block, the table and the CLI; for full fine-tuning, the weight,
gradient and optimizer-state bytes against a hand count and against real optimizer steps on the tiny model."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
import weakref

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from library.config.schema import FineTuneArgs, MemoryArgs
from library.training.planning.lora import (ACT_PER_C, ACT_PER_F, ACT_PER_RANK, GIB, Settings, Workload,
                                          block_linear_params, block_other_params, estimate, lora_params,
                                          outer_params, plan_memory)
from library.training.planning.full import (ACT_FULL_PER_C, ACT_FULL_PER_F, FullSettings, FullWorkload,
                                               estimate_full, full_candidates, plan_full, state_bytes)
from library.wan.model import WanModel, rope_tables
from library.wan.variants import get_variant
from tests.helpers import REPO, tool
from tests.training.test_trainer import workspace  # noqa: F401 - the trainer tests' tiny models and dataset

VARIANTS = ("t2v-A14B", "i2v-A14B", "ti2v-5B", "t2v-1.3B", "i2v-14B", "t2v-tiny", "i2v-tiny-2.1", "t2v-1.3B-FC",
            "i2v-A14B-FC", "flf2v-14B", "flf2v-tiny")


@pytest.mark.parametrize("name", VARIANTS)
def test_parameter_counts_match_the_model(name):
    from networks.lora_wan import create_network

    v = get_variant(name)
    with torch.device("meta"):
        model = WanModel(v)
    bf16, fp32 = outer_params(v)
    biases, block_fp32 = block_other_params(v)
    assert sum(p.numel() for p in model.parameters()) == bf16 + fp32 + v.num_layers * (
        block_linear_params(v) + biases + block_fp32)
    kept_fp32 = sum(p.numel() for n, p in model.named_parameters() if model.is_fp32_param(n))
    assert kept_fp32 == fp32 + v.num_layers * block_fp32
    if v.dim <= 64:  # LoRA parameters, on the tiny models (a LoRA over a meta model is not built)
        real = WanModel(v)
        net = create_network(1.0, 4, 4, None, None, real)
        assert sum(p.numel() for p in net.parameters() if p.requires_grad) == lora_params(v, 4)


def test_tokens_match_the_reference_figures():
    assert Workload(get_variant("t2v-A14B"), 832, 480, 81).tokens == 32760
    assert Workload(get_variant("t2v-A14B"), 1280, 720, 81).tokens == 75600
    assert Workload(get_variant("ti2v-5B"), 1280, 704, 121).tokens == 27280


def test_choices_for_24_40_80_gib():
    a14b = {vram: plan_memory(vram, "t2v-A14B", 832, 480, 81) for vram in (24, 40, 80)}
    s80 = a14b[80].rung  # H100: no fp8, no swap; every block's self-attention kept, the block inputs offloaded
    assert s80 == Settings(checkpointing=True, offload_activations=True, keep_attention=True) and a14b[80].fits
    # and the last 3 blocks not checkpointed (the skip stage; attention the GPU keeps is not moved to the host to
    # skip more)
    assert a14b[80].settings == dataclasses.replace(s80, skip_blocks=3)
    on_host = Settings(checkpointing=True, offload_activations=True, keep_attention=True, offload_attention=True)
    assert a14b[40].rung == dataclasses.replace(on_host, fp8=True) and a14b[40].fits
    assert a14b[40].settings.skip_blocks == 1  # the last block's checkpointing saves nothing at the peak
    s24 = a14b[24].settings  # the 24 GB card: everything on, most blocks swapped (an estimate until measured)
    assert s24.fp8 and s24.offload_activations and 30 <= s24.blocks_to_swap < 40 and a14b[24].fits
    assert s24.attention_on_host  # every block's attention kept, on the host
    ti2v = {vram: plan_memory(vram, "ti2v-5B", 1280, 704, 121) for vram in (24, 40, 80)}
    assert ti2v[24].rung == on_host  # 24 GB: offload, every block's attention kept on the host
    assert ti2v[24].fits and ti2v[24].settings == dataclasses.replace(on_host, skip_blocks=1)
    assert ti2v[40].rung == ti2v[80].rung == Settings(checkpointing=True, keep_attention=True)
    # with the block inputs offloaded (which hides behind the compute) more blocks skip checkpointing
    assert ti2v[40].settings == Settings(checkpointing=True, offload_activations=True, keep_attention=True,
                                         skip_blocks=3)
    assert ti2v[80].settings.skip_blocks == 11
    small = plan_memory(24, "t2v-A14B", 832, 480, 33)
    assert small.fits and small.settings.fp8 and small.settings.blocks_to_swap < 39


@pytest.mark.parametrize("task,size,experts", [("t2v-A14B", (832, 480, 81), 1), ("t2v-A14B", (832, 480, 81), 2),
                                               ("ti2v-5B", (1280, 704, 121), 1), ("t2v-1.3B", (832, 480, 81), 1)])
def test_more_memory_never_adds_features(task, size, experts):
    previous = None
    for vram in range(8, 200, 4):
        plan = plan_memory(vram, task, *size, experts=experts)
        order = [s for s, _ in plan.candidates]
        rung = plan.rung  # the skip stage may add offload on top, where that lets more blocks skip checkpointing
        rank = (rung.fp8, rung.offload_activations, rung.blocks_to_swap,
                rung.checkpointing, rung.checkpointing and not rung.keep_attention,
                (rung.checkpointing and not rung.keep_attention)
                * (plan.workload.variant.num_layers - rung.keep_attention_blocks))
        if plan.fits:
            assert plan.estimate.total <= plan.budget_gb
        if previous is not None:
            assert all(b <= a for a, b in zip(previous[0], rank)), (vram, plan.settings)
            if previous[2] == rung:  # the same rung: never fewer blocks without checkpointing
                assert plan.settings.skip_blocks >= previous[1], (vram, plan.settings)
        previous = rank, plan.settings.skip_blocks, rung
        assert order[-1] == plan.settings


def test_estimates_fall_with_each_feature():
    w = Workload(get_variant("t2v-A14B"), 832, 480, 81)
    totals = [estimate(w, s).total for s in (Settings(), Settings(checkpointing=True),
                                             Settings(checkpointing=True, offload_activations=True),
                                             Settings(True, True, True), Settings(True, True, True, 20))]
    assert totals == sorted(totals, reverse=True)
    fp8 = estimate(w, Settings(True, True, True))
    assert 13 < fp8.weights < 15  # ~14.3 G params, block Linears in 1 byte, time MLPs in fp32


def test_plan_applies_to_memory_args():
    plan = plan_memory(24, "t2v-A14B", 832, 480, 61)
    memory = plan.apply(MemoryArgs(fp8_t5=True))
    assert memory.fp8_base and memory.fp8_scaled and memory.gradient_checkpointing and memory.fp8_t5
    assert memory.blocks_to_swap == plan.settings.blocks_to_swap > 0 and memory.use_pinned_memory_for_block_swap


def _saved_bytes(c: int, f: int, tokens: int, rank: int = 4) -> int:
    """Bytes one block saves for backward (parameters excluded), bf16 compute with a LoRA attached."""
    from networks.lora_wan import create_network

    v = dataclasses.replace(get_variant("t2v-tiny"), dim=c, ffn_dim=f, num_heads=4, num_layers=1, name="probe")
    torch.manual_seed(0)
    model = WanModel(v).requires_grad_(False).to(torch.bfloat16)
    net = create_network(1.0, rank, rank, None, None, model)
    net.apply_to()
    params = {p.data_ptr() for p in list(model.parameters()) + list(net.parameters())}
    storages = {}

    def pack(t):
        if t.data_ptr() not in params:
            storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    x = torch.randn(1, tokens, c, requires_grad=True)
    e0, ctx = torch.randn(1, 1, 6, c), torch.randn(1, 512, c, dtype=torch.bfloat16)
    rope = rope_tables((tokens // 64, 8, 8), c // 4, "cpu")
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model.blocks[0](x, e0, ctx, rope, "sdpa", False, torch.bfloat16)
    return sum(storages.values())


def test_activation_coefficients_match_a_measured_block():
    """Per-token saved bytes of a block (the difference between two sequence lengths removes the text
    context's share) against the planner's ACT_PER_C * C + ACT_PER_F * F + ACT_PER_RANK * rank."""
    for c, f in ((128, 256), (256, 256), (128, 512)):
        measured = (_saved_bytes(c, f, 1024) - _saved_bytes(c, f, 512)) / 512
        predicted = ACT_PER_C * c + ACT_PER_F * f + ACT_PER_RANK * 4
        assert abs(measured - predicted) / predicted < 0.06, (c, f, measured, predicted)


def test_cli_prints_the_table_and_reads_a_config(tmp_path):
    cfg = tmp_path / "lora.toml"
    cfg.write_text('task = "ti2v-5B"\nnetwork_dim = 16\noptimizer_type = "AdamW8bit"\n')
    cli = tool("plan_memory")
    run = subprocess.run([sys.executable, str(REPO / "tools" / "plan_memory.py"), "--config_file", str(cfg),
                          "--vram_gb", "24", "--width", "1280", "--height", "704", "--frames", "121"],
                         capture_output=True, text=True, cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    assert "ti2v-5B x1 expert(s), 1280x704x121" in run.stdout and "LoRA rank 16, AdamW8bit" in run.stdout
    assert "-> " in run.stdout and "plan: " in run.stdout
    assert cli.main(["--vram_gb", "12", "--task", "t2v-A14B"]) == 1  # does not fit: exit 1
    cfg.write_text('task = "t2v-A14B"\nfp8_base = true\nfp8_scaled = true\nfp8_fast = true\n')  # fp8 plans only
    run = subprocess.run([sys.executable, str(REPO / "tools" / "plan_memory.py"), "--config_file", str(cfg),
                          "--vram_gb", "80"], capture_output=True, text=True, cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    assert "plan: fp8, ckpt keeping attention" in run.stdout


# ---- full fine-tuning ------------------------------------------------------------------------------------


def _counts(name: str) -> tuple[int, int]:
    """(all parameters, those the model keeps in fp32) from the hand-written parameter counts."""
    v = get_variant(name)
    bf16, fp32 = outer_params(v)
    biases, block_fp32 = block_other_params(v)
    return bf16 + fp32 + v.num_layers * (block_linear_params(v) + biases + block_fp32), fp32 + v.num_layers * block_fp32


def _full(name: str, optimizer: str = "AdamW", **over) -> FullWorkload:
    return FullWorkload(get_variant(name), 832, 480, 81, optimizer=optimizer, **over)


@pytest.mark.parametrize("name", ["t2v-tiny", "i2v-tiny-2.1", "t2v-A14B"])
def test_full_state_bytes_match_a_hand_count(name):
    total, fp32 = _counts(name)
    masters = state_bytes(_full(name), FullSettings())
    assert (masters.weights, masters.grads, masters.optimizer) == (4 * total, 4 * total, 8 * total)  # 16 B a weight
    bf16 = state_bytes(_full(name), FullSettings(full_bf16=True))
    held = 2 * (total - fp32) + 4 * fp32  # bf16 weights, and the norms, modulation and time MLPs in fp32
    assert (bf16.weights, bf16.grads, bf16.optimizer) == (held, held, 2 * held)  # AdamW's 2 states in the weight dtype
    eight = state_bytes(_full(name, "AdamW8bit"), FullSettings(full_bf16=True)).optimizer
    assert 2 * total <= eight < 2.05 * total if total > 1e6 else eight <= 8 * total  # tiny: fp32 states under 4096


def test_a14b_expert_with_adamw_needs_more_than_200_gib():
    total, fp32 = _counts("t2v-A14B")
    assert (total, fp32) == (14_288_491_584, 187_320_320)
    # fp32 masters + AdamW: 16 B x 14.29 G = 228.6 GB = 212.9 GiB before a single activation
    assert 16 * total / GIB > 200
    assert all(estimate_full(_full("t2v-A14B"), s).total > 80 for s in full_candidates(1))
    assert not plan_full(80, "t2v-A14B", 832, 480, 81).fits


def test_a14b_expert_fits_80_gib_with_bf16_adafactor_and_the_fused_backward_pass():
    w, s = _full("t2v-A14B", "AdaFactor"), FullSettings(full_bf16=True, checkpointing=True, fused_backward_pass=True)
    sb, e = state_bytes(w, s), estimate_full(w, s)
    # weights: 2 B x 14,101,171,264 + 4 B x 187,320,320 (fp32 kept) = 28,951,623,808 B = 26.96 GiB
    assert sb.weights == 28_951_623_808 and abs(e.weights - 26.96) < 0.01
    # Adafactor: fp32 row + column means of each matrix, full second moments of the vectors: 36 MB
    assert sb.optimizer == 36_350_408
    # one gradient at a time, the largest tensor: time_projection 30720 x 5120 in fp32 = 0.59 GiB
    assert sb.largest_grad == 30720 * 5120 * 4 and e.grads == 0
    # activations at the first block of the backward pass: 40 checkpointed inputs (4 x 5120 B x 32760 tokens,
    # 25.0 GiB) + the recomputed block ((63 x 5120 + 4 x 13824) B x 32760, 11.5 GiB) + RoPE / context 0.7 GiB
    assert abs(e.activations - 37.20) < 0.01
    # + 0.34 GiB of bf16 time-MLP copies + 8.5 GiB workspace (5.3 per-token, 0.25 fixed, the gradient being
    # stepped 0.59, Adafactor's fp32 temporaries 4 x 0.59) = 73.0 GiB < (80 - 0.6) x 0.95 = 75.4 usable
    assert abs(e.total - 73.05) < 0.01 and e.peak == "backward"
    plan = plan_full(80, "t2v-A14B", 832, 480, 81, optimizer="AdaFactor")
    assert plan.fits and plan.rung == FullSettings(full_bf16=True, checkpointing=True)
    # the speed stages: keeping attention does not fit beside every gradient; the last block unchecked does
    assert plan.settings == FullSettings(full_bf16=True, checkpointing=True, skip_blocks=1)


def test_fsdp_divides_weights_gradients_and_optimizer_state():
    s = FullSettings(full_bf16=True, checkpointing=True, fsdp=True)
    one, eight = _full("t2v-A14B"), _full("t2v-A14B", processes=8)
    sb = state_bytes(eight, s)
    e1, e8 = estimate_full(one, s), estimate_full(eight, s)
    assert e8.weights == sb.weights / 8 / GIB and e8.optimizer == sb.optimizer / 8 / GIB
    assert e1.weights == 8 * e8.weights and e1.optimizer == 8 * e8.optimizer
    gathered = (2 * sb.block_weights + sb.outer_weights + sb.block_grads) / GIB  # 2 blocks + the root + 1 block's grads
    assert e8.copies >= gathered and e8.total < e1.total
    offloaded = dataclasses.replace(s, fsdp_cpu_offload=True)
    off, pinned = estimate_full(eight, offloaded), state_bytes(eight, offloaded)
    assert off.weights == off.grads == off.optimizer == 0
    # this process's shards: pinned weights and gradients (powers of two), optimizer state, a per-tensor step
    assert off.host == pytest.approx((pinned.pinned_weights + pinned.pinned_grads + (sb.optimizer + pinned.step) / 8)
                                     / GIB)
    assert 1.5 < pinned.pinned_weights / (sb.weights / 8) < 1.6 and pinned.step < sb.step
    assert off.total < e8.total


def _state_tensor_bytes(optimizer) -> int:
    """Bytes of an optimizer's state tensors (the 0-d step counters, host scalars, left out)."""
    inner = getattr(optimizer, "inner", [optimizer])
    return sum(v.numel() * v.element_size() for opt in inner for st in opt.state.values() for v in st.values()
               if torch.is_tensor(v) and v.dim() > 0)


def _tiny_full_model(variant, full_bf16: bool, patterns: tuple = ()):
    """The tiny DiT set up for full fine-tuning the way the trainer does: loaded in fp32 (masters) or in bf16
    with the fp32 parameters kept, then FullNetwork (trainable masters, frozen weights in bf16)."""
    from library.training.engines.full import FullNetwork
    from library.training.engines.parameters import select_trainable

    v = get_variant(variant) if isinstance(variant, str) else variant
    torch.manual_seed(0)
    model = WanModel(v)
    if full_bf16:
        for n, p in model.named_parameters():
            p.data = p.data.to(torch.float32 if model.is_fp32_param(n) else torch.bfloat16)
    net = FullNetwork(model, select_trainable(model, patterns), None if full_bf16 else torch.float32, torch.bfloat16)
    model.compute_dtype = torch.bfloat16
    return v, model, net


def _loss(model, v):
    from tests.memory.conftest import tiny_inputs

    x, t, ctx = tiny_inputs(v)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x, t, ctx)
    return out.float().square().mean()


@pytest.mark.parametrize("full_bf16,optimizer,patterns", [(False, "AdamW", ()), (True, "AdamW", ()),
                                                          (True, "AdaFactor", ()), (False, "AdaFactor", ()),
                                                          (False, "AdamW", (r"blocks\.1\.", "head"))])
def test_full_state_bytes_equal_a_real_optimizer_step(full_bf16, optimizer, patterns):
    from library.training.optimizers import build_optimizer

    v, model, net = _tiny_full_model("t2v-tiny", full_bf16, patterns)
    opt = build_optimizer(net.get_trainable_params(), optimizer, 1e-3, quiet=True)
    _loss(model, v).backward()
    opt.step()
    sb = state_bytes(FullWorkload(v, 32, 32, 9, optimizer=optimizer, trainable_patterns=patterns),
                     FullSettings(full_bf16=full_bf16))
    assert sum(p.numel() * p.element_size() for p in model.parameters()) == sb.weights
    assert sum(p.grad.numel() * p.grad.element_size() for p in net.get_trainable_params()) == sb.grads
    assert _state_tensor_bytes(opt) == sb.optimizer


def test_fused_backward_pass_holds_one_gradient_at_a_time():
    from library.training.engines.fused import FusedBackwardOptimizer
    from library.training.optimizers import build_optimizer

    v, model, net = _tiny_full_model("t2v-tiny", False)
    live = []

    def make(groups):
        opt = build_optimizer(groups, "AdamW", 1e-3, quiet=True)
        step = opt.step

        def recorded(*args, **kwargs):  # every gradient alive when a tensor is stepped
            live.append(sum(p.grad.numel() * p.grad.element_size() for p in model.parameters() if p.grad is not None))
            return step(*args, **kwargs)

        opt.step = recorded
        return opt

    fused = FusedBackwardOptimizer(net.prepare_optimizer_params(1e-3), make)
    _loss(model, v).backward()
    assert len(live) == len(net.params) and all(p.grad is None for p in net.params)
    sb = state_bytes(FullWorkload(v, 32, 32, 9), FullSettings(fused_backward_pass=True))
    assert max(live) == sb.largest_grad
    assert _state_tensor_bytes(fused) == sb.optimizer


def test_full_state_bytes_equal_the_trainers_after_one_step(workspace, tmp_path):  # noqa: F811
    """The trainer's own model and optimizer after a step: fp32 masters for what trains, the other weights in
    bf16 (the fp32 ones stay fp32)."""
    from library.config import config_from_dict, validate
    from library.training.trainer import Trainer
    from tests.training.test_full_finetune import ft_settings

    patterns = (r"blocks\.0\.", "head", "time_")
    cfg = ft_settings(workspace, tmp_path, max_train_steps=1, mixed_precision="bf16", trainable_patterns=list(patterns))
    trainer = Trainer(validate(config_from_dict(cfg)))
    assert trainer.run() == 0
    model = trainer.experts[0].model
    sb = state_bytes(FullWorkload(model.variant, 32, 32, 9, trainable_patterns=patterns), FullSettings())
    assert sum(p.numel() * p.element_size() for p in model.parameters()) == sb.weights
    assert _state_tensor_bytes(trainer.opt.optimizer) == sb.optimizer


def _saved_full_bytes(c: int, f: int, tokens: int) -> int:
    """Bytes one block saves for backward when its own weights train (fp32 under bf16 autocast, a trainable
    timestep embedding and text embedding upstream), parameters excluded."""
    v = dataclasses.replace(get_variant("t2v-tiny"), dim=c, ffn_dim=f, num_heads=4, num_layers=1, name="probe")
    torch.manual_seed(0)
    model = WanModel(v)
    params = {p.data_ptr() for p in model.parameters()}
    storages = {}

    def pack(t):
        if t.data_ptr() not in params:
            storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    x = torch.randn(1, tokens, c, requires_grad=True)
    e0 = torch.randn(1, 1, 6, c, requires_grad=True)
    ctx = torch.randn(1, 512, c, dtype=torch.bfloat16, requires_grad=True)
    rope = rope_tables((tokens // 64, 8, 8), c // 4, "cpu")
    with torch.autocast("cpu", dtype=torch.bfloat16), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model.blocks[0](x, e0, ctx, rope, "sdpa", False, torch.bfloat16)
    return sum(storages.values())


def test_full_activation_coefficients_match_a_measured_block():
    for c, f in ((128, 256), (256, 256), (128, 512)):
        measured = (_saved_full_bytes(c, f, 1024) - _saved_full_bytes(c, f, 512)) / 512
        predicted = ACT_FULL_PER_C * c + ACT_FULL_PER_F * f
        assert abs(measured - predicted) / predicted < 0.03, (c, f, measured, predicted)


class _LiveBf16(TorchDispatchMode):
    """Tracks the bf16 storages alive: created under this mode and not yet freed."""

    def __init__(self):
        super().__init__()
        self.live = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if torch.is_tensor(t) and t.dtype == torch.bfloat16 and t.untyped_storage().nbytes():
                key = t.untyped_storage().data_ptr()
                if key not in self.live:
                    self.live[key] = t.untyped_storage().nbytes()
                    weakref.finalize(t.untyped_storage(), self.live.pop, key, None)
        return out


def _cached_copies(v) -> int:
    """bf16 bytes alive at the end of a checkpointed fp32-master forward pass with autocast's cache, less
    those alive without it."""
    from tests.memory.conftest import tiny_inputs

    _, model, _ = _tiny_full_model(v, False)
    model.enable_gradient_checkpointing()
    x, t, ctx = tiny_inputs(v)
    alive = {}
    for cache in (True, False):
        with _LiveBf16() as mode, torch.autocast("cpu", dtype=torch.bfloat16, cache_enabled=cache):
            out = model(x, t, ctx)
            alive[cache] = sum(mode.live.values())
        del out
    return alive[True] - alive[False]


def test_autocast_keeps_a_bf16_copy_of_every_trained_weight_through_the_forward_pass():
    """With fp32 masters, autocast's cache (on by default) keeps a bf16 copy of each trainable Linear weight
    and bias of every block until the forward pass ends, checkpointing or not: two more blocks add exactly two
    blocks' `block_cast`, and the whole model's copies stay within `cast`."""
    from tests.memory.conftest import deep_tiny

    two, four = get_variant("t2v-tiny"), deep_tiny(4)
    sb = state_bytes(FullWorkload(two, 32, 32, 9), FullSettings(checkpointing=True))
    assert _cached_copies(four) - _cached_copies(two) == 2 * sb.block_cast > 0
    assert 2 * sb.block_cast < _cached_copies(two) <= sb.cast  # the embeddings' copies: some are saved anyway


@pytest.mark.parametrize("task,processes,optimizer", [("t2v-A14B", 1, "AdamW8bit"), ("t2v-A14B", 8, "AdamW"),
                                                      ("ti2v-5B", 1, "AdamW"), ("t2v-1.3B", 4, "AdamW")])
def test_a_smaller_card_never_gets_an_earlier_full_candidate(task, processes, optimizer):
    ladder = full_candidates(processes)
    previous, stages = -1, (True, 1 << 30)
    for vram in range(400, 8, -8):
        plan = plan_full(vram, task, 832, 480, 81, optimizer=optimizer, processes=processes)
        index = ladder.index(plan.rung)  # the ladder rung under the speed stages
        assert index >= previous, (vram, plan.settings)
        assert plan.candidates[-1][0] == plan.settings and (not plan.fits or plan.estimate.total <= plan.budget_gb)
        # on the same rung a smaller card never keeps more: attention, then skipped blocks
        now = (plan.settings.keep_attention, plan.settings.skip_blocks)
        assert index > previous or now <= stages, (vram, plan.settings)
        previous, stages = index, now
    assert previous > 0  # the ladder was climbed


def test_full_plan_choices_and_hints():
    small = plan_full(80, "t2v-1.3B", 832, 480, 81)  # the rung, then the speed stages the card leaves room for
    assert small.rung == FullSettings(checkpointing=True) and small.settings.keep_attention
    assert small.settings.skip_blocks == 12
    sharded = plan_full(80, "t2v-A14B", 832, 480, 81, processes=8)
    assert sharded.fits and sharded.settings.fsdp and not sharded.settings.fsdp_cpu_offload
    alone = plan_full(80, "t2v-A14B", 832, 480, 81)
    text = alone.table()
    assert not alone.fits and "with AdamW8bit" in text and "with Adafactor" in text and "over 2 GPUs" in text
    memory, finetune = sharded.apply(MemoryArgs(), FineTuneArgs())
    assert memory.gradient_checkpointing and finetune.full_fine_tune and finetune.fsdp
    tiny_card = plan_full(24, "t2v-A14B", 832, 480, 81)
    assert "frames over 8 GPUs" in tiny_card.table()


def test_cli_prints_the_full_fine_tuning_table(tmp_path):
    run = subprocess.run([sys.executable, str(REPO / "tools" / "plan_memory.py"), "--full", "--task", "t2v-A14B",
                          "--optimizer", "AdamW", "--processes", "8", "--vram_gb", "80", "--all_candidates"],
                         capture_output=True, text=True, cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    lines = run.stdout.splitlines()
    assert "full fine-tuning, AdamW, 8 process(es)" in lines[0] and "host RAM" in lines[1]
    assert len(lines) == 2 + len(full_candidates(8)) + 1 and lines[-1].startswith("plan: fp32 masters, ckpt, fsdp")
    cfg = tmp_path / "ft.toml"
    cfg.write_text('task = "t2v-1.3B"\nfull_fine_tune = true\noptimizer_type = "AdaFactor"\n'
                   "trainable_patterns = ['blocks\\.(1[0-9])\\.']\n")
    run = subprocess.run([sys.executable, str(REPO / "tools" / "plan_memory.py"), "--config_file", str(cfg),
                          "--vram_gb", "24"], capture_output=True, text=True, cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    assert "t2v-1.3B x1 expert(s)" in run.stdout and "full fine-tuning, AdaFactor" in run.stdout

"""The memory planner: parameter counts against the model, sensible and monotone choices, the activation
coefficients re-measured on a scaled-down block, the table and the CLI."""

from __future__ import annotations

import dataclasses
import subprocess
import sys

import pytest
import torch

from library.config.schema import MemoryArgs
from library.training.memory_plan import (ACT_PER_C, ACT_PER_F, ACT_PER_RANK, Settings, Workload, block_linear_params,
                                          block_other_params, estimate, lora_params, outer_params, plan_memory)
from library.wan.model import WanModel, rope_tables
from library.wan.variants import get_variant
from tests.helpers import REPO

VARIANTS = ("t2v-A14B", "i2v-A14B", "ti2v-5B", "t2v-1.3B", "i2v-14B", "t2v-tiny", "i2v-tiny-2.1")


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
    assert sum(p.numel() for n, p in model.named_parameters() if model.is_fp32_param(n)) == fp32 + v.num_layers * block_fp32
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
    assert a14b[80].settings == Settings(checkpointing=True) and a14b[80].fits  # H100: no fp8, no swap
    assert a14b[40].settings == Settings(fp8=True, checkpointing=True, offload_activations=True) and a14b[40].fits
    s24 = a14b[24].settings  # the 24 GB card: everything on, most blocks swapped (an estimate until measured)
    assert s24.fp8 and s24.offload_activations and 30 <= s24.blocks_to_swap < 40 and a14b[24].fits
    ti2v = {vram: plan_memory(vram, "ti2v-5B", 1280, 704, 121) for vram in (24, 40, 80)}
    assert ti2v[24].settings == Settings(checkpointing=True, offload_activations=True) and ti2v[24].fits
    assert ti2v[40].settings == ti2v[80].settings == Settings(checkpointing=True)
    small = plan_memory(24, "t2v-A14B", 832, 480, 33)
    assert small.fits and small.settings.fp8 and small.settings.blocks_to_swap < 39


@pytest.mark.parametrize("task,size,experts", [("t2v-A14B", (832, 480, 81), 1), ("t2v-A14B", (832, 480, 81), 2),
                                               ("ti2v-5B", (1280, 704, 121), 1), ("t2v-1.3B", (832, 480, 81), 1)])
def test_more_memory_never_adds_features(task, size, experts):
    previous = None
    for vram in range(8, 200, 4):
        plan = plan_memory(vram, task, *size, experts=experts)
        order = [s for s, _ in plan.candidates]
        rank = (plan.settings.fp8, plan.settings.offload_activations, plan.settings.blocks_to_swap,
                plan.settings.checkpointing)
        if plan.fits:
            assert plan.estimate.total <= plan.budget_gb
        if previous is not None:
            assert all(b <= a for a, b in zip(previous, rank)), (vram, plan.settings)
        previous = rank
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
    sys.path.insert(0, str(REPO / "tools"))
    try:
        import plan_memory as cli
    finally:
        sys.path.remove(str(REPO / "tools"))
    run = subprocess.run([sys.executable, str(REPO / "tools" / "plan_memory.py"), "--config_file", str(cfg),
                          "--vram_gb", "24", "--width", "1280", "--height", "704", "--frames", "121"],
                         capture_output=True, text=True, cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    assert "ti2v-5B x1 expert(s), 1280x704x121" in run.stdout and "LoRA rank 16, AdamW8bit" in run.stdout
    assert "-> " in run.stdout and "plan: " in run.stdout
    assert cli.main(["--vram_gb", "12", "--task", "t2v-A14B"]) == 1  # does not fit: exit 1

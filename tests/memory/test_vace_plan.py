"""The LoRA memory planner counts a VACE model's VACE blocks: parameters, LoRA parameters and the plan."""

from __future__ import annotations

import pytest
import torch

from library.training.planning.lora import (Settings, Workload, block_linear_params, block_other_params, estimate,
                                            lora_params, outer_params, plan_memory, vace_params)
from library.wan.vace import build_dit
from library.wan.variants import get_variant


@pytest.mark.parametrize("name", ["vace-tiny", "vace-1.3B", "vace-14B"])
def test_parameter_counts_match_the_model(name):
    v = get_variant(name)
    with torch.device("meta"):
        model = build_dit(v)
    (bf16, fp32), (biases, block_fp32), (vace_bf16, vace_fp32) = outer_params(v), block_other_params(v), vace_params(v)
    assert sum(p.numel() for p in model.parameters()) == bf16 + fp32 + vace_bf16 + vace_fp32 + v.num_layers * (
        block_linear_params(v) + biases + block_fp32)
    assert sum(p.numel() for n, p in model.named_parameters() if model.is_fp32_param(n)) == \
        fp32 + vace_fp32 + v.num_layers * block_fp32
    if v.dim <= 64:
        from networks.lora_wan import create_network

        net = create_network(1.0, 4, 4, None, None, build_dit(v))
        assert sum(p.numel() for p in net.parameters() if p.requires_grad) == lora_params(v, 4)


def test_vace_costs_more_than_its_base():
    setting = Settings(fp8=True, checkpointing=True, blocks_to_swap=10)
    vace, base = (estimate(Workload(get_variant(n), 832, 480, 81), setting) for n in ("vace-14B", "t2v-14B"))
    assert vace.weights - base.weights == pytest.approx(sum(
        n * b for n, b in zip(vace_params(get_variant("vace-14B")), (2, 4))) / 2**30)  # bf16, resident
    assert vace.activations > base.activations and vace.lora > base.lora
    assert plan_memory(80, "vace-14B", 832, 480, 81).fits

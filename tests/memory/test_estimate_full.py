"""Full fine-tuning and forced SDPA kernels in the step estimate (issue 17: the estimate takes the benchmark's
flags): the traced step computes every weight's gradient, the optimizer step and the fp32 master casts are
added at the memory's rate, and `--sdpa_kernel` costs the kernel it forces."""

from __future__ import annotations

import dataclasses

import pytest

from library.training.benchmark import step_flops
from library.training.estimate import StepSetup, estimate_step, trace_step
from library.training.estimate_full import ParamCounts, cast_bytes, optimizer_bytes
from library.training.planning.full import optimizer_state_bytes
from library.wan.variants import get_variant
from tests.helpers import tool

SMALL = StepSetup(dataclasses.replace(get_variant("t2v-1.3B"), num_layers=2), 256, 256, 17, rank=16,
                  checkpointing=False)


def test_optimizer_and_cast_bytes_per_weight():
    """AdamW with fp32 masters: weight read and written (8), gradient read (4), two fp32 states read and written
    (16): 28 bytes a weight; with bf16 weights and states 14; AdamW8bit's 1-byte states (and a scale per 256)."""
    assert optimizer_bytes("AdamW", 1000, False) == 28_000
    assert optimizer_bytes("AdamW", 1000, True) == 14_000
    assert optimizer_bytes("AdamW8bit", 4096, False) == 12 * 4096 + 2 * optimizer_state_bytes("AdamW8bit", (4096,), 4)
    assert optimizer_bytes("AdamW8bit", 4096, False) < 17 * 4096
    counts = ParamCounts(total=120, matmul=100, block_matmul=(40, 40))
    assert cast_bytes(counts, 2, False) == 6 * (2 * 100 + 80)  # forward, gradient, recomputation of 2 blocks
    assert cast_bytes(counts, 1, False) == 6 * (2 * 100 + 40) and cast_bytes(counts, 2, True) == 0


@pytest.fixture(scope="module")
def traces():
    return trace_step(SMALL), trace_step(dataclasses.replace(SMALL, full=True))


def test_the_full_step_multiplies_for_every_weight_gradient(traces):
    lora, full = traces
    matmuls = [sum(k.flops for k in t if k.kind == "matmul") for t in (lora, full)]
    v, t = SMALL.variant, SMALL.tokens()
    # the benchmark's model FLOPs without attention: 4 (LoRA: the base's forward and input gradient) against 6 a
    # parameter and token; the traced LoRA step also holds the rank-16 LoRA matmuls, the full step the
    # embeddings' and head's gradients
    formula = [step_flops(v, t, full=f) - 12 * t * t * v.dim * v.num_layers - 12 * t * v.text_len * v.dim *
               v.num_layers for f in (False, True)]
    ratio = formula[1] / formula[0]  # 1.53: the text keys and values, 2 against 6, weigh in at 1,280 tokens
    assert 1.5 <= ratio < 1.55 and matmuls[1] / matmuls[0] == pytest.approx(ratio, rel=0.05)
    assert full.params.total > full.params.matmul > sum(full.params.block_matmul) > 0


def test_the_full_estimate_adds_the_optimizer_and_the_casts(traces):
    _, kernels = traces
    setup = dataclasses.replace(SMALL, full=True)
    masters = estimate_step(setup, "h100", kernels=kernels)
    bf16 = estimate_step(dataclasses.replace(setup, full_bf16=True), "h100", kernels=kernels)
    eight = estimate_step(dataclasses.replace(setup, optimizer="AdamW8bit"), "h100", kernels=kernels)
    p = kernels.params
    assert masters.by_kind["optimizer step"] == pytest.approx(28 * p.total / 2.8e12)
    assert masters.by_kind["fp32 master casts"] == pytest.approx(6 * 2 * p.matmul / 2.8e12)  # not checkpointed
    assert "fp32 master casts" not in bf16.by_kind and bf16.by_kind["optimizer step"] == pytest.approx(
        14 * p.total / 2.8e12)
    assert bf16.seconds < eight.seconds < masters.seconds
    flops = step_flops(SMALL.variant, SMALL.tokens(), full=True)
    assert masters.model_tflop == pytest.approx(flops / 1e12)
    assert "full fine-tuning (AdamW, fp32 master weights)" in masters.table()
    assert "full fine-tuning (AdamW, bf16 weights)" in bf16.table()
    for bad in (dict(fp8=True), dict(blocks_to_swap=1, checkpointing=True)):
        with pytest.raises(ValueError, match="full fine-tuning trains the weights themselves"):
            estimate_step(dataclasses.replace(setup, **bad), "h100", kernels=kernels)


def test_a_forced_sdpa_kernel_is_costed_at_its_rate(traces):
    kernels, _ = traces
    cudnn = estimate_step(SMALL, "h100", kernels=kernels, kernel="cudnn")
    fa2 = estimate_step(SMALL, "h100", kernels=kernels, kernel="fa2")
    assert cudnn.seconds < fa2.seconds and "(fa2)" in fa2.attention
    with pytest.raises(ValueError, match="no cudnn attention rate for the RTX 4090"):
        estimate_step(SMALL, "4090", kernels=kernels, kernel="cudnn")


def test_the_command_estimates_full_fine_tuning_and_forced_kernels(capsys):
    benchmark_wan = tool("benchmark_wan")
    small = ["--estimate", "--task", "t2v-tiny", "--width", "64", "--height", "64", "--frames", "5"]
    assert benchmark_wan.main(small + ["--full", "--plan", "--optimizer", "AdamW8bit"]) == 0
    out = capsys.readouterr().out
    assert "-> " in out and "full fine-tuning (AdamW8bit, fp32 master weights)" in out
    assert benchmark_wan.main(small + ["--full", "--full_bf16", "--fused_backward_pass"]) == 0
    out = capsys.readouterr().out
    assert "costed as the plain step" in out and "full fine-tuning (AdamW, bf16 weights)" in out
    assert benchmark_wan.main(small + ["--sdpa_kernel", "flash"]) == 0
    assert "attention sdpa (fa2)" in capsys.readouterr().out
    assert benchmark_wan.main(small + ["--sdpa_kernel", "efficient"]) == 2
    assert "efficient kernel has no rate here" in capsys.readouterr().err
    assert benchmark_wan.main(small + ["--full", "--plan", "--vram_cap_gb", "0.01"]) == 2
    assert "does not fit this card in one process" in capsys.readouterr().err

"""The roofline estimate (`tools/benchmark_wan.py --estimate`): it traces a real step on the meta device,
counts what the step runs, applies each GPU's rates, labels every figure as an estimate, and finishes in
well under a minute on the CPU."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
import time

import pytest
import torch

from library.training.benchmark import step_flops
from library.training.estimate import (GPUS, Kernel, StepSetup, attention_kernel, cost, estimate_step,
                                       trace_step)
from library.wan.variants import get_variant
from tests.helpers import REPO, tool

REDUCED = StepSetup(get_variant("t2v-1.3B"), 256, 256, 17, rank=16)  # 5 x 16 x 16 = 1280 tokens


@pytest.fixture(scope="module")
def kernels():
    return trace_step(REDUCED)


def test_the_trace_counts_every_attention_and_its_flops(kernels):
    v, t = REDUCED.variant, REDUCED.tokens()
    forward = [k for k in kernels if k.kind == "attention"]
    backward = [k for k in kernels if k.kind == "attention_backward"]
    # self- and cross-attention per block, forward twice (checkpointing recomputes it), backward once
    assert len(forward) == 4 * v.num_layers and len(backward) == 2 * v.num_layers
    self_attention = 4 * t * t * v.dim  # QK^T and PV over all heads
    cross_attention = 4 * t * v.text_len * v.dim
    assert sum(k.flops for k in forward) == 2 * v.num_layers * (self_attention + cross_attention)
    assert sum(k.flops for k in backward) == 2.5 * v.num_layers * (self_attention + cross_attention)


def test_traced_matmuls_are_the_block_linears_three_times(kernels):
    """Every block Linear on the video side runs forward, again in the recomputation and for the input
    gradient (3 x 2 N_v T); the cross-attention k / v over the 512 text tokens forward twice; the LoRA
    and the layers outside the blocks add about 2%."""
    from library.training.planning.lora import block_linear_params

    v, t = REDUCED.variant, REDUCED.tokens()
    n_context = 2 * v.dim * v.dim
    n_video = block_linear_params(v) - n_context
    blocks = (3 * 2 * n_video * t + 2 * 2 * n_context * v.text_len) * v.num_layers
    traced = sum(k.flops for k in kernels if k.kind == "matmul")
    assert blocks < traced < 1.05 * blocks


def test_roofline_of_hand_made_kernels():
    gpu = GPUS["h100"]
    mm = Kernel("mm", "matmul", 650e12, [(1, 10), (2, 10)], [(3, 10)], torch.bfloat16)  # 1 s of compute
    scale = Kernel("mul", "other", 0, [(3, 1.4e12)], [(4, 1.4e12)], torch.bfloat16)  # 1 s of traffic
    cast = Kernel("_to_copy", "other", 0, [(4, 1.4e12)], [(5, 1.4e12)], torch.bfloat16)
    use = Kernel("mm", "matmul", 0, [(5, 0)], [(6, 0)], torch.bfloat16)
    eager = cost([mm, scale, cast, use], gpu, "fa2", compiled=False)
    assert [round(c.seconds, 6) for c in eager] == [1.0, 1.0, 1.0, 0.0]
    fused = cost([mm, scale, cast, use], gpu, "fa2", compiled=True)  # buffer 4 never leaves the fused kernel
    assert [round(c.seconds, 6) for c in fused] == [1.0, 1.0, 0.0] and fused[1].name == "fused(_to_copy+mul)"


def test_attention_kernel_follows_the_code_and_the_gpu():
    assert attention_kernel("sdpa", GPUS["h100"]) == "cudnn"  # issue 17: cuDNN first on sm90
    assert attention_kernel("sdpa", GPUS["a100"]) == "fa2"
    assert attention_kernel("flash3", GPUS["h200"]) == "fa3"
    with pytest.raises(ValueError, match="Hopper"):
        attention_kernel("flash3", GPUS["4090"])


@pytest.mark.parametrize("gpu", sorted(GPUS))
def test_every_gpu_gives_a_labelled_estimate(kernels, gpu):
    eager = estimate_step(REDUCED, gpu, kernels=kernels)
    compiled = estimate_step(REDUCED, gpu, compiled=True, kernels=kernels)
    assert 0 < compiled.seconds < eager.seconds and 0 < eager.mfu < compiled.mfu < 1
    assert compiled.memory_bound_tb < eager.memory_bound_tb and compiled.kernels < eager.kernels
    flops = step_flops(REDUCED.variant, REDUCED.tokens())
    assert eager.mfu == pytest.approx(flops / (eager.seconds * GPUS[gpu].peak_tflops * 1e12))
    first, *rest = eager.table().splitlines()
    assert first.startswith("ESTIMATE (roofline on the meta device, not a measurement)")
    assert all("estimated" in line for line in rest if not line.startswith("    "))  # rows under "top kernels
    # by estimated time" are the only unlabelled lines


def test_the_command_runs_in_under_a_minute():
    start = time.perf_counter()
    run = subprocess.run([sys.executable, str(REPO / "tools" / "benchmark_wan.py"), "--estimate", "--gpu", "h200",
                          "--task", "t2v-1.3B", "--width", "256", "--height", "256", "--frames", "17",
                          "--attention", "flash3", "--compile"], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert time.perf_counter() - start < 60
    assert "attention flash3 (fa3), compiled blocks, on a H200 SXM (estimate)" in run.stdout
    for label in ("estimated step time", "estimated MFU", "estimated memory-bound traffic", "top kernels"):
        assert label in run.stdout


def test_keeping_self_attention_removes_its_recomputation():
    setup = StepSetup(get_variant("t2v-1.3B"), 256, 256, 17, rank=16, keep_attention=True)
    kept = trace_step(setup)
    layers = setup.variant.num_layers
    assert sum(k.kind == "attention" for k in kept) == 3 * layers  # self once, cross twice, per block
    plain = estimate_step(REDUCED, "h100", "flash3", compiled=True)
    assert estimate_step(setup, "h100", "flash3", compiled=True, kernels=kept).seconds < plain.seconds


def test_fp8_matmuls_run_at_the_fp8_rate():
    """`fp8_fast`: every block Linear runs as `_scaled_mm` (forward, recomputation, input gradient) at the fp8
    rate; the fp8 weights alone (`fp8`) add dequantisation traffic and keep bf16 matmuls."""
    short = dataclasses.replace(REDUCED, variant=dataclasses.replace(REDUCED.variant, num_layers=3))
    fast, weights = dataclasses.replace(short, fp8_fast=True), dataclasses.replace(short, fp8=True)
    traced = trace_step(fast)
    scaled = [k for k in traced if k.name == "_scaled_mm"]
    assert len(scaled) >= 2 * 8 * fast.variant.num_layers  # forward and recomputation of the 8 video Linears
    bf16 = estimate_step(short, "h100", compiled=True)
    fp8 = estimate_step(fast, "h100", compiled=True, kernels=traced)
    assert "fp8 matmuls" in fp8.by_kind and fp8.by_kind["matmuls"] < bf16.by_kind["matmuls"]
    assert fp8.by_kind["fp8 matmuls"] < bf16.by_kind["matmuls"]
    assert "fp8 weights and matmuls" in fp8.table() and fp8.mfu > bf16.mfu  # MFU against the bf16 peak
    dequant = estimate_step(weights, "h100", kernels=trace_step(weights))
    assert "fp8 matmuls" not in dequant.by_kind
    assert dequant.memory_bound_tb > estimate_step(short, "h100", kernels=trace_step(short)).memory_bound_tb
    with pytest.raises(ValueError, match="no fp8 matmul rate"):
        estimate_step(fast, "a100", kernels=traced)


def test_estimate_with_the_plan_takes_the_auto_memory_settings(capsys):
    benchmark_wan = tool("benchmark_wan")
    args = ["--estimate", "--gpu", "h100", "--task", "t2v-tiny", "--width", "64", "--height", "64", "--frames", "5",
            "--network_dim", "4", "--plan"]
    assert benchmark_wan.main(args) == 0
    out = capsys.readouterr().out
    assert "-> " in out and "checkpointing off" in out and "compiled blocks" in out  # 1280 tokens fit bf16
    # no --attention: training's default, with FlashAttention 3 taken as not installed unless --fa3_installed
    assert "training's default: sdpa (sm90: FlashAttention 3" in out and "attention sdpa (cudnn)" in out
    assert benchmark_wan.main(args + ["--fa3_installed"]) == 0
    out = capsys.readouterr().out
    assert "training's default: flash3 (sm90: FlashAttention 3 is installed)" in out and "flash3 (fa3)" in out
    assert benchmark_wan.main(args + ["--eager", "--fp8_fast"]) == 0
    out = capsys.readouterr().out
    assert "fp8 weights and matmuls" in out and "eager" in out
    assert benchmark_wan.main(["--estimate", "--gpu", "a100", "--fp8_fast", "--task", "t2v-tiny", "--width", "64",
                               "--height", "64", "--frames", "5"]) == 2

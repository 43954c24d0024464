"""The benchmark: its FLOP count against the issue's figures, the random full-size builder on a tiny
variant, and the script's CPU mode end to end (so the GPU benchmark itself stays runnable)."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
import torch

from library.config.schema import MemoryArgs
from library.training.benchmark import BenchConfig, build_random_model, peak_tflops_for, run_benchmark, step_flops
from library.wan.fp8 import FP8Config, FP8Linear
from library.wan.variants import get_variant
from tests.helpers import REPO


def test_step_flops_match_the_issue():
    flops = step_flops(get_variant("t2v-A14B"), 32760)
    assert 4.2e15 < flops < 4.3e15  # 4.25 PFLOP a step (4.5 while cross-attention k / v were counted over T)
    assert 9.4 < flops / (0.45 * 989e12) < 9.6  # 45% MFU on an H100 SXM is about 9.5 s/step
    v = get_variant("t2v-tiny")
    c, layers = v.dim, v.num_layers
    video = 6 * c * c + 2 * c * v.ffn_dim  # q, k, v, o of self-attention, q and o of cross-attention, the FFN
    assert step_flops(v, 48, batch=2) == 2 * (4 * video * layers * 48 + 2 * 2 * c * c * layers * 512
                                              + 12 * 48**2 * c * layers + 12 * 48 * 512 * c * layers)
    i2v = get_variant("i2v-tiny-2.1")  # k_img / v_img see the 257 CLIP tokens, cross-attention 769 keys
    video = 6 * i2v.dim**2 + 2 * i2v.dim * i2v.ffn_dim
    assert step_flops(i2v, 48) == (4 * video * 48 + 2 * 2 * i2v.dim**2 * 769 + 12 * 48**2 * i2v.dim
                                   + 12 * 48 * 769 * i2v.dim) * i2v.num_layers
    assert peak_tflops_for("NVIDIA H100 80GB HBM3") == 989 and peak_tflops_for("NVIDIA H100 PCIe") == 756
    assert peak_tflops_for("NVIDIA H100 NVL") == 835 and peak_tflops_for("NVIDIA H200 NVL") == 835
    assert peak_tflops_for("some new card") is None


def test_random_model_is_built_in_place_with_training_dtypes():
    model = build_random_model(get_variant("t2v-tiny"), "cpu", torch.bfloat16, FP8Config(), seed=0)
    assert not any(p.is_meta for p in model.parameters()) and not any(p.requires_grad for p in model.parameters())
    assert isinstance(model.blocks[1].self_attn.q, FP8Linear) and model.fp8_report.layers == 20
    assert model.time_projection[1].weight.dtype == torch.float32 and model.blocks[0].modulation.dtype == torch.float32
    assert model.text_embedding[0].weight.dtype == torch.bfloat16 and model.compute_dtype == torch.bfloat16


def test_two_experts_alternate_on_cpu():
    cfg = BenchConfig(get_variant("t2v-tiny"), 64, 64, 9, rank=4, steps=2, warmup=1, device="cpu",
                      dtype=torch.float32, memory=MemoryArgs(gradient_checkpointing=True), two_experts=True,
                      peak_tflops=1.0)
    result = run_benchmark(cfg)
    assert len(result.losses) == 3 and all(math.isfinite(x) for x in result.losses)
    assert result.tokens == 48 and result.mfu is not None and result.peak_vram_gib is None
    assert "s/step" in result.table() and result.host_peak_rss_gib > 0


def test_script_cpu_mode_runs(tmp_path):
    out = tmp_path / "result.json"
    run = subprocess.run([sys.executable, str(REPO / "tools" / "benchmark_wan.py"), "--cpu", "--fp8_scaled",
                          "--json", str(out)], capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert run.returncode == 0, run.stderr
    for label in ("s/step", "tokens/s", "peak VRAM", "host RAM", "MFU"):
        assert label in run.stdout
    result = json.loads(out.read_text())
    assert result["device"] == "cpu" and result["tokens"] == 48 and result["seconds_per_step"] > 0
    assert "fp8 (per-tensor scaled)" in result["setup"]


@pytest.mark.gpu
def test_script_runs_a_small_gpu_step(tmp_path):
    run = subprocess.run([sys.executable, str(REPO / "tools" / "benchmark_wan.py"), "--task", "t2v-1.3B",
                          "--width", "256", "--height", "256", "--frames", "17", "--steps", "2", "--warmup", "1",
                          "--blocks_to_swap", "10", "--fp8_scaled", "--gradient_checkpointing_cpu_offload"],
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr
    assert "10 blocks swapped" in run.stdout and "GiB" in run.stdout


def test_full_fine_tuning_mode(tmp_path):
    """Full fine-tuning counts the weight gradients (6 N T) and runs the trainer's own pieces: every weight
    trains, the fused per-tensor optimizer steps, and the planner's estimate is printed beside the peak."""
    v = get_variant("t2v-A14B")
    lora, full = step_flops(v, 32760), step_flops(v, 32760, full=True)
    from library.training.planning.lora import block_linear_params

    n = block_linear_params(v) * v.num_layers  # the weight-gradient matmuls of every block Linear: 2 N T more on
    kv = 2 * v.dim**2 * v.num_layers  # the video side, 4 N_c T_c on the context side (weight + input gradient)
    assert full - lora == 2 * (n - kv) * 32760 + 4 * kv * 512
    out = tmp_path / "result.json"
    run = subprocess.run([sys.executable, str(REPO / "tools" / "benchmark_wan.py"), "--cpu", "--full",
                          "--fused_backward_pass", "--json", str(out)], capture_output=True, text=True, cwd=tmp_path,
                         timeout=300)
    assert run.returncode == 0, run.stderr
    assert "full fine-tuning (AdamW, fp32 masters, fused)" in run.stdout and "planner's peak estimate" in run.stdout
    result = json.loads(out.read_text())
    assert result["planned_gib"] > 0 and len(result["losses"]) == 4
    cfg = BenchConfig(get_variant("t2v-tiny"), 64, 64, 9, steps=2, warmup=1, device="cpu", dtype=torch.float32,
                      full=True, optimizer="AdaFactor")
    first = run_benchmark(cfg)
    assert all(math.isfinite(x) for x in first.losses) and first.losses[0] != first.losses[-1]  # weights moved

"""The estimate beside the measurement (issue 17: "the estimate's error against the measurement is then
recorded"): a measured `tools/benchmark_wan.py --json` result names the estimate of the same step
(`estimate_argv`: shapes, attention, compilation, the memory settings applied), and `tools/estimate_error.py`
costs it on the GPU's rates and prints the error, on the CPU after the GPU run."""

from __future__ import annotations

import json

import pytest

from library.config.schema import MemoryArgs
from library.training.benchmark import BenchConfig
from library.training.estimate_cli import estimate_argv, gpu_key
from library.wan.variants import get_variant
from tests.helpers import tool


@pytest.fixture(scope="module")
def tools():
    benchmark_wan = tool("benchmark_wan")
    estimate_error = tool("estimate_error")
    return benchmark_wan, estimate_error


def test_device_names_map_to_rates():
    assert gpu_key("NVIDIA H100 80GB HBM3") == "h100" and gpu_key("NVIDIA H200") == "h200"
    assert gpu_key("NVIDIA A100-SXM4-80GB") == "a100" and gpu_key("NVIDIA GeForce RTX 4090") == "4090"
    assert gpu_key("NVIDIA GeForce RTX 5090") == "5090" and gpu_key("NVIDIA L40S") is None


def test_the_estimate_options_carry_the_applied_settings(tools):
    benchmark_wan, _ = tools
    memory = MemoryArgs(fp8_base=True, fp8_scaled=True, gradient_checkpointing=True, blocks_to_swap=3,
                        gradient_checkpointing_cpu_offload=True)
    cfg = BenchConfig(get_variant("t2v-1.3B"), 256, 256, 17, rank=8, memory=memory, compile=True,
                      fp8_scaled_mm=True)
    args = benchmark_wan.parse_args(["--estimate", *estimate_argv(cfg, "cudnn")])
    assert (args.task, args.width, args.frames, args.network_dim, args.attention) == ("t2v-1.3B", 256, 17, 8, "sdpa")
    assert args.fp8_scaled and args.fp8_scaled_mm and args.blocks_to_swap == 3
    assert args.gradient_checkpointing_cpu_offload
    assert args.sdpa_kernel == "cudnn" and not args.eager and not args.no_gradient_checkpointing
    keep = MemoryArgs(gradient_checkpointing=True, gradient_checkpointing_keep_attention=True,
                      gradient_checkpointing_skip_blocks=2)
    full = BenchConfig(get_variant("ti2v-5B"), 256, 256, 17, memory=keep, full=True, full_bf16=True,
                       optimizer="AdamW8bit")
    args = benchmark_wan.parse_args(["--estimate", *estimate_argv(full)])
    assert args.keep_attention and args.skip_blocks == 2 and args.eager and not args.fp8_scaled
    assert args.full and args.full_bf16 and args.optimizer == "AdamW8bit"
    bare = benchmark_wan.parse_args(["--estimate", *estimate_argv(BenchConfig(get_variant("t2v-1.3B"), 64, 64, 5,
                                                                              memory=MemoryArgs()))])
    assert bare.no_gradient_checkpointing and not bare.full


def test_a_measured_result_gets_its_estimate_and_error(tools, tmp_path, capsys):
    benchmark_wan, estimate_error = tools
    result = tmp_path / "lora.json"
    assert benchmark_wan.main(["--cpu", "--steps", "1", "--warmup", "0", "--json", str(result)]) == 0
    saved = json.loads(result.read_text())
    assert saved["gpu"] is None and saved["device_name"] == "cpu" and "--eager" in saved["estimate_argv"]
    (tmp_path / "env.json").write_text(json.dumps({"torch": "2.13"}))  # another step's file: skipped
    capsys.readouterr()
    assert estimate_error.main([str(tmp_path)]) == 0
    assert "no rates for cpu (pass --gpu)" in capsys.readouterr().out
    assert estimate_error.main([str(tmp_path), "--gpu", "h100", "--json", str(tmp_path / "rows.txt")]) == 0
    out = capsys.readouterr().out
    rows = json.loads((tmp_path / "rows.txt").read_text())
    assert len(rows) == 1 and rows[0]["gpu"] == "h100" and rows[0]["estimated_s"] > 0
    assert rows[0]["error"].endswith("%") and "| lora.json | h100 |" in out
    assert estimate_error.main([str(tmp_path / "env.json")]) == 2

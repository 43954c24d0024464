"""Benchmark LoRA training steps of a full-size WAN DiT with random weights (no download).

    python tools/benchmark_wan.py --task t2v-A14B --width 832 --height 480 --frames 81
    python tools/benchmark_wan.py --task ti2v-5B --width 1280 --height 704 --frames 121 --vram_cap_gb 24 --plan
    python tools/benchmark_wan.py --task t2v-A14B --compare_cap 24      # capped vs uncapped, target <= 2x
    python tools/benchmark_wan.py --task t2v-A14B --two_experts --plan  # host RAM with offload_inactive_dit
    python tools/benchmark_wan.py --cpu                                 # tiny model on the CPU (CI)
    python tools/benchmark_wan.py --estimate --gpu h100 --plan    # no GPU needed: the auto_memory defaults
    python tools/benchmark_wan.py --estimate --gpu h100 --plan --fp8_fast [--fa3_installed]
    torchrun --nproc_per_node 8 tools/benchmark_wan.py --width 1280 --height 720 --sequence_parallel 8
    python tools/benchmark_wan.py --estimate --width 1280 --height 720 --sequence_parallel 8  # rows N = 1..8

Builds the model block by block directly on the GPU, applies the memory features exactly as training
does (`apply_memory_features`), runs warm-up then timed steps (forward, MSE loss, backward, AdamW on the
LoRA) and prints s/step, tokens/s, peak VRAM, host RAM and MFU (formula: library/training/benchmark.py).
`--vram_cap_gb` caps PyTorch's allocator with `torch.cuda.set_per_process_memory_fraction`; `--plan`
takes fp8 / checkpointing / offload / block swap from the memory planner for that cap.

`--estimate` runs no GPU step: one full-size step is traced on the meta device and costed with the rates of
`--gpu` (h100, h200, a100, 4090, 5090; library/training/gpu_rates.py states each rate and its source), printing
an estimated step time, the MFU it implies (against the dense bf16 peak, fp8 matmuls or not) and the kernels
that take the time (library/training/estimate_cli.py). With `--plan` the memory planner chooses for the card's
memory (or `--vram_cap_gb`) what `auto_memory` would (checkpointing, keeping self-attention, activation
offload with the kept attention on the GPU or on the host, the last blocks not checkpointed as `--skip_blocks N`
forces, fp8 weights, block swap; host RAM is not checked unless `--host_ram_gb` is given); with `--full` the full
fine-tuning planner of one process (FSDP is not modelled). Activation offload (`--offload_activations`, with
`--offload_attention` the kept self-attention outputs too) and block swap (`--blocks_to_swap`), or the plan's, are
costed as copies at the GPU's host-link rate overlapped with the compute, in the order training issues them; the
exposed part is added. `--full` adds the optimizer step and fp32 master casts (library/training/estimate_full.py).
The estimate compiles the blocks unless `--eager`, as training does on a CUDA GPU by default; measured runs
compile only with `--compile` (so `tools/gpu_check.sh` times eager and compiled steps apart). Every figure it
prints is labelled as an estimate; it takes under a minute on a CPU. Its attention is training's default for the
GPU (no attention option: flash3 on Hopper where FlashAttention 3 is installed, else sdpa), with FA3 taken as
not installed unless `--fa3_installed` (the same as `--attention flash3` on an H100 / H200); `--attention` sets
it, `--sdpa_kernel cudnn | flash` forces that SDPA kernel.

`--sequence_parallel N` splits the sample's tokens over N processes (launch N with torchrun; rank 0 prints
tokens/s and peak VRAM per GPU). With `--estimate` it adds rows for N = 1, 2, 4, ... up to N: the step per
GPU with the all-to-all traffic at NVLink and at InfiniBand rates (library/training/estimate_parallel.py).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # our `library`, never another package of that name (sd-scripts has one)
SDPA_KERNELS = {"flash": "FLASH_ATTENTION", "efficient": "EFFICIENT_ATTENTION", "cudnn": "CUDNN_ATTENTION",
                "math": "MATH"}  # --sdpa_kernel -> torch.nn.attention.SDPBackend member


def parse_args(argv=None) -> argparse.Namespace:
    from library.errors import non_negative_int, positive_float, positive_int

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--task", default="t2v-A14B")
    p.add_argument("--width", type=positive_int, default=832)
    p.add_argument("--height", type=positive_int, default=480)
    p.add_argument("--frames", type=positive_int, default=81)
    p.add_argument("--batch_size", type=positive_int, default=1)
    p.add_argument("--network_dim", type=positive_int, default=32, help="LoRA rank")
    p.add_argument("--steps", type=positive_int, default=5, help="timed steps")
    p.add_argument("--warmup", type=non_negative_int, default=2, help="untimed steps first")
    p.add_argument("--attention", help="sdpa (measured runs' default), flash_attn, flash3, xformers, or auto (the "
                                       "trainer's default: flash3 on Hopper where FlashAttention 3 is installed, "
                                       "else sdpa; the estimate's default, see --fa3_installed)")
    p.add_argument("--fa3_installed", action="store_true",
                   help="with --estimate and no --attention: assume FlashAttention 3 is installed, so the default "
                        "attention on a Hopper GPU is flash3, as training's (without it: sdpa)")
    p.add_argument("--sdpa_kernel", choices=sorted(SDPA_KERNELS),
                   help="with --attention sdpa: force PyTorch's flash, efficient, cudnn or math kernel (default: "
                        "PyTorch's choice)")
    p.add_argument("--fp8_base", action="store_true", help="block Linear weights in fp8")
    p.add_argument("--fp8_scaled", action="store_true", help="with per-tensor scales (implies --fp8_base)")
    p.add_argument("--fp8_fast", "--fp8_scaled_mm", dest="fp8_scaled_mm", action="store_true",
                   help="fp8 matmuls for the frozen fp8 weights, forward and input gradient (`fp8_fast`; Ada / Hopper)")
    p.add_argument("--blocks_to_swap", type=non_negative_int, default=0)
    p.add_argument("--no_gradient_checkpointing", action="store_true")
    p.add_argument("--gradient_checkpointing_cpu_offload", "--offload_activations", action="store_true",
                   dest="gradient_checkpointing_cpu_offload",
                   help="checkpointed block inputs to pinned host memory and back (with --estimate: the copies at the "
                        "GPU's host-link rate, overlapped with the compute)")
    p.add_argument("--offload_attention", "--gradient_checkpointing_offload_attention", action="store_true",
                   dest="offload_attention",
                   help="with --offload_activations and kept attention: the kept self-attention outputs go to the host "
                        "with the block inputs and come back with them (with --estimate: in the copies)")
    p.add_argument("--host_ram_gb", type=positive_float,
                   help="with --plan: host RAM this process may use, GiB (the planner skips candidates whose host "
                        "memory does not fit; default: MemAvailable / LOCAL_WORLD_SIZE on a GPU run, not checked "
                        "with --estimate)")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile each block (with --estimate the default, as training on a GPU)")
    p.add_argument("--eager", action="store_true", help="with --estimate: blocks not compiled (`compile = false`)")
    p.add_argument("--keep_attention", action="store_true",
                   help="selective checkpointing: keep each block's self-attention outputs instead of recomputing "
                        "them (2 T C + 4 H T bytes more a block)")
    p.add_argument("--keep_attention_blocks", type=non_negative_int, default=0, metavar="N",
                   help="selective checkpointing in the last N blocks only (the others recompute their attention)")
    p.add_argument("--skip_blocks", "--gradient_checkpointing_skip_blocks", type=non_negative_int, default=0,
                   metavar="N", dest="skip_blocks",
                   help="partial checkpointing: the last N blocks are not checkpointed (keep all their activations, "
                        "no recomputation); with --plan the planner's N")
    p.add_argument("--two_experts", action="store_true", help="both A14B experts, alternating, inactive on the CPU")
    p.add_argument("--full", action="store_true",
                   help="full fine-tuning steps (every DiT weight trains) instead of LoRA")
    p.add_argument("--full_bf16", action="store_true", help="full fine-tuning: bf16 weights and optimizer state")
    p.add_argument("--fused_backward_pass", action="store_true",
                   help="full fine-tuning: step each tensor in the backward")
    p.add_argument("--optimizer", default="AdamW",
                   help="optimizer by its Kohya name (AdamW, AdamW8bit, AdaFactor, ...)")
    p.add_argument("--vram_cap_gb", type=positive_float, help="cap PyTorch's GPU memory at this many GiB")
    p.add_argument("--plan", action="store_true", help="memory settings from the planner for the cap / the GPU")
    p.add_argument("--compare_cap", type=positive_float, metavar="GB",
                   help="run uncapped, then capped with --plan; print the slowdown")
    p.add_argument("--peak_tflops", type=positive_float,
                   help="dense bf16 peak of the GPU (default: known GPUs, e.g. H100 SXM 989)")
    p.add_argument("--cpu", action="store_true", help="tiny variant on the CPU (keeps this script tested)")
    p.add_argument("--estimate", action="store_true",
                   help="no GPU run: a roofline estimate of the step on --gpu from a meta-device trace")
    p.add_argument("--gpu", default="h100", choices=("h100", "h200", "a100", "4090", "5090"),
                   help="with --estimate: the GPU whose rates are applied (default h100)")
    p.add_argument("--sequence_parallel", type=positive_int, default=1,
                   help="split each sample over N processes (launch N with torchrun); with --estimate: rows up to N")
    p.add_argument("--sequence_parallel_attention", default="ulysses", choices=("ulysses", "all_gather"))
    p.add_argument("--json", help="also write the result to this JSON file")
    return p.parse_args(argv)


def _config(args):
    import torch

    from library.config.schema import MemoryArgs
    from library.training.benchmark import BenchConfig
    from library.training.planning.lora import detect_vram_gb, plan_memory
    from library.wan.variants import get_variant

    variant = get_variant(args.task)
    checkpointing = not args.no_gradient_checkpointing
    memory = MemoryArgs(fp8_base=args.fp8_base or args.fp8_scaled, fp8_scaled=args.fp8_scaled,
                        blocks_to_swap=args.blocks_to_swap, use_pinned_memory_for_block_swap=True,
                        gradient_checkpointing=checkpointing, fp8_fast=args.fp8_scaled_mm,
                        gradient_checkpointing_cpu_offload=args.gradient_checkpointing_cpu_offload,
                        gradient_checkpointing_keep_attention=args.keep_attention and checkpointing,
                        gradient_checkpointing_keep_attention_blocks=args.keep_attention_blocks * checkpointing,
                        gradient_checkpointing_skip_blocks=args.skip_blocks * checkpointing,
                        gradient_checkpointing_offload_attention=args.offload_attention)
    experts = 2 if args.two_experts else 1
    gather = args.sequence_parallel_attention == "all_gather"
    full = {"full_bf16": args.full_bf16, "fused_backward_pass": args.fused_backward_pass}
    if args.plan and args.full:
        from library.config.schema import FineTuneArgs
        from library.training.planning.full import plan_full
        from library.training.planning.host import detect_host_ram_gb

        vram = args.vram_cap_gb or detect_vram_gb() or 80.0
        plan = plan_full(vram, variant, args.width, args.height, args.frames, args.batch_size, args.optimizer,
                         sequence_parallel=args.sequence_parallel, gather_kv=gather,
                         host_ram_gb=args.host_ram_gb or detect_host_ram_gb())
        if os.environ.get("RANK", "0") == "0":  # under torchrun (--sequence_parallel): rank 0 prints
            print(plan.table())
        memory, finetune = plan.apply(memory, FineTuneArgs())
        full = {"full_bf16": finetune.full_bf16, "fused_backward_pass": finetune.fused_backward_pass}
    elif args.plan:
        vram = args.vram_cap_gb or detect_vram_gb() or 24.0
        from library.training.planning.host import detect_host_ram_gb

        plan = plan_memory(vram, variant, args.width, args.height, args.frames, args.batch_size,
                           args.network_dim, "adamw", experts, fp8=args.fp8_scaled_mm,
                           sequence_parallel=args.sequence_parallel, gather_kv=gather,
                           host_ram_gb=args.host_ram_gb or detect_host_ram_gb())
        if os.environ.get("RANK", "0") == "0":  # under torchrun (--sequence_parallel): rank 0 prints
            print(plan.table())
        memory = plan.apply(memory)
    return BenchConfig(
        variant=variant, width=args.width, height=args.height, frames=args.frames, batch_size=args.batch_size,
        rank=args.network_dim, steps=args.steps, warmup=args.warmup, device="cpu" if args.cpu else "cuda",
        dtype=torch.float32 if args.cpu else torch.bfloat16, memory=memory, attention=args.attention,
        fp8_scaled_mm=args.fp8_scaled_mm, compile=_compiled(args),
        two_experts=args.two_experts,
        peak_tflops=args.peak_tflops, full=args.full, optimizer=args.optimizer, **full,
        planned_gib=_planned(args, variant, memory, full, experts), sequence_parallel=_sequence_group(args, variant),
    )


def _compiled(args) -> bool:
    """Estimates: compiled blocks unless `--eager` (training's default on a GPU); measured runs: `--compile`."""
    return args.compile or (args.estimate and not args.eager)


def _sequence_group(args, variant):
    """The sequence group of this process under torchrun (`--sequence_parallel N`: N processes), or None."""
    n = args.sequence_parallel
    if n == 1:
        return None
    import torch
    import torch.distributed as dist

    from library.runtime.sequence_parallel import SequenceParallel, SequenceParallelError, check_heads

    check_heads(variant.num_heads, n, args.sequence_parallel_attention, "--sequence_parallel")
    if int(os.environ.get("WORLD_SIZE", "1")) != n:
        world = os.environ.get("WORLD_SIZE", "1")
        raise SequenceParallelError(f"--sequence_parallel {n}: launch {n} processes, e.g. `torchrun --nproc_per_node "
                                    f"{n} tools/benchmark_wan.py ...` (WORLD_SIZE is {world})")
    if not args.cpu:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    if not dist.is_initialized():
        dist.init_process_group("gloo" if args.cpu else "nccl")
    return SequenceParallel(dist.group.WORLD, n, dist.get_rank(), args.sequence_parallel_attention)


def _planned(args, variant, memory, full: dict, experts: int) -> float:
    """The planner's estimate of the peak for the settings this run uses (printed beside the measurement)."""
    gather = args.sequence_parallel_attention == "all_gather"
    if args.full:
        from library.training.planning.full import FullSettings, FullWorkload, estimate_full

        w = FullWorkload(variant, args.width, args.height, args.frames, args.batch_size, 0, args.optimizer, experts,
                         sequence_parallel=args.sequence_parallel, gather_kv=gather)
        s = FullSettings(checkpointing=memory.gradient_checkpointing,
                         offload_activations=memory.gradient_checkpointing_cpu_offload,
                         keep_attention=memory.gradient_checkpointing_keep_attention,
                         skip_blocks=memory.gradient_checkpointing_skip_blocks, **full)
        return estimate_full(w, s).total
    from library.training.planning.lora import Settings, Workload, estimate

    w = Workload(variant, args.width, args.height, args.frames, args.batch_size, args.network_dim, "adamw", experts,
                 args.sequence_parallel, gather)
    s = Settings(fp8=memory.fp8_base, checkpointing=memory.gradient_checkpointing,
                 offload_activations=memory.gradient_checkpointing_cpu_offload, blocks_to_swap=memory.blocks_to_swap,
                 offload_inactive=args.two_experts, keep_attention=memory.gradient_checkpointing_keep_attention,
                 keep_attention_blocks=memory.gradient_checkpointing_keep_attention_blocks,
                 skip_blocks=memory.gradient_checkpointing_skip_blocks,
                 offload_attention=memory.gradient_checkpointing_offload_attention)
    return estimate(w, s).total


def _cap(gb: float) -> None:
    import torch

    total = torch.cuda.get_device_properties(0).total_memory
    torch.cuda.set_per_process_memory_fraction(min(1.0, gb * 2**30 / total), 0)
    print(f"GPU memory capped at {gb:g} GiB of {total / 2**30:.1f}")


def _compare(args, argv) -> int:
    """Uncapped, then capped with the planner's settings, each in a fresh process."""
    rest = list(argv if argv is not None else sys.argv[1:])
    i = rest.index("--compare_cap")
    rest = rest[:i] + rest[i + 2:]
    results = {}
    for label, extra in (("uncapped", []), ("capped", ["--vram_cap_gb", str(args.compare_cap), "--plan"])):
        with tempfile.TemporaryDirectory() as tmp:
            out = os.path.join(tmp, "result.json")
            code = subprocess.call([sys.executable, __file__, *rest, *extra, "--json", out])
            if code:
                print(f"{label} run failed (exit {code})")
                return code
            results[label] = json.loads(Path(out).read_text())
    ratio = results["capped"]["seconds_per_step"] / results["uncapped"]["seconds_per_step"]
    print(f"capped at {args.compare_cap:g} GiB: {ratio:.2f}x the uncapped step time (target <= 2x): "
          f"{'met' if ratio <= 2 else 'NOT met'}")
    return 0


def _sdpa_kernel(name: str | None):
    """The context that forces one SDPA kernel for the whole run (forward, backward, recomputation)."""
    if not name:
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([getattr(SDPBackend, SDPA_KERNELS[name])])


def main(argv=None) -> int:
    args = parse_args(argv)
    if not args.estimate:
        args.attention = args.attention or "sdpa"
    if args.sdpa_kernel and args.attention not in (None, "sdpa"):
        print(f"--sdpa_kernel {args.sdpa_kernel} picks a kernel of PyTorch's SDPA; it cannot be combined with "
              f"--attention {args.attention}", file=sys.stderr)
        return 2
    if args.offload_attention and not args.plan and not (
            args.gradient_checkpointing_cpu_offload and (args.keep_attention or args.keep_attention_blocks)):
        print("--offload_attention sends the kept self-attention outputs to the host with the offloaded block inputs: "
              "add --offload_activations and --keep_attention (or --keep_attention_blocks N)", file=sys.stderr)
        return 2
    if args.compare_cap:
        return _compare(args, argv)
    if args.estimate:
        from library.training.estimate_cli import run_estimate

        return run_estimate(args, _compiled(args))
    if args.cpu:
        defaults = parse_args([])
        for name, value in (("task", "t2v-tiny"), ("width", 64), ("height", 64), ("frames", 9), ("steps", 3),
                            ("warmup", 1), ("network_dim", 4)):
            if getattr(args, name) == getattr(defaults, name):
                setattr(args, name, value)
    elif args.vram_cap_gb:
        _cap(args.vram_cap_gb)
    from library.training.benchmark import run_benchmark

    cfg = _config(args)
    quiet = cfg.sequence_parallel is not None and cfg.sequence_parallel.rank != 0  # rank 0 prints
    what = (f"full fine-tuning ({cfg.optimizer}{', full_bf16' if cfg.full_bf16 else ', fp32 masters'}"
            f"{', fused' if cfg.fused_backward_pass else ''})" if cfg.full else f"rank {cfg.rank}")
    if not quiet:
        print(f"{cfg.variant.name} {cfg.width}x{cfg.height}x{cfg.frames}, batch {cfg.batch_size}, {what}, "
              f"{cfg.warmup} warm-up + {cfg.steps} timed steps on {cfg.device}, attention {cfg.attention}"
              + (f" ({args.sdpa_kernel} kernel)" if args.sdpa_kernel else ""))
    with _sdpa_kernel(args.sdpa_kernel):
        result = run_benchmark(cfg)
    if cfg.sequence_parallel is not None:  # leave the process group together, not in the interpreter's teardown
        import torch.distributed as dist

        dist.barrier()
        dist.destroy_process_group()
    if quiet:
        return 0
    print(result.table())
    if args.json:  # with what `tools/estimate_error.py` needs to set the estimate of the same step beside it
        from library.training.estimate_cli import estimate_argv, gpu_key

        import torch

        name = torch.cuda.get_device_name() if cfg.device == "cuda" else "cpu"
        extra = {"device_name": name, "gpu": gpu_key(name)}
        if cfg.sequence_parallel is None:  # a split step's estimate is `--estimate --sequence_parallel N`'s row
            extra["estimate_argv"] = estimate_argv(cfg, args.sdpa_kernel)
        Path(args.json).write_text(json.dumps({**vars(result), **extra}, indent=2))
    return 0


if __name__ == "__main__":
    from library.errors import run_cli

    sys.exit(run_cli(main))

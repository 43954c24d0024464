"""`tools/benchmark_wan.py --estimate`: the benchmark's options turned into a traced, costed step
(`estimate.py`), nothing run on a GPU. With `--plan` the memory planner picks the settings for the card's memory
(or `--vram_cap_gb`): the LoRA planner, or with `--full` the full fine-tuning planner of one process.
`--sdpa_kernel cudnn | flash` costs that kernel of PyTorch's SDPA; the memory-efficient and math kernels
have no rate here. Exit status 2, with the reason on stderr, for what cannot be estimated."""

from __future__ import annotations

import json
import sys
from pathlib import Path

SDPA_RATES = {"cudnn": "cudnn", "flash": "fa2"}  # --sdpa_kernel -> the attention rate it runs at


def _error(message: str) -> int:
    print(f"--estimate: {message}", file=sys.stderr)
    return 2


def _settings(args, variant, gpus) -> dict | int:
    """StepSetup keywords from the options, or the planner's for the card; an exit status when none fits."""
    from library.training.planning.full import plan_full
    from library.training.planning.lora import plan_memory

    checkpointing = not args.no_gradient_checkpointing
    settings = dict(checkpointing=checkpointing, keep_attention=args.keep_attention,
                    keep_attention_blocks=args.keep_attention_blocks, skip_blocks=args.skip_blocks,
                    fp8=bool(args.fp8_base or args.fp8_scaled or args.fp8_scaled_mm), fp8_fast=args.fp8_scaled_mm,
                    offload_activations=args.gradient_checkpointing_cpu_offload, blocks_to_swap=args.blocks_to_swap,
                    full=args.full, full_bf16=args.full_bf16, optimizer=args.optimizer,
                    offload_attention=args.offload_attention)
    if not args.plan:
        return settings
    vram = args.vram_cap_gb or gpus[args.gpu].memory_gib
    if args.full:
        plan = plan_full(vram, variant, args.width, args.height, args.frames, args.batch_size, args.optimizer,
                         host_ram_gb=args.host_ram_gb)
        print(plan.table())
        if not plan.fits:
            return _error(f"full fine-tuning does not fit this card in one process (the last plan tried is "
                          f"{plan.settings.label()}); several processes share it with FSDP, which is not modelled")
        s = plan.settings
        return settings | dict(checkpointing=s.checkpointing, keep_attention=s.keep_attention, keep_attention_blocks=0,
                               skip_blocks=s.skip_blocks, offload_activations=s.offload_activations,
                               full_bf16=s.full_bf16, offload_attention=False)
    plan = plan_memory(vram, variant, args.width, args.height, args.frames, args.batch_size, args.network_dim,
                       "adamw", fp8=args.fp8_scaled_mm, host_ram_gb=args.host_ram_gb)
    print(plan.table())
    s = plan.settings
    if not plan.fits:
        return _error(f"nothing fits this card: the last plan tried is {s.label()}")
    return settings | dict(checkpointing=s.checkpointing, keep_attention=s.keep_attention,
                           keep_attention_blocks=s.keep_attention_blocks, skip_blocks=s.skip_blocks, fp8=s.fp8,
                           offload_activations=s.offload_activations, blocks_to_swap=s.blocks_to_swap,
                           offload_attention=s.attention_on_host)


def estimated_attention(args) -> str:
    """`--attention`, or what training's default (`auto`) picks on `--gpu`, FA3 installed or not; printed."""
    from library.training.gpu_rates import GPUS
    from library.wan.attention import AUTO, default_plan

    if args.attention not in (None, AUTO):
        return args.attention
    if args.sdpa_kernel:
        return "sdpa"
    missing = None if args.fa3_installed else "assumed by --estimate; --fa3_installed assumes it is"
    plan = default_plan(GPUS[args.gpu].capability, missing, True)
    print(f"attention: no --attention, training's default: {plan.backend} ({plan.reason})")
    return plan.backend


def run_estimate(args, compiled: bool) -> int:
    """The roofline estimate of one step on `args.gpu`; prints it (and writes `args.json`)."""
    from library.training.estimate import StepSetup, estimate_step
    from library.training.gpu_rates import GPUS
    from library.wan.variants import get_variant

    if args.sdpa_kernel and args.sdpa_kernel not in SDPA_RATES:
        return _error(f"--sdpa_kernel {args.sdpa_kernel}: PyTorch's {args.sdpa_kernel} kernel has no rate here "
                      f"(estimated: {', '.join(SDPA_RATES)})")
    variant = get_variant(args.task)
    settings = _settings(args, variant, GPUS)
    if isinstance(settings, int):
        return settings
    checkpointing = settings["checkpointing"]
    if (settings["blocks_to_swap"] or settings["offload_activations"]) and not checkpointing:
        return _error("block swap and activation offload need gradient checkpointing (training turns it on)")
    for key in ("keep_attention", "keep_attention_blocks", "skip_blocks"):
        settings[key] = settings[key] * checkpointing
    setup = StepSetup(variant, args.width, args.height, args.frames, args.batch_size, args.network_dim, **settings)
    if args.full and args.fused_backward_pass:
        print("--fused_backward_pass: costed as the plain step (the same optimizer work, tensor by tensor)")
    try:
        result = estimate_step(setup, args.gpu, estimated_attention(args), compiled,
                               kernel=SDPA_RATES.get(args.sdpa_kernel))
    except ValueError as exc:  # flash3 or fp8 matmuls on a GPU without them, a kernel without a rate, ...
        return _error(str(exc))
    print(result.table())
    rows = []
    if args.sequence_parallel > 1:
        from library.training.estimate_parallel import split_rows, split_table

        ulysses = args.sequence_parallel_attention == "ulysses"
        sizes = tuple(n for n in (1, 2, 4, 8, 16, 32, 64) if n <= args.sequence_parallel
                      and not (ulysses and setup.variant.num_heads % n))
        print(split_table(result, sizes, args.sequence_parallel_attention))
        rows = [vars(r) for r in split_rows(result, sizes, args.sequence_parallel_attention)]
    if args.json:
        Path(args.json).write_text(json.dumps({"estimate": True, "gpu": args.gpu, "seconds_per_step": result.seconds,
                                               "mfu": result.mfu, "kernels": result.kernels,
                                               "memory_bound_tb": result.memory_bound_tb,
                                               "offload_exposed_s": result.offload.exposed_s if result.offload
                                               else None,
                                               "swap_exposed_s": result.swap.exposed_s if result.swap else None,
                                               "sequence_parallel": rows}, indent=2))
    return 0


GPU_KEYS = (("H100", "h100"), ("H200", "h200"), ("A100", "a100"), ("4090", "4090"), ("5090", "5090"))


def gpu_key(device_name: str) -> str | None:
    """The `--gpu` rates for a CUDA device name (`torch.cuda.get_device_name`), None for a GPU without them."""
    return next((key for part, key in GPU_KEYS if part in device_name), None)


def estimate_argv(cfg, sdpa_kernel: str | None = None) -> list[str]:
    """The `tools/benchmark_wan.py --estimate` options for the step a measured run (`BenchConfig`) timed: the
    same shapes, attention, compilation and memory settings as applied (the planner's, with `--plan`), so
    the estimate and the measurement can be set side by side (`tools/estimate_error.py`)."""
    m = cfg.memory
    argv = ["--task", cfg.variant.name, "--width", str(cfg.width), "--height", str(cfg.height), "--frames",
            str(cfg.frames), "--batch_size", str(cfg.batch_size), "--network_dim", str(cfg.rank),
            "--attention", cfg.attention]
    flags = [(sdpa_kernel, ["--sdpa_kernel", str(sdpa_kernel)]), (not cfg.compile, ["--eager"]),
             (m.fp8_base, ["--fp8_scaled"]), (cfg.fp8_scaled_mm, ["--fp8_fast"]),
             (not m.gradient_checkpointing, ["--no_gradient_checkpointing"]),
             (m.gradient_checkpointing_keep_attention, ["--keep_attention"]),
             (m.gradient_checkpointing_keep_attention_blocks,
              ["--keep_attention_blocks", str(m.gradient_checkpointing_keep_attention_blocks)]),
             (m.gradient_checkpointing_skip_blocks, ["--skip_blocks", str(m.gradient_checkpointing_skip_blocks)]),
             (m.gradient_checkpointing_cpu_offload, ["--offload_activations"]),
             (m.gradient_checkpointing_offload_attention, ["--offload_attention"]),
             (m.blocks_to_swap, ["--blocks_to_swap", str(m.blocks_to_swap)]),
             (cfg.full, ["--full", "--optimizer", cfg.optimizer]), (cfg.full and cfg.full_bf16, ["--full_bf16"])]
    return argv + [arg for wanted, args in flags if wanted for arg in args]

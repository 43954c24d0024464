"""Plan the memory features for a training job and print the estimates as a table.

    python tools/plan_memory.py --task t2v-A14B --width 832 --height 480 --frames 81 [--vram_gb 24]
    python tools/plan_memory.py --config_file my_lora.toml --width 1280 --height 704 --frames 121
    python tools/plan_memory.py --full --task t2v-A14B --optimizer AdamW8bit --processes 8 --vram_gb 80

The GPU's memory is detected when `--vram_gb` is not given, the host RAM one process may use when
`--host_ram_gb` is not: MemAvailable shared among `LOCAL_WORLD_SIZE` processes, or without it (outside a
launcher) with `--full` among the `--processes` this node's GPUs would run. With `--config_file`, the task, LoRA rank,
optimizer, number of experts and `fp8_fast` come from the training TOML (command-line values win); a TOML with
`full_fine_tune = true` plans full fine-tuning, with its `trainable_patterns` / `frozen_patterns`. `--full`
plans full fine-tuning (finetune/fine_tune_wan.py) per process for `--processes` GPUs. Figures are
estimates (see library/training/planning/lora.py); `tools/benchmark_wan.py` measures the real peak. For LoRA the
last row is the plan with its skip stage where it applies: the rung above it plus the last N blocks left
unchecked ("skipping the last N blocks", `gradient_checkpointing_skip_blocks`). `--margin_gb` holds that much
back (by default, with a `--config_file` that sets `auto_memory`, the margin an out-of-memory error recorded in
its `output_dir/auto_memory_margin.json`: the plan its next start makes).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # our `library`, never another package of that name (sd-scripts has one)


def parse_args(argv=None) -> argparse.Namespace:
    from library.errors import finite_float, positive_float, positive_int

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config_file", help="training TOML to take task, network_dim, optimizer_type and experts from")
    p.add_argument("--task", help="WAN task / variant (default t2v-A14B)")
    p.add_argument("--vram_gb", type=positive_float, help="GPU memory in GiB (default: the detected GPU)")
    p.add_argument("--width", type=positive_int, default=832)
    p.add_argument("--height", type=positive_int, default=480)
    p.add_argument("--frames", type=positive_int, default=81)
    p.add_argument("--batch_size", type=positive_int, default=1)
    p.add_argument("--network_dim", type=positive_int, help="LoRA rank (default 32)")
    p.add_argument("--optimizer_type", "--optimizer", dest="optimizer_type",
                   help="AdamW, AdamW8bit, Lion, AdaFactor, Prodigy ... (default AdamW)")
    p.add_argument("--experts", type=int, choices=(1, 2), help="2: train both WAN 2.2 A14B experts in one run")
    p.add_argument("--full", action="store_true", help="plan full fine-tuning instead of a LoRA")
    p.add_argument("--processes", type=positive_int, default=1,
                   help="full fine-tuning: GPUs training together (fsdp shards over them; default 1)")
    p.add_argument("--sequence_parallel", type=positive_int,
                   help="processes sharing each sample's tokens (sequence_parallel_size; default 1 or the config's)")
    p.add_argument("--fp8_fast", action="store_true",
                   help="LoRA: plan only with fp8 weights, as auto_memory does for `fp8_fast = true` (default: the "
                        "config's)")
    p.add_argument("--host_ram_gb", type=positive_float,
                   help="host RAM one process may use, GiB; candidates whose host buffers (offloaded activations; "
                        "LoRA: swapped blocks, an inactive expert; full fine-tuning: fsdp_cpu_offload's shards and "
                        "optimizer state) do not fit 90%% of it are skipped (default: MemAvailable divided by "
                        "LOCAL_WORLD_SIZE, or with --full by the --processes on this node's GPUs)")
    p.add_argument("--margin_gb", type=finite_float,
                   help="GiB held back from the card's memory, as auto_memory does after an out-of-memory error "
                        "(default: with --config_file and auto_memory, the margin in its output_dir)")
    p.add_argument("--all_candidates", action="store_true", help="full fine-tuning: show every rung of the ladder, "
                                                                 "not only those tried")
    return p.parse_args(argv)


def local_gpus(processes: int) -> int:
    """The processes of a `--processes` run on this node, filling its GPUs first (1 without CUDA)."""
    import torch

    return min(processes, max(1, torch.cuda.device_count()))


def main(argv=None) -> int:
    from library.training.planning.host import detect_host_ram_gb
    from library.training.planning.lora import detect_vram_gb, plan_memory
    from library.training.planning.full import plan_full

    args = parse_args(argv)
    task, rank, optimizer, experts, full, patterns = "t2v-A14B", 32, "AdamW", 1, args.full, ((), ())
    split, gather, fp8_fast, margin = 1, False, False, 0.0
    if args.config_file:
        from library.config import load_config

        cfg = load_config(["--config_file", args.config_file])
        task, rank, optimizer = cfg.model.task, cfg.network.network_dim, cfg.optimizer.optimizer_type
        experts = 2 if cfg.model.dit_high_noise else 1
        full = full or cfg.finetune.full_fine_tune
        patterns = (cfg.finetune.trainable_patterns, cfg.finetune.frozen_patterns)
        split = cfg.attention.sequence_parallel
        gather = cfg.attention.sequence_parallel_attention == "all_gather"
        fp8_fast = cfg.memory.fp8_fast
        if cfg.memory.auto_memory:
            from library.training.planning.margin import load_margin, output_dir_of

            margin = load_margin(output_dir_of(cfg))
    margin = margin if args.margin_gb is None else max(0.0, args.margin_gb)
    split = args.sequence_parallel or split
    vram = args.vram_gb or detect_vram_gb()
    if vram is None:
        print("no CUDA device found: pass --vram_gb (e.g. 24)", file=sys.stderr)
        return 2
    host = args.host_ram_gb or detect_host_ram_gb()
    if full and not args.host_ram_gb and host is not None and "LOCAL_WORLD_SIZE" not in os.environ:
        host /= local_gpus(args.processes)
    if full:
        plan = plan_full(vram, args.task or task, args.width, args.height, args.frames, args.batch_size,
                         args.optimizer_type or optimizer, args.processes, args.experts or experts, *patterns,
                         show_all=args.all_candidates, sequence_parallel=split, gather_kv=gather, host_ram_gb=host,
                         margin_gb=margin)
    else:
        plan = plan_memory(vram, args.task or task, args.width, args.height, args.frames, args.batch_size,
                           args.network_dim or rank, args.optimizer_type or optimizer, args.experts or experts,
                           fp8=args.fp8_fast or fp8_fast, sequence_parallel=split, gather_kv=gather,
                           host_ram_gb=host, margin_gb=margin)
    print(plan.table())
    return 0 if plan.fits else 1


if __name__ == "__main__":
    from library.errors import run_cli

    sys.exit(run_cli(main))

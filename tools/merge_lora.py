"""Merge WAN LoRAs into a DiT checkpoint, or several LoRAs into one LoRA file.

    python tools/merge_lora.py --dit low_noise_model/ --loras a_low_noise.safetensors b.safetensors
        --strengths 1.0 0.6 --save_to merged_low_noise.safetensors [--save_precision fp8_scaled]
    python tools/merge_lora.py --merge_into_lora --loras a.safetensors b.safetensors --save_to ab.safetensors
        [--new_rank 32]

WAN 2.2 A14B: merge each expert separately (its `_high_noise` / `_low_noise` LoRA into that expert).
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this repo's packages first


def build_parser() -> argparse.ArgumentParser:
    from library.errors import finite_float, positive_float, positive_int
    from library.lora_tools.merge import DIT_PRECISIONS
    from networks.convert import FORMATS
    from networks.merge import EXPERTS
    from networks.resize import DYNAMIC_METHODS, SAVE_DTYPES

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--loras", "--models", nargs="+", required=True,
                   help="LoRA files (kohya, comfyui or diffusers keys)")
    p.add_argument("--strengths", "--ratios", nargs="+", type=finite_float,
                   help="one strength per LoRA (default 1.0 each)")
    p.add_argument("--save_to", required=True, help="output .safetensors file")
    p.add_argument("--dit", help="base DiT: a file or a folder of shards, any layout "
                   "(official, ComfyUI, diffusers, fp8)")
    p.add_argument("--save_precision", help=f"merged DiT: {', '.join(DIT_PRECISIONS)} (default bf16); "
                   f"merged LoRA: {', '.join(SAVE_DTYPES)} (default fp32)")
    p.add_argument("--expert", choices=EXPERTS, help="the A14B expert the DiT is (default: from its path); "
                   "a LoRA for the other expert gives a warning")
    p.add_argument("--task", help="WAN task, to check the DiT against (e.g. t2v-A14B)")
    p.add_argument("--merge_into_lora", action="store_true", help="merge the LoRAs into one LoRA file (exact)")
    p.add_argument("--new_rank", type=positive_int, help="with --merge_into_lora: SVD-reduce to this rank")
    p.add_argument("--dynamic_method", choices=DYNAMIC_METHODS, help="with --merge_into_lora: dynamic rank")
    p.add_argument("--dynamic_param", type=positive_float, help="the dynamic method's parameter")
    p.add_argument("--format", default="kohya", choices=FORMATS, help="key format of a merged LoRA")
    p.add_argument("--device", default="cpu", help="where to compute (cpu, cuda)")
    return p


def main(argv: list[str] | None = None) -> int:
    from library.lora_tools.merge import merge_into_dit
    from networks.merge import merge_lora_files
    from networks.resize import SAVE_DTYPES, format_report

    logging.basicConfig(level=logging.INFO, format="%(levelname)s: %(message)s")
    parser = build_parser()
    args = parser.parse_args(argv)
    strengths = args.strengths or [1.0] * len(args.loras)
    if len(strengths) != len(args.loras):
        parser.error(f"{len(args.loras)} LoRAs but {len(strengths)} strengths")
    if args.merge_into_lora == bool(args.dit):
        parser.error("give either --dit (merge into a DiT) or --merge_into_lora")
    if args.merge_into_lora and args.save_precision not in (None, *SAVE_DTYPES):
        parser.error(f"a merged LoRA is saved as {', '.join(SAVE_DTYPES)}")
    loras = list(zip(args.loras, strengths))
    if args.merge_into_lora:  # a bad file or DiT: exit 2 (run_cli)
        report = merge_lora_files(loras, args.save_to, args.new_rank, args.dynamic_method, args.dynamic_param,
                                  args.format, SAVE_DTYPES.get(args.save_precision), args.device)
        if report.ranks:
            print(format_report(report.ranks))
    else:
        report = merge_into_dit(args.dit, loras, args.save_to, args.save_precision or "bf16", args.device,
                                args.expert, args.task)
    print(f"wrote {report.output} ({report.merged_modules} LoRA module deltas, {len(report.warnings)} warnings)")
    return 0


if __name__ == "__main__":
    from library.errors import run_cli

    sys.exit(run_cli(main))

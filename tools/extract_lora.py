"""Extract a WAN LoRA from a fine-tuned DiT and its base (SVD of each target layer's weight difference).

    python tools/extract_lora.py --model_org base.safetensors --model_tuned tuned/ --save_to style.safetensors \
        --dim 32 [--dynamic_method sv_fro --dynamic_param 0.95] [--expert high_noise] [--device cuda]

Both models may be in any layout (file or shards; official, ComfyUI, diffusers, fp8, fp8_scaled). The LoRA
targets are those networks.lora_wan trains. With --expert the file is named `..._<expert>.safetensors`
and its metadata says which A14B expert it is for. On the CPU a full SVD of a 14B model takes long:
use --device cuda, or --lowrank_svd.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this repo's packages first


def main(argv: list[str] | None = None) -> int:
    from library.errors import finite_float, positive_float, positive_int
    from library.lora_tools.extract import extract_lora
    from networks.extract import expert_path
    from networks.merge import EXPERTS
    from networks.resize import DYNAMIC_METHODS, SAVE_DTYPES, format_report

    logging.basicConfig(level=logging.INFO, format="%(levelname)s: %(message)s")
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model_org", required=True, help="the base DiT (file or folder)")
    parser.add_argument("--model_tuned", required=True, help="the fine-tuned DiT (file or folder)")
    parser.add_argument("--save_to", required=True, help="output LoRA .safetensors")
    parser.add_argument("--dim", type=positive_int, default=32,
                        help="rank (the ceiling with a dynamic method; default 32)")
    parser.add_argument("--dynamic_method", choices=DYNAMIC_METHODS, help="choose each module's rank from its "
                        "spectrum (see tools/resize_lora.py --help)")
    parser.add_argument("--dynamic_param", type=positive_float, help="the dynamic method's X")
    parser.add_argument("--clamp_quantile", type=positive_float, default=0.99, help="clamp factor entries to this "
                        "quantile (Kohya; 1 = off; default 0.99)")
    parser.add_argument("--min_diff", type=finite_float, default=1e-6, help="skip layers whose difference is below "
                        "this fraction of the base weight's norm (default 1e-6)")
    parser.add_argument("--format", default="kohya", choices=("kohya", "comfyui"), help="key format (default kohya)")
    parser.add_argument("--expert", choices=EXPERTS, help="WAN 2.2 A14B expert the models are")
    parser.add_argument("--task", help="WAN task, when shapes are ambiguous (t2v-A14B and t2v-14B share them)")
    parser.add_argument("--save_precision", default="fp32", choices=tuple(SAVE_DTYPES), help="dtype (default fp32)")
    parser.add_argument("--device", default="cpu", help="where to compute the SVDs (cpu, cuda)")
    parser.add_argument("--lowrank_svd", action="store_true", help="randomised torch.svd_lowrank: faster, approximate")
    parser.add_argument("--verbose", action="store_true", help="print every module's rank and retained norm")
    args = parser.parse_args(argv)
    out = expert_path(args.save_to, args.expert)
    report = extract_lora(args.model_org, args.model_tuned, out, args.dim, args.dynamic_method,
                          args.dynamic_param, args.clamp_quantile, args.min_diff, args.device, args.format,
                          args.expert, args.task, SAVE_DTYPES[args.save_precision], args.lowrank_svd)
    print(format_report(report.ranks, args.verbose))
    print(f"{len(report.skipped)} target layers unchanged (skipped); wrote {out} ({report.variant})")
    return 0


if __name__ == "__main__":
    from library.errors import run_cli

    sys.exit(run_cli(main))

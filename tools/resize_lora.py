"""Reduce a WAN LoRA's rank by SVD of each module's delta (fixed rank, or a dynamic rank per module).

    python tools/resize_lora.py --model in.safetensors --save_to out.safetensors --new_rank 16
    python tools/resize_lora.py --model in.safetensors --save_to out.safetensors --dynamic_method sv_fro \
        --dynamic_param 0.9 [--new_rank 64]

Dynamic methods (Kohya's meanings; --new_rank is then the largest rank kept, never above the old):
  sv_ratio X       keep singular values >= largest / X (X >= 1)
  sv_fro X         smallest rank whose delta holds fraction X of the Frobenius norm (0 < X <= 1)
  sv_cumulative X  smallest rank holding fraction X of the sum of singular values (0 < X <= 1)
Alpha becomes the new rank (scale 1) unless --new_alpha; the key format is kept. Per expert file for A14B.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this repo's packages first


def main(argv: list[str] | None = None) -> int:
    from library.errors import positive_float, positive_int
    from networks.convert import FORMATS
    from networks.resize import DYNAMIC_METHODS, SAVE_DTYPES, format_report, resize_lora

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="LoRA .safetensors to resize (any supported format)")
    parser.add_argument("--save_to", required=True, help="output .safetensors file")
    parser.add_argument("--new_rank", type=positive_int, help="the new rank (the ceiling with a dynamic method)")
    parser.add_argument("--new_alpha", type=positive_float,
                        help="alpha of the output (default: the new rank, scale 1)")
    parser.add_argument("--dynamic_method", choices=DYNAMIC_METHODS,
                        help="choose each module's rank from its spectrum")
    parser.add_argument("--dynamic_param", type=positive_float, help="the dynamic method's X")
    parser.add_argument("--save_precision", choices=tuple(SAVE_DTYPES),
                        help="dtype of the output (default: the input's)")
    parser.add_argument("--format", choices=FORMATS, help="key format of the output (default: the input's)")
    parser.add_argument("--device", default="cpu", help="where to compute the SVDs (cpu, cuda)")
    parser.add_argument("--verbose", action="store_true", help="print every module's rank and retained norm")
    args = parser.parse_args(argv)
    if args.new_rank is None and args.dynamic_method is None:
        parser.error("give --new_rank, or --dynamic_method with --dynamic_param")
    report = resize_lora(args.model, args.save_to, args.new_rank, args.dynamic_method, args.dynamic_param,
                         args.new_alpha, args.device, args.format, SAVE_DTYPES.get(args.save_precision))
    print(format_report(report, args.verbose))
    print(f"wrote {args.save_to}")
    return 0


if __name__ == "__main__":
    from library.errors import run_cli

    sys.exit(run_cli(main))

"""Convert a WAN LoRA between key formats: kohya (musubi), comfyui, diffusers.

    python tools/convert_lora.py IN.safetensors OUT.safetensors --format comfyui [--dtype bf16]

Reads any of the three; per-expert files of WAN 2.2 A14B convert one at a time (their metadata is kept).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this repo's packages first


def main(argv: list[str] | None = None) -> int:
    import torch

    from networks.convert import FORMATS, convert_lora

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("input", help="LoRA .safetensors in any supported format")
    parser.add_argument("output", help="where to write the converted file")
    parser.add_argument("--format", required=True, choices=FORMATS, help="key format to write")
    parser.add_argument("--dtype", choices=("fp32", "fp16", "bf16"), help="cast the tensors (default: keep)")
    args = parser.parse_args(argv)
    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}.get(args.dtype)
    out = convert_lora(args.input, args.output, args.format, dtype)  # a bad file: exit 2 (run_cli)
    print(f"wrote {out} ({args.format})")
    return 0


if __name__ == "__main__":
    from library.errors import run_cli

    sys.exit(run_cli(main))

"""Render every saved LoRA checkpoint of a training run with the same prompts and seeds, in one grid by step.

    python tools/compare_checkpoints.py OUTPUT_DIR --task t2v-A14B --dit low.safetensors \\
        --dit_high_noise high.safetensors --vae wan_2.1_vae.safetensors --t5 umt5.pth \\
        --from_file prompts.txt --seed 42 --include_base

Writes OUTPUT_DIR/compare/checkpoints_<time>.mp4 / .png / .json / .html (the grid as a page, a video per
cell, in the style of report.html). The work is done in
`library/sampling/commands.py`.
"""

import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # our `library`, not sd-scripts' package

from library.errors import run_cli  # noqa: E402
from library.evaluation.compare import compare_parser, run_compare  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    return run_compare(compare_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(run_cli(main))

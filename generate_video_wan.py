"""Generate WAN videos: T2V / I2V / TI2V for every variant, LoRA stacking, strength sweeps against the base.

    python generate_video_wan.py --task t2v-A14B --dit low.safetensors --dit_high_noise high.safetensors \\
        --vae wan_2.1_vae.safetensors --t5 umt5-xxl-enc-bf16.pth --prompt "a cat walks on grass" \\
        --lora my_lora_high_noise.safetensors:0.9 --lora_strength_sweep 0.5,0.7,0.9,1.0 --compare_base

musubi-tuner's `wan_generate_video.py` command lines run unchanged (`--video_size 480 832 --video_length 81
--infer_steps 40 --save_path out --lora_weight a.safetensors --lora_multiplier 1.0 --output_type both ...`);
`wan_generate_video.py` beside this file is the same program under musubi's name.

Writes MP4 (H.264), a PNG contact sheet and a JSON sidecar per video (or per grid), or PNG frames or
latent files (`--output_type`), into --output_dir (`--save_path`). The work is done in
`library/sampling/commands.py` (and `library/lora_tools/generation.py` for `--save_merged_model`).
"""

import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # our `library`, not sd-scripts' package of that name

from library.errors import run_cli  # noqa: E402
from library.sampling.commands import generate_parser, run_generate  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = generate_parser().parse_args(argv)
    if args.save_merged_model:
        from library.lora_tools.generation import save_merged_model

        return save_merged_model(args)
    return run_generate(args)


if __name__ == "__main__":
    sys.exit(run_cli(main))

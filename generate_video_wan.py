"""Generate WAN videos: T2V / I2V / TI2V for every variant, LoRA stacking, strength sweeps against the base.

    python generate_video_wan.py --task t2v-A14B --dit low.safetensors --dit_high_noise high.safetensors \\
        --vae wan_2.1_vae.safetensors --t5 umt5-xxl-enc-bf16.pth --prompt "a cat walks on grass" \\
        --lora my_lora_high_noise.safetensors:0.9 --lora_strength_sweep 0.5,0.7,0.9,1.0 --compare_base

Writes MP4 (H.264), a PNG contact sheet and a JSON sidecar per video (or per grid) into --output_dir.
The work is done in `library/sampling/commands.py`.
"""

import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # our `library`, not sd-scripts' package of that name

from library.sampling.commands import generate_parser, run_generate  # noqa: E402

if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    sys.exit(run_generate(generate_parser().parse_args()))

"""musubi-tuner's name for `generate_video_wan.py`: the same program, for command lines and GUIs that call
`wan_generate_video.py` (every flag of musubi's script is read; see `library/sampling/musubi.py`).

    python wan_generate_video.py --task t2v-1.3B --video_size 480 832 --video_length 81 --infer_steps 20 \\
        --prompt "a cat walks on grass" --save_path out --output_type both --dit wan2.1_t2v_1.3B_bf16.safetensors \\
        --vae wan_2.1_vae.safetensors --t5 models_t5_umt5-xxl-enc-bf16.pth --attn_mode torch
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # our `library`, not sd-scripts' package of that name

from generate_video_wan import main  # noqa: E402
from library.errors import run_cli  # noqa: E402

if __name__ == "__main__":
    sys.exit(run_cli(main))

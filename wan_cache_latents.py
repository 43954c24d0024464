"""musubi-tuner's name for this trainer's latent caching tool, so musubi-tuner-gui and musubi-tuner command
lines run it unchanged:

    python wan_cache_latents.py --dataset_config D --vae Wan2.1_VAE.pth [--vae_dtype float16 --device cuda ...]

It runs exactly what `tools/cache_latents.py` (the primary name) runs; every musubi-tuner flag is accepted
(used, or logged as skipped).
"""

import runpy
import sys
from pathlib import Path

if __name__ == "__main__":
    sys.argv[0] = str(Path(__file__).resolve().parent / "tools" / "cache_latents.py")
    runpy.run_path(sys.argv[0], run_name="__main__")

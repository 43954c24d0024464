"""musubi-tuner's name for this trainer's text-encoder caching tool, so musubi-tuner-gui and musubi-tuner
command lines run it unchanged:

    python wan_cache_text_encoder_outputs.py --dataset_config D --t5 models_t5_umt5-xxl-enc-bf16.pth [--fp8_t5]

It runs exactly what `tools/cache_text_encoder_outputs.py` (the primary name) runs; every musubi-tuner flag is
accepted (used, or logged as skipped).
"""

import runpy
import sys
from pathlib import Path

if __name__ == "__main__":
    sys.argv[0] = str(Path(__file__).resolve().parent / "tools" / "cache_text_encoder_outputs.py")
    runpy.run_path(sys.argv[0], run_name="__main__")

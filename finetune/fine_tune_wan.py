"""Full fine-tuning of a WAN DiT: the model's own weights train, not a LoRA.

    accelerate launch finetune/fine_tune_wan.py --config_file my_finetune.toml [--flag value ...]

The flags and TOML are the LoRA trainer's (`python finetune/fine_tune_wan.py --help`) with
`full_fine_tune` on, plus `full_bf16`, `fused_backward_pass`, `trainable_patterns`, `frozen_patterns` and
`save_model_format`. The result is a whole DiT file per expert (`{output_name}.safetensors`, or
`..._high_noise` / `..._low_noise`) that loads wherever the original does (ComfyUI, our generator).
"""

from __future__ import annotations

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # this repo's `library`, never sd-scripts' one


def main(argv: list[str] | None = None) -> int:
    from library.training.cli import main as train

    return train(argv, full_fine_tune=True, usage=__doc__)


if __name__ == "__main__":
    sys.exit(main())

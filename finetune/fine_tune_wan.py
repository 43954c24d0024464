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
    import train_network_wan

    args = sys.argv[1:] if argv is None else list(argv)
    if "--help" in args or "-h" in args:
        print(__doc__)
    return train_network_wan.main(["--full_fine_tune", *args])


if __name__ == "__main__":
    sys.exit(main())

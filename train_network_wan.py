"""Train a LoRA on a WAN DiT from cached latents and text.

    accelerate launch train_network_wan.py --config_file my_lora.toml [--flag value ...]

Flags are musubi-tuner's / Kohya's (`python train_network_wan.py --help`); the TOML may be flat, as the
Kohya GUIs write it, or use one level of sections. `--output_config FILE` writes the resolved config and
exits without training.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # this repo's `library`, never sd-scripts' one


def main(argv: list[str] | None = None) -> int:
    from library.training.cli import main as train

    return train(argv)


if __name__ == "__main__":
    sys.exit(main())

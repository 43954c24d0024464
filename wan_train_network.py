"""musubi-tuner's name for this trainer's LoRA training entry, so musubi-tuner-gui and musubi-tuner command
lines run it unchanged:

    accelerate launch wan_train_network.py --config_file my_lora.toml

It runs exactly what `train_network_wan.py` (the primary name) runs: same flags, same config, same result.
Put this checkout where musubi-tuner-gui expects musubi-tuner (README: "Switching from musubi-tuner / its GUI").
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # this repo's `library`, never sd-scripts' one


def main(argv: list[str] | None = None) -> int:
    from train_network_wan import main as train

    return train(argv)


if __name__ == "__main__":
    sys.exit(main())

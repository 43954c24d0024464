"""Train a LoRA on a WAN DiT from cached latents and text.

    accelerate launch train_network_wan.py --config_file my_lora.toml [--flag value ...]

Flags are musubi-tuner's / Kohya's (`python train_network_wan.py --help`); the TOML may be flat, as the
Kohya GUIs write it, or use one level of sections. `--output_config FILE` writes the resolved config and
exits without training.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # this repo's `library`, never sd-scripts' one


def main(argv: list[str] | None = None) -> int:
    from library.config import ConfigError, load_config, save_config, validate

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        cfg = validate(load_config(sys.argv[1:] if argv is None else argv))
    except ConfigError as exc:
        print(f"config error: {exc}", file=sys.stderr)
        return 2
    if cfg.run.output_config:
        print(f"wrote {save_config(cfg, cfg.run.output_config)}")
        return 0
    from library.training.trainer import Trainer

    return Trainer(cfg).run()


if __name__ == "__main__":
    sys.exit(main())

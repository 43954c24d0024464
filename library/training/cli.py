"""The command line of both training entry scripts (`train_network_wan.py` for LoRA,
`finetune/fine_tune_wan.py` for full fine-tuning): config from TOML and flags, validated before anything
loads, `--output_config` to write it without training, then the run."""

from __future__ import annotations

import logging
import sys

from library.config import ConfigError, load_config, save_config, validate


def main(argv: list[str] | None = None, full_fine_tune: bool = False, usage: str | None = None) -> int:
    """Run a training from command-line arguments; 2 on a config mistake, 130 when interrupted."""
    args = list(sys.argv[1:] if argv is None else argv)
    if usage and ("--help" in args or "-h" in args):
        print(usage)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        cfg = validate(load_config(["--full_fine_tune", *args] if full_fine_tune else args))
    except ConfigError as exc:
        print(f"config error: {exc}", file=sys.stderr)
        return 2
    if cfg.run.output_config:
        print(f"wrote {save_config(cfg, cfg.run.output_config)}")
        return 0
    from .trainer import Trainer  # torch, accelerate and the models only when training

    return Trainer(cfg).run()

"""Use-case presets from the training guide: `preset = "character" | "style" | "motion" | "domain"` fills
rank, alpha, learning rate, epochs, scheduler and warmup; any key set explicitly (TOML or command line)
wins. The guide's tables, condensed:

| preset    | dim | alpha | lr     | epochs | schedule                        | warmup |
|-----------|-----|-------|--------|--------|---------------------------------|--------|
| character | 64  | 64    | 1.5e-4 | 15     | cosine_with_restarts, 3 cycles  | 5%     |
| style     | 96  | 96    | 1e-4   | 20     | cosine_with_restarts, 3 cycles  | 5%     |
| motion    | 128 | 128   | 8e-5   | 25     | cosine_with_restarts, 3 cycles  | 5%     |
| domain    | 96  | 96    | 1e-4   | 12     | cosine_with_restarts, 3 cycles  | 5%     |

(domain: the guide gives lr 8e-5 to 1.2e-4 and, for its 400-800 sample datasets, rank 64-96 and 10-15
epochs; we take the middle.) Minimum dataset sizes per goal are here too, for the start-of-run report.
"""

from __future__ import annotations

import logging
from typing import Any

from library.guide import LR_RANGE, MINIMUM_SAMPLES  # noqa: F401  (re-exported for callers)

logger = logging.getLogger(__name__)

_SCHEDULE = {"lr_scheduler": "cosine_with_restarts", "lr_scheduler_num_cycles": 3, "lr_warmup_steps": 0.05}

PRESETS: dict[str, dict[str, Any]] = {
    "character": {"network_dim": 64, "network_alpha": 64.0, "learning_rate": 1.5e-4, "max_train_epochs": 15,
                  **_SCHEDULE},
    "style": {"network_dim": 96, "network_alpha": 96.0, "learning_rate": 1e-4, "max_train_epochs": 20, **_SCHEDULE},
    "motion": {"network_dim": 128, "network_alpha": 128.0, "learning_rate": 8e-5, "max_train_epochs": 25, **_SCHEDULE},
    "domain": {"network_dim": 96, "network_alpha": 96.0, "learning_rate": 1e-4, "max_train_epochs": 12, **_SCHEDULE},
}

def apply_preset(values: dict[str, Any]) -> dict[str, Any]:
    """Fill the preset's keys that `values` (the explicitly set, coerced keys) does not set. Logs what it
    filled and what was kept; returns the new values."""
    name = values.get("preset") or ""
    if not name:
        return values
    preset = PRESETS[name]
    filled = {k: v for k, v in preset.items() if k not in values}
    kept = {k: values[k] for k in preset if k in values}
    if filled:
        logger.info("preset %s sets %s", name, ", ".join(f"{k} = {v}" for k, v in filled.items()))
    if kept:
        logger.info("preset %s: explicit values kept for %s", name, ", ".join(f"{k} = {v}" for k, v in kept.items()))
    return {**values, **filled}

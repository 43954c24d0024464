"""The start-of-run report: the dataset and the settings compared with the training guide's tables.

It never changes a setting; it prints what it sees and warns where the run disagrees with the guide
(sample count against the goal's minimum, rank against dataset size, epochs and total steps, learning
rate against the goal's range).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from library.guide import EPOCHS_BY_SIZE, LR_RANGE, MINIMUM_SAMPLES, RANK_BY_SIZE, row_for

logger = logging.getLogger(__name__)

@dataclass(frozen=True)
class RunFacts:
    images: int
    clips: int
    network_dim: int
    epochs: int
    total_steps: int
    learning_rate: float
    preset: str = ""


def report(facts: RunFacts) -> tuple[list[str], list[str]]:
    """(lines describing the run, warnings)."""
    samples = facts.images + facts.clips
    rank_lo, rank_hi = row_for(RANK_BY_SIZE, samples)
    ep_lo, ep_hi = row_for(EPOCHS_BY_SIZE, samples)
    lines = [
        f"dataset: {samples} samples ({facts.images} images, {facts.clips} clips)",
        (f"rank {facts.network_dim} (guide for {samples} samples: {rank_lo}-{rank_hi}), " if facts.network_dim
         else "full fine-tuning, ") + f"{facts.epochs} epochs "
        f"(guide: {ep_lo}-{ep_hi}), {facts.total_steps} steps, learning rate {facts.learning_rate:g}",
    ]
    warnings = []
    if facts.preset in MINIMUM_SAMPLES:
        min_images, min_clips = MINIMUM_SAMPLES[facts.preset]
        enough = facts.clips >= min_clips or (min_images is not None and facts.images >= min_images)
        if not enough:
            need = f"{min_images} images or {min_clips} clips" if min_images else f"{min_clips} clips"
            warnings.append(f"{facts.preset}: the guide's minimum is {need}; this dataset has {facts.images} images "
                            f"and {facts.clips} clips. Expect weak results; collect more (2-3x, then filter)")
        lr_lo, lr_hi = LR_RANGE[facts.preset]
        if not lr_lo <= facts.learning_rate <= lr_hi:
            warnings.append(f"learning rate {facts.learning_rate:g} is outside the guide's {lr_lo:g}-{lr_hi:g} "
                            f"for {facts.preset}")
    if not facts.network_dim:  # full fine-tuning: no rank to judge
        pass
    elif facts.network_dim > rank_hi * 1.5:
        warnings.append(f"rank {facts.network_dim} is high for {samples} samples (guide: {rank_lo}-{rank_hi}): "
                        "high rank on little data overfits (memorised poses)")
    elif facts.network_dim < rank_lo / 2:
        warnings.append(f"rank {facts.network_dim} is low for {samples} samples (guide: {rank_lo}-{rank_hi}): "
                        "the LoRA may undertrain")
    if facts.epochs > ep_hi * 1.5:
        warnings.append(f"{facts.epochs} epochs is many for {samples} samples (guide: {ep_lo}-{ep_hi}); the best "
                        "checkpoint is often at 60-80% of training: save every 500-1000 steps and compare")
    return lines, warnings


def log_report(facts: RunFacts) -> list[str]:
    lines, warnings = report(facts)
    for line in lines:
        logger.info(line)
    for warning in warnings:
        logger.warning(warning)
    return warnings

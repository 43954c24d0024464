"""`generate_video_wan.py --save_merged_model PATH` (musubi-tuner's flag): the command line's LoRAs merged
into the DiT file(s) and written, nothing rendered.

The merge is `merge.merge_into_dit`, one tensor at a time from the DiT file (any layout; bf16 output, as
musubi-tuner saves the model in its loading dtype), with each LoRA at its multiplier and its
include / exclude patterns. One DiT: `PATH`. WAN 2.2 A14B with `--dit_high_noise`: each expert with its own
LoRAs (`--lora_weight` for `--dit`, `--lora_weight_high_noise` for the high-noise one, `--lora` files by
their names) into `STEM_low_noise.safetensors` and `STEM_high_noise.safetensors` beside `PATH` (an expert
without LoRAs gets no file, with a warning).
"""

from __future__ import annotations

import logging
from pathlib import Path

from library.sampling.commands import check_command
from library.sampling.loras import assign_experts
from library.sampling.musubi import lora_specs

from .merge import merge_into_dit

logger = logging.getLogger(__name__)


def merged_model_paths(path: str | Path, experts: list[str]) -> dict[str, Path]:
    """Where each expert's merged DiT goes."""
    path = Path(path).expanduser()
    if experts == ["dit"] or len(experts) == 1:
        return {experts[0]: path}
    return {e: path.with_name(f"{path.stem}_{e}{path.suffix or '.safetensors'}") for e in experts}


def save_merged_model(args) -> int:
    """Merge and write; the exit code (2 for a bad argument or file)."""
    try:
        variant = check_command(args)
        specs = lora_specs(args, variant.two_experts)
        if not specs:
            raise ValueError("--save_merged_model needs LoRAs to merge (--lora_weight or --lora)")
        dits = {"low_noise": args.dit, "high_noise": args.dit_high_noise} if variant.two_experts else {"dit": args.dit}
        dits = {e: p for e, p in dits.items() if p}
        outputs = merged_model_paths(args.save_merged_model, list(dits))
        per_expert: dict[str, list] = {e: [] for e in dits}
        for spec, expert in assign_experts(specs, list(dits)):
            per_expert[expert].append(spec)
        for expert, dit in dits.items():
            chosen = per_expert[expert]
            if not chosen:
                logger.warning("no LoRA for the %s expert: no merged file is written for it", expert)
                continue
            report = merge_into_dit(dit, [(s.path, s.strength) for s in chosen], outputs[expert], "bf16",
                                    expert=None if expert == "dit" else expert, task=variant.name,
                                    patterns=[(s.include, s.exclude) for s in chosen])
            logger.info("wrote %s (%d LoRA module deltas)", report.output, report.merged_modules)
    except (ValueError, OSError) as exc:
        logger.error("%s", exc)
        return 2
    return 0

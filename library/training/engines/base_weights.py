"""`base_weights`: LoRA files merged into the DiT before training (Kohya's meaning), each at its
`base_weights_multiplier` strength (1.0 when not given).

The files are checked against the model exactly like LoRAs for generation (a LoRA for another variant is
an error naming the modules that do not fit). With WAN 2.2 A14B, a per-expert file
(`NAME_high_noise.safetensors`, or `ss_expert` metadata) goes to its own expert and brings its partner
file along; a file without an expert goes to both. The merge happens in the base weights' precision
before any fp8 conversion, so `fp8_base` quantises the merged weights.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from library.sampling.loras import LoraSpec, assign_experts, attach_loras

logger = logging.getLogger(__name__)


def assign_base_weights(network_args, expert_names: list[str]) -> list[tuple[object, str]]:
    """(LoraSpec, expert) pairs of the configured `base_weights`, over every expert of the run."""
    files = network_args.base_weights
    if not files:
        return []
    strengths = list(network_args.base_weights_multiplier) or [1.0] * len(files)
    specs = [LoraSpec(Path(f).expanduser(), float(m)) for f, m in zip(files, strengths)]
    return assign_experts(specs, expert_names)


@torch.no_grad()
def merge_base_weights(model: torch.nn.Module, expert: str, assigned: list[tuple[object, str]], variant) -> int:
    """Merge this expert's share of `assigned` into `model`'s weights; returns the number of files merged."""
    mine = [(spec, name) for spec, name in assigned if name == expert]
    if not mine:
        return 0
    for lora in attach_loras([], {expert: model}, variant, assigned=mine):
        lora.network.merge_to()  # adds each delta into its Linear weight and removes the hook
        logger.info("base_weights: merged %s into the %s DiT at strength %g (%d modules)", lora.spec.path.name,
                    expert, lora.spec.strength, lora.report.applied)
    return len(mine)

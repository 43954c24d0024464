"""The DiT experts of a run and which one trains on which timesteps.

WAN 2.2 A14B has a high-noise expert (t >= boundary * 1000) and a low-noise expert (t < boundary * 1000).
With `dit` and `dit_high_noise` both given, each step first picks the expert from the configured timestep
distribution, then draws the whole batch from that expert's range with the distribution's shape kept, so
each expert sees exactly its share of the distribution. One expert alone gets its range from the boundary;
a `min_timestep` / `max_timestep` that contradicts it is an error. Every other model is one expert with the
configured range.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace

import torch

from library.wan.model import WanModel
from library.wan.variants import WanVariant

from .flow_matching import TimestepSampler

logger = logging.getLogger(__name__)


@dataclass
class Expert:
    name: str  # "low_noise", "high_noise" or "dit"
    model: WanModel
    sampler: TimestepSampler  # draws this expert's noise levels
    learning_rate: float
    network_dim: int
    network: object = None  # the LoRA network attached to `model`

    @property
    def suffix(self) -> str:
        """File-name suffix of this expert's LoRA: `_high_noise`, `_low_noise`, or none."""
        return "" if self.name == "dit" else f"_{self.name}"


def boundary_of(variant: WanVariant, configured: float | None) -> float | None:
    """The expert switch as a fraction in (0, 1): the configured one or the variant's default."""
    return configured if configured is not None else variant.boundary


def expert_ranges(variant: WanVariant, boundary: float | None, have_low: bool, have_high: bool,
                  min_t: float | None, max_t: float | None) -> dict[str, tuple[float, float]]:
    """Timestep ranges (0..1000) per expert name, checked against any configured min / max."""
    lo, hi = (0.0 if min_t is None else float(min_t)), (1000.0 if max_t is None else float(max_t))
    if not variant.two_experts:
        return {"dit": (lo, hi)}
    if boundary is None:
        raise ValueError(f"{variant.name} has two experts but no timestep_boundary is known; set timestep_boundary")
    b = boundary * 1000.0
    ranges = {}
    if have_low:
        ranges["low_noise"] = (lo, min(hi, b))
    if have_high:
        ranges["high_noise"] = (max(lo, b), hi)
    for name, (a, z) in ranges.items():
        if a >= z:
            raise ValueError(
                f"min_timestep / max_timestep ({min_t}, {max_t}) leave no timesteps for the {name} expert, which "
                f"owns t {'<' if name == 'low_noise' else '>='} {b:g} (timestep_boundary {boundary}); remove them, "
                "or train the other expert"
            )
    if len(ranges) == 1 and (min_t is not None or max_t is not None):
        (name, (a, z)), = ranges.items()
        if (a, z) != (lo, hi):
            raise ValueError(
                f"training only the {name} expert: its timesteps are {a:g}-{z:g} from timestep_boundary {boundary}, "
                f"but min_timestep / max_timestep say {lo:g}-{hi:g}; remove them (the range is set automatically)"
            )
    return ranges


def make_samplers(base: TimestepSampler, ranges: dict[str, tuple[float, float]]) -> dict[str, TimestepSampler]:
    """Per-expert samplers: the base distribution restricted to each range with its shape kept."""
    if len(ranges) == 1:
        (name, (a, z)), = ranges.items()
        keep = base.preserve_distribution_shape or name != "dit"
        return {name: replace(base, min_timestep=a, max_timestep=z, preserve_distribution_shape=keep)}
    return {name: replace(base, min_timestep=a, max_timestep=z, preserve_distribution_shape=True)
            for name, (a, z) in ranges.items()}


def pick_expert(experts: list[Expert], base: TimestepSampler, boundary: float | None, gen: torch.Generator,
                tokens: int | None = None) -> Expert:
    """The expert that trains this step: the owner of one draw from the full distribution."""
    if len(experts) == 1:
        return experts[0]
    sigma = base.sample(1, gen, tokens).item()
    name = "high_noise" if sigma >= boundary else "low_noise"
    return next(e for e in experts if e.name == name)

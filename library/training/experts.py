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

from library.config.schema import TrainConfig
from library.runtime.memory import place_model
from library.wan.conditioning import pick_expert as owner_of

from .engines import TrainableNetwork
from .flow_matching import TimestepSampler

logger = logging.getLogger(__name__)


@dataclass
class Expert:
    name: str  # "low_noise", "high_noise" or "dit"
    model: WanModel
    sampler: TimestepSampler  # draws this expert's noise levels
    learning_rate: float
    network_dim: int
    network: TrainableNetwork | None = None  # what trains on `model`: its LoRA, or its own weights

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


def base_sampler(cfg: TrainConfig) -> TimestepSampler:
    """The configured timestep distribution over the full range (before any expert's restriction)."""
    t = cfg.timesteps
    return TimestepSampler(
        method=t.timestep_sampling, shift=t.discrete_flow_shift, sigmoid_scale=t.sigmoid_scale,
        logit_mean=t.logit_mean, logit_std=t.logit_std, mode_scale=t.mode_scale,
        weighting_scheme=t.weighting_scheme,
        min_timestep=0.0 if t.min_timestep is None else float(t.min_timestep),
        max_timestep=1000.0 if t.max_timestep is None else float(t.max_timestep),
        preserve_distribution_shape=t.preserve_distribution_shape,
    )


class ExpertRouter:
    """Which expert trains a step, which owns a validation noise level, and (with `offload_inactive_dit`)
    keeping only the expert in use on the accelerator."""

    def __init__(self, experts: list[Expert], base: TimestepSampler, boundary: float | None, offload_inactive: bool,
                 device: torch.device):
        self.experts, self.base, self.boundary = experts, base, boundary
        self.offload_inactive, self.device = offload_inactive, device

    def draw(self, gen: torch.Generator, tokens: int | None = None) -> Expert:
        """The expert that trains this step: the owner of one draw from the full distribution."""
        if len(self.experts) == 1:
            return self.experts[0]
        return self.owner(self.base.sample(1, gen, tokens).item())

    def owner(self, sigma: float) -> Expert:
        """The expert that owns noise level `sigma` (0..1)."""
        return owner_of(self.experts, sigma * 1000.0, self.boundary)

    def activate(self, expert: Expert) -> None:
        """With `offload_inactive_dit`, only the expert in use sits on the accelerator."""
        if not self.offload_inactive or len(self.experts) == 1:
            return
        for other in self.experts:
            target = self.device if other is expert else torch.device("cpu")
            if other.model.patch_embedding.weight.device != target:
                place_model(other.model, target)

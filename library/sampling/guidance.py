"""Guidance options of the denoising loop beyond plain CFG, with musubi-tuner's names and meanings.

CFG skip (`cfg_skip_mode`, `cfg_apply_ratio`): CFG runs on a share of the steps only; the other steps use
the conditional flow alone (one DiT pass instead of two). For 10 steps and ratio 0.6 (A = CFG, S = skip):

    early SSSSAAAAAA   late AAAAAASSSS   middle AAASSSSAAA   early_late SSAAAAAASS   alternate SASASAASAS

Skip-layer guidance (`slg_mode`, `slg_layers`, `slg_scale`, `slg_start`, `slg_end`), on the steps
`int(slg_start * N) <= i < int(slg_end * N)` where CFG runs:
    original (SD 3.5):  v = uncond + g * (cond - uncond) + slg_scale * (cond - skip)
    uncond (Wan2GP):    v = skip + g * (cond - skip)
where `skip` is the negative-prompt flow with the `slg_layers` blocks left out (their input passed on).
Blocks are skipped through `WanModel.block_runner` (the hook the model offers around each block), so
block swap keeps working.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

CFG_SKIP_MODES = ("none", "early", "late", "middle", "early_late", "alternate")
SLG_MODES = ("original", "uncond")


@dataclass(frozen=True)
class GuidanceOptions:
    cfg_skip_mode: str = "none"
    cfg_apply_ratio: float | None = None  # None: CFG on every step
    slg_mode: str | None = None  # None: no skip-layer guidance
    slg_layers: tuple[int, ...] = ()
    slg_scale: float = 3.0
    slg_start: float = 0.0
    slg_end: float = 0.3

    def __post_init__(self):
        if self.cfg_skip_mode not in CFG_SKIP_MODES:
            raise ValueError(f"cfg_skip_mode {self.cfg_skip_mode!r}: choose one of {', '.join(CFG_SKIP_MODES)}")
        if self.slg_mode is not None and self.slg_mode not in SLG_MODES:
            raise ValueError(f"slg_mode {self.slg_mode!r}: choose one of {', '.join(SLG_MODES)}")

    @property
    def skips_cfg(self) -> bool:
        return self.cfg_skip_mode != "none" and self.cfg_apply_ratio is not None

    @property
    def uses_slg(self) -> bool:
        return self.slg_mode is not None and bool(self.slg_layers)

    def cfg_steps(self, steps: int) -> list[bool]:
        """Whether CFG runs at each step (musubi-tuner's patterns)."""
        if not self.skips_cfg:
            return [True] * steps
        mode, ratio = self.cfg_skip_mode, self.cfg_apply_ratio
        apply = int(steps * ratio)
        if mode == "alternate":
            out, w = [], 0.0
            for _ in range(steps):
                w += ratio
                out.append(w >= 1.0)
                w -= 1.0 if w >= 1.0 else 0.0
            return out
        if mode == "middle":
            skip = steps - apply
            start = (steps - skip) // 2
            return [not start <= i < start + skip for i in range(steps)]
        start = {"early": steps - apply, "late": 0, "early_late": (steps - apply) // 2}[mode]
        return [start <= i < start + apply for i in range(steps)]

    def slg_steps(self, steps: int) -> list[bool]:
        """Whether skip-layer guidance runs at each step (where CFG also runs)."""
        if not self.uses_slg:
            return [False] * steps
        first, last = int(self.slg_start * steps), int(self.slg_end * steps)
        return [first <= i < last for i in range(steps)]

    def pattern(self, steps: int) -> str:
        """`A` CFG, `S` skipped, `L` CFG with skip-layer guidance: one letter per step, for logs and sidecars."""
        cfg, slg = self.cfg_steps(steps), self.slg_steps(steps)
        return "".join("L" if c and s else "A" if c else "S" for c, s in zip(cfg, slg))

    def record(self) -> dict:
        out = {}
        if self.skips_cfg:
            out.update(cfg_skip_mode=self.cfg_skip_mode, cfg_apply_ratio=self.cfg_apply_ratio)
        if self.uses_slg:
            out.update(slg_mode=self.slg_mode, slg_layers=list(self.slg_layers), slg_scale=self.slg_scale,
                       slg_start=self.slg_start, slg_end=self.slg_end)
        return out


class _SkipRunner:
    """A `block_runner` that passes the input of the skipped blocks on and runs the others as before."""

    def __init__(self, inner, skip: frozenset[int]):
        self.inner, self.skip = inner, skip

    def run(self, i: int, block, args: tuple, run_block) -> torch.Tensor:
        def maybe(blk, a):
            return a[0] if i in self.skip else run_block(blk, a)

        if self.inner is not None:
            return self.inner.run(i, block, args, maybe)
        return maybe(block, args)


@contextlib.contextmanager
def skipping_blocks(model, layers: tuple[int, ...]):
    """Run `model` with the blocks `layers` left out (their input passed on unchanged)."""
    if not layers:
        yield model
        return
    inner = model.block_runner
    model.block_runner = _SkipRunner(inner, frozenset(layers))
    try:
        yield model
    finally:
        model.block_runner = inner

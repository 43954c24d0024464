"""Samplers over a flow-matching schedule: Euler, UniPC (bh2) and DPM++ 2M, in the data-prediction form.

Every solver gets, at step i, the current sample x at sigmas[i] and the model's flow v, and returns the
sample at sigmas[i + 1]. The flow gives the clean-data estimate x0 = x - sigma * v. The multistep solvers
work in log-SNR time, lambda(sigma) = log((1 - sigma) / sigma), with alpha = 1 - sigma; a step of size
h = lambda_next - lambda_i advances the exact linear part with the ratio sigma_next / sigma_i and folds the
x0 estimates in through phi(h) = exp(-h) - 1:
    first order:  x_next = (sigma_next / sigma_i) * x - alpha_next * phi * x0_i
UniPC adds a second-order predictor (a finite difference of the last two x0 estimates) and, from step 1
on, a corrector that re-does the previous step with the x0 estimate made at its end (B(h) = exp(-h) - 1,
"bh2"). Both multistep solvers warm up at order 1 and drop to order 1 on the final step (to sigma 0).
Coefficients are computed in float64; tensors keep their dtype (fp32 latents).
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod

import torch

from .schedules import FlowSchedule


def _lam(sigma: float) -> float:
    """log-SNR of a flow noise level; -inf at sigma = 1, +inf at sigma = 0."""
    if sigma >= 1.0:
        return -math.inf
    if sigma <= 0.0:
        return math.inf
    return math.log1p(-sigma) - math.log(sigma)


def _phi(sigma_from: float, sigma_to: float) -> float:
    """exp(-h) - 1 for the step sigma_from -> sigma_to, finite at both ends of the schedule."""
    h = _lam(sigma_to) - _lam(sigma_from)
    return -1.0 if math.isinf(h) else math.expm1(-h)


class FlowSolver(ABC):
    """Base: holds the schedule; `step(i, x, flow)` returns the sample at sigmas[i + 1]."""

    name = "base"

    def __init__(self, schedule: FlowSchedule):
        self.schedule = schedule
        self.sigmas = [float(s) for s in schedule.sigmas]

    @abstractmethod
    def step(self, i: int, x: torch.Tensor, flow: torch.Tensor) -> torch.Tensor:
        """The sample at sigmas[i + 1] from the sample x at sigmas[i] and the model's flow there."""

    def x0(self, i: int, x: torch.Tensor, flow: torch.Tensor) -> torch.Tensor:
        return x - self.sigmas[i] * flow


class EulerSolver(FlowSolver):
    """x_next = x + (sigma_next - sigma) * v: the straight line the flow points along."""

    name = "euler"

    def step(self, i: int, x: torch.Tensor, flow: torch.Tensor) -> torch.Tensor:
        return (x.float() + (self.sigmas[i + 1] - self.sigmas[i]) * flow.float()).to(x.dtype)


class DPMPP2MSolver(FlowSolver):
    """DPM-Solver++ 2M (midpoint form): x_next = first-order step - 0.5 * alpha_next * phi * D1,
    D1 = (x0_i - x0_{i-1}) / r, r = h_prev / h."""

    name = "dpm++"

    def __init__(self, schedule: FlowSchedule):
        super().__init__(schedule)
        self.prev_x0: torch.Tensor | None = None

    def step(self, i: int, x: torch.Tensor, flow: torch.Tensor) -> torch.Tensor:
        s, s_next = self.sigmas[i], self.sigmas[i + 1]
        x0 = self.x0(i, x.float(), flow.float())
        phi, alpha_next = _phi(s, s_next), 1.0 - s_next
        out = (s_next / s) * x.float() - alpha_next * phi * x0
        last = i == len(self.sigmas) - 2
        if self.prev_x0 is not None and not last and self.sigmas[i - 1] < 1.0:
            r = (_lam(s) - _lam(self.sigmas[i - 1])) / (_lam(s_next) - _lam(s))
            out = out - 0.5 * alpha_next * phi * (x0 - self.prev_x0) / r
        self.prev_x0 = x0
        return out.to(x.dtype)


class UniPCSolver(FlowSolver):
    """UniPC, B(h) = exp(-h) - 1 ("bh2"), order 2, data prediction, corrector on every step after the first."""

    name = "unipc"

    def __init__(self, schedule: FlowSchedule):
        super().__init__(schedule)
        self.history: list[tuple[int, torch.Tensor]] = []  # (step index, x0 estimate), newest last
        self.last_input: torch.Tensor | None = None  # the sample the previous predictor started from
        self.last_order = 0

    def _linear(self, a: int, b: int, x: torch.Tensor, x0: torch.Tensor) -> tuple[torch.Tensor, float]:
        """First-order step a -> b and its B(h) coefficient scaled by alpha_b."""
        s_a, s_b = self.sigmas[a], self.sigmas[b]
        phi = _phi(s_a, s_b)
        return (s_b / s_a) * x - (1.0 - s_b) * phi * x0, (1.0 - s_b) * phi

    def _ratio(self, older: int, a: int, b: int) -> float:
        """r = (lambda_older - lambda_a) / (lambda_b - lambda_a)."""
        return (_lam(self.sigmas[older]) - _lam(self.sigmas[a])) / (_lam(self.sigmas[b]) - _lam(self.sigmas[a]))

    def _correct(self, i: int, x: torch.Tensor, x0_now: torch.Tensor) -> torch.Tensor:
        """Redo step i-1 -> i from the stored input, now knowing the x0 estimate at step i."""
        (j, m0) = self.history[-1]
        out, coef = self._linear(j, i, self.last_input, m0)
        if self.last_order == 1:
            return out - coef * 0.5 * (x0_now - m0)
        (k, m1) = self.history[-2]
        r = self._ratio(k, j, i)
        hh = -(_lam(self.sigmas[i]) - _lam(self.sigmas[j]))
        b_h = math.expm1(hh)
        g1 = b_h / hh - 1.0
        g2 = g1 / hh - 0.5
        b1, b2 = g1 / b_h, 2.0 * g2 / b_h
        rho0 = (b1 - b2) / (1.0 - r)  # solves [[1, 1], [r, 1]] @ rho = [b1, b2]
        rho1 = b1 - rho0
        return out - coef * (rho0 * (m1 - m0) / r + rho1 * (x0_now - m0))

    def step(self, i: int, x: torch.Tensor, flow: torch.Tensor) -> torch.Tensor:
        dtype, x = x.dtype, x.float()
        x0 = self.x0(i, x, flow.float())  # from the sample before correction, as UniPC defines it
        if self.history:
            x = self._correct(i, x, x0)
        self.history = (self.history + [(i, x0)])[-2:]
        order = min(2, len(self.sigmas) - 1 - i, len(self.history))
        out, coef = self._linear(i, i + 1, x, x0)
        if order == 2:
            (k, m1) = self.history[-2]
            r = self._ratio(k, i, i + 1)
            out = out - coef * 0.5 * (m1 - x0) / r
        self.last_input, self.last_order = x, order
        return out.to(dtype)


SOLVERS = {"unipc": UniPCSolver, "euler": EulerSolver, "dpm++": DPMPP2MSolver}


def make_solver(name: str, schedule: FlowSchedule) -> FlowSolver:
    try:
        return SOLVERS[name](schedule)
    except KeyError:
        raise ValueError(f"unknown sampler {name!r}; choose one of {', '.join(SOLVERS)}") from None

"""The optimizer step inside the backward pass (`fused_backward_pass`, full fine-tuning): one optimizer per
tensor, stepped as soon as that tensor's gradient is complete, so a full set of gradients never exists;
with `full_bf16`, bf16 tensors step in fp32 and are rounded back stochastically (unbiased)."""

from __future__ import annotations

from typing import Callable

import torch

from library.training.seeding import derive_seed


def stochastic_round_bf16(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """fp32 -> bf16 rounded up or down at random in proportion to the distance (unbiased: E[out] = x), so
    updates far below a bf16 step still move a weight on average instead of rounding away."""
    bits = x.float().contiguous().view(torch.int32)
    noise = torch.randint(0, 1 << 16, bits.shape, dtype=torch.int32, device=bits.device, generator=generator)
    return ((bits + noise) & -65536).view(torch.float32).to(torch.bfloat16)  # low 16 bits cleared: exact


class FusedBackwardOptimizer(torch.optim.Optimizer):
    """One inner optimizer per tensor, stepped from that tensor's post-accumulate-grad hook; the gradient
    is freed right after. `param_groups` are the inner optimizers' own group dicts, so a learning-rate
    schedule on this object drives them all; `step` only counts steps and `zero_grad` has nothing to do.

    `reduce(grad)` averages a gradient over processes (data parallel) before the step; `max_norm` clips
    each tensor's gradient. With `stochastic_seed` (full_bf16), a bf16 tensor is stepped in fp32 (weight,
    gradient and floating optimizer state upcast for this one tensor) and written back with unbiased
    stochastic rounding, the states with nearest rounding; the random bits are keyed by the seed, the step
    and the tensor, so a resumed run rounds exactly as the uninterrupted one."""

    def __init__(self, groups: list[dict], make: Callable[[list[dict]], torch.optim.Optimizer],
                 reduce: Callable[[torch.Tensor], torch.Tensor] | None = None, max_norm: float = 0.0,
                 stochastic_seed: int | None = None):
        # deliberately not Optimizer.__init__: the groups belong to the inner optimizers
        self.defaults, self.state = {}, {}
        self._optimizer_step_pre_hooks, self._optimizer_step_post_hooks = {}, {}
        self._optimizer_state_dict_pre_hooks, self._optimizer_state_dict_post_hooks = {}, {}
        self._optimizer_load_state_dict_pre_hooks, self._optimizer_load_state_dict_post_hooks = {}, {}
        self.inner: list[torch.optim.Optimizer] = []
        self.param_groups: list[dict] = []
        self._handles = []
        self.reduce, self.max_norm, self.stochastic_seed = reduce, max_norm, stochastic_seed
        self.steps = 0  # optimizer steps completed (keys the stochastic rounding)
        for group in groups:
            for param in group["params"]:
                opt = make([{**group, "params": [param]}])
                self.inner.append(opt)
                self.param_groups += opt.param_groups
                self._handles.append(param.register_post_accumulate_grad_hook(self._hook(opt, len(self.inner))))

    def _hook(self, opt: torch.optim.Optimizer, index: int):
        def step(param: torch.Tensor) -> None:
            if self.reduce is not None:
                param.grad = self.reduce(param.grad)
            if self.max_norm:
                torch.nn.utils.clip_grad_norm_([param], self.max_norm)
            if self.stochastic_seed is not None and param.dtype == torch.bfloat16:
                self._step_in_fp32(opt, param, index)
            else:
                opt.step()
            param.grad = None

        return step

    @torch.no_grad()
    def _step_in_fp32(self, opt: torch.optim.Optimizer, param: torch.Tensor, index: int) -> None:
        state = opt.state.get(param, {})
        shaped = [k for k, v in state.items() if torch.is_tensor(v) and v.dtype == torch.bfloat16]
        for key in shaped:
            state[key] = state[key].float()
        param.data, param.grad = param.data.float(), param.grad.float()
        opt.step()
        gen = torch.Generator(device=param.device).manual_seed(derive_seed(self.stochastic_seed, self.steps, index))
        param.data = stochastic_round_bf16(param.data, gen)
        for key, value in opt.state.get(param, {}).items():  # new states come out fp32 from an fp32 step
            if torch.is_tensor(value) and value.is_floating_point() and value.dim() > 0:
                opt.state[param][key] = value.to(torch.bfloat16)

    def step(self, closure=None):  # the updates happened in the backward pass
        self.steps += 1
        return None

    def zero_grad(self, set_to_none: bool = True) -> None:
        for group in self.param_groups:
            for param in group["params"]:
                param.grad = None

    def state_dict(self) -> dict:
        return {"inner": [opt.state_dict() for opt in self.inner], "steps": self.steps}

    def load_state_dict(self, state_dict: dict) -> None:
        inner = state_dict.get("inner")
        if inner is None or len(inner) != len(self.inner):
            raise ValueError("the training state's optimizer does not match this run (fused_backward_pass on one "
                             "side only, or another trainable set): resume with the same settings")
        for opt, sd in zip(self.inner, inner):
            opt.load_state_dict(sd)
        self.steps = state_dict.get("steps", 0)

    def remove_hooks(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

"""Full fine-tuning: the DiT's own weights train instead of a LoRA (`full_fine_tune`, the entry
`finetune/fine_tune_wan.py`).

`FullNetwork` gives the trainer the same small interface a LoRA network has (optimizer parameter groups,
train / eval, state for resuming, `save_weights`), so the loop, the experts, sampling, validation and
resuming are the LoRA trainer's own. What differs:

- which weights train: every DiT parameter, or those matching `trainable_patterns` minus `frozen_patterns`
  (regexes on the official names, `blocks.0.self_attn.q.weight`);
- precision: trainable weights are fp32 master weights (the forward runs in bf16 under autocast), or with
  `full_bf16` stay bf16 with bf16 gradients and optimizer state (about half the memory). An update smaller
  than half a bf16 step of its weight would round away; with `fused_backward_pass` each bf16 tensor is
  therefore stepped in fp32 and rounded back stochastically (unbiased), one tensor at a time;
- `fused_backward_pass`: each weight is updated (and its gradient freed) as soon as its gradient is
  complete, by one optimizer per tensor (`FusedBackwardOptimizer`), so a full set of gradients never exists;
  `max_grad_norm` then clips each tensor on its own (global clipping needs every gradient at once);
- saving: the whole DiT as one safetensors file with official (or ComfyUI-prefixed) names in
  `save_precision` (bf16 when unset), streamed tensor by tensor, with a model-spec header;
- `fsdp`: with several processes, each block's weights, gradients and optimizer state are split across them
  (PyTorch FSDP2, `sharding.shard_model`); a block is gathered for its forward and backward pass only. Gradients
  are averaged by the sharding itself; saving gathers one tensor at a time and the main process writes;
  training states are saved per process (`sharding.sharded_optimizer_state` / `restore_sharded_optimizer`), to
  be resumed with the same number of processes.

Memory per weight, AdamW: fp32 master 4 + grad 4 + states 8 = 16 bytes (a 1.3B model: ~21 GiB; 5B: ~80 GiB);
`full_bf16`: 2 + 2 + 4 = 8 bytes; `fused_backward_pass` removes the gradient term (one tensor at a time).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Callable

import torch

from library.wan.checkpoint_files import LazyTensor, write_safetensors

from library.training.dtypes import BASE_DTYPES

from .parameters import prepare_parameters, select_trainable
from .sharding import is_sharded, local_shard, shard_model, sharding

logger = logging.getLogger(__name__)

COMFYUI_PREFIX = "model.diffusion_model."


def attach_full(expert, cfg, device) -> None:
    """Full fine-tuning: the expert's own weights train (fp32 masters, or bf16 with `full_bf16`), sharded
    over the processes with `fsdp`."""
    ft = cfg.finetune
    names = select_trainable(expert.model, ft.trainable_patterns, ft.frozen_patterns)
    compute = BASE_DTYPES[cfg.loop.mixed_precision]
    master = None if ft.full_bf16 else torch.float32
    frozen = compute if compute != torch.float32 else None
    if sharding(cfg):
        shard_model(expert.model, names, master, frozen, torch.device(device), ft.fsdp_cpu_offload)
    expert.network = FullNetwork(expert.model, names, master, frozen)
    expert.network_dim = 0
    if compute != torch.float32:
        expert.model.compute_dtype = compute  # fp32 masters, bf16 / fp16 maths under autocast


class FullNetwork:
    """The DiT of one expert with (some of) its weights trainable, behind the LoRA network interface."""

    network_dim = 0  # no rank: full fine-tuning

    def __init__(self, model: torch.nn.Module, names: list[str], master_dtype: torch.dtype | None,
                 frozen_dtype: torch.dtype | None = None):
        self.model = model
        self.names = names
        prepare_parameters(model, "", set(names), master_dtype, frozen_dtype)  # no-op after shard_model
        self.params = [model.get_parameter(n) for n in names]
        self.sharded = any(is_sharded(p) for p in self.params)
        count = sum(p.numel() for p in self.params)
        total = sum(p.numel() for p in model.parameters())
        logger.info("full fine-tuning: %d tensors, %.3f B of %.3f B parameters train (%s)", len(names), count / 1e9,
                    total / 1e9, ", ".join(sorted({str(p.dtype).replace("torch.", "") for p in self.params})))

    # ---- the network interface the trainer uses ----------------------------------------------------

    def prepare_optimizer_params(self, lr: float) -> list[dict]:
        return [{"params": list(self.params), "lr": lr}]

    def get_trainable_params(self) -> list[torch.nn.Parameter]:
        return list(self.params)

    def train(self, mode: bool = True):
        self.model.train(mode)
        return self

    def eval(self):
        return self.train(False)

    def to(self, *args, **kwargs):
        return self  # the model is placed by the memory setup

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The trainable weights (this process's shards when sharded)."""
        return {n: local_shard(p.detach()) for n, p in zip(self.names, self.params)}

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        missing = [n for n in self.names if n not in state]
        extra = [n for n in state if n not in set(self.names)]
        if missing or extra:
            raise ValueError(f"the training state's weights do not match this run's trainable set ({len(missing)} "
                             f"missing, e.g. {missing[:3]}; {len(extra)} extra, e.g. {extra[:3]}): resume with the "
                             "same trainable_patterns / frozen_patterns")
        for name, param in zip(self.names, self.params):
            local_shard(param).copy_(state[name])

    def save_weights(self, path, dtype: torch.dtype | None = None, metadata: dict | None = None,
                     fmt: str = "official", write: bool = True) -> Path:
        """The whole DiT (trained and frozen weights) as one safetensors file, one tensor at a time. When
        sharded, every process must call this (each tensor is gathered collectively, in file order) and
        only the one with `write` writes."""
        prefix = COMFYUI_PREFIX if fmt == "comfyui" else ""
        target = dtype or torch.bfloat16
        state = self.model.state_dict(keep_vars=True)
        if not write:
            for tensor in state.values():  # take part in every gather, in the writer's order
                if is_sharded(tensor):
                    tensor.full_tensor()
            return Path(path)
        tensors = {}
        for name, tensor in state.items():
            out = target if tensor.is_floating_point() else tensor.dtype
            tensors[prefix + name] = LazyTensor(tensor.shape, out, _copier(tensor, out))
        return write_safetensors(path, tensors, metadata)


def _copier(tensor: torch.Tensor, dtype: torch.dtype) -> Callable[[], torch.Tensor]:
    def copy() -> torch.Tensor:
        value = tensor.detach()
        return (value.full_tensor() if is_sharded(value) else value).to(device="cpu", dtype=dtype)

    return copy

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
  (PyTorch FSDP2, `shard_model`); a block is gathered for its forward and backward pass only. Gradients
  are averaged by the sharding itself; saving gathers one tensor at a time and the main process writes;
  training states are saved per process (`sharded_payload` / `restore_sharded`), to be resumed with the
  same number of processes.

Memory per weight, AdamW: fp32 master 4 + grad 4 + states 8 = 16 bytes (a 1.3B model: ~21 GiB; 5B: ~80 GiB);
`full_bf16`: 2 + 2 + 4 = 8 bytes; `fused_backward_pass` removes the gradient term (one tensor at a time).
"""

from __future__ import annotations

import json
import logging
import re
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

import torch

logger = logging.getLogger(__name__)

COMFYUI_PREFIX = "model.diffusion_model."


def select_trainable(model: torch.nn.Module, include: tuple[str, ...] = (), exclude: tuple[str, ...] = ()) -> list[str]:
    """Official parameter names to train: matching any `include` regex (all when empty) and no `exclude`."""
    inc = [re.compile(p) for p in include]
    exc = [re.compile(p) for p in exclude]
    names = [n for n, _ in model.named_parameters()
             if (not inc or any(r.search(n) for r in inc)) and not any(r.search(n) for r in exc)]
    if not names:
        raise ValueError(f"trainable_patterns {list(include)} / frozen_patterns {list(exclude)} leave no DiT parameter "
                         "to train; the names look like 'blocks.0.self_attn.q.weight'")
    return names


def prepare_parameters(module: torch.nn.Module, prefix: str, wanted: set[str], master_dtype: torch.dtype | None,
                       frozen_dtype: torch.dtype | None) -> None:
    """Mark `module`'s parameters trainable or frozen; trainable ones become `master_dtype` (fp32 masters),
    frozen ones `frozen_dtype` (the compute dtype) unless the model keeps them in fp32."""
    from library.wan.model import WanModel

    for local, param in module.named_parameters():
        name = prefix + local
        train = name in wanted
        dtype = master_dtype if train else (None if WanModel.is_fp32_param(name) else frozen_dtype)
        if dtype is not None and param.dtype != dtype and param.is_floating_point():
            param.data = param.data.to(dtype)  # a copy, off the mapped file
        param.requires_grad_(train)


def shard_model(model: torch.nn.Module, names: list[str], master_dtype: torch.dtype | None,
                frozen_dtype: torch.dtype | None, device: torch.device, cpu_offload: bool = False) -> None:
    """FSDP2 over every process: each block, then the rest of the model, is cast and sharded in turn, so a
    host holds at most one converted block beside the (memory-mapped) checkpoint."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import CPUOffloadPolicy, fully_shard

    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    options = {"mesh": mesh}
    if cpu_offload:
        options["offload_policy"] = CPUOffloadPolicy(pin_memory=device.type == "cuda")
    wanted = set(names)
    for i, block in enumerate(model.blocks):
        prepare_parameters(block, f"blocks.{i}.", wanted, master_dtype, frozen_dtype)
        fully_shard(block, **options)
    prepare_parameters(model, "", wanted, master_dtype, frozen_dtype)  # embeddings, time MLPs, head
    fully_shard(model, **options)
    logger.info("fsdp: %d blocks and the rest of the model sharded over %d processes%s", len(model.blocks),
                dist.get_world_size(), " (shards in host memory)" if cpu_offload else "")


def is_sharded(tensor: torch.Tensor) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(tensor, DTensor)


def _local(value):
    return value.to_local() if is_sharded(value) else value


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

    def apply_to(self) -> None:
        pass

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The trainable weights (this process's shards when sharded)."""
        return {n: _local(p.detach()) for n, p in zip(self.names, self.params)}

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        missing = [n for n in self.names if n not in state]
        extra = [n for n in state if n not in set(self.names)]
        if missing or extra:
            raise ValueError(f"the training state's weights do not match this run's trainable set ({len(missing)} "
                             f"missing, e.g. {missing[:3]}; {len(extra)} extra, e.g. {extra[:3]}): resume with the "
                             "same trainable_patterns / frozen_patterns")
        for name, param in zip(self.names, self.params):
            _local(param).copy_(state[name])

    def save_weights(self, path, dtype: torch.dtype | None = None, metadata: dict | None = None,
                     fmt: str = "official", write: bool = True) -> Path:
        """The whole DiT (trained and frozen weights) as one safetensors file, one tensor at a time. When
        sharded, every process must call this (each tensor is gathered collectively, in file order) and
        only the one with `write` writes."""
        from library.wan.checkpoint_files import LazyTensor, write_safetensors

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


def sharded_optimizer_state(optimizer: torch.optim.Optimizer) -> dict:
    """The optimizer's state dict with this process's local shards instead of DTensors (picklable)."""
    sd = optimizer.state_dict()
    sd["state"] = {i: {k: _local(v) for k, v in st.items()} for i, st in sd["state"].items()}
    return sd


def restore_sharded_optimizer(optimizer: torch.optim.Optimizer, sd: dict) -> None:
    """Load a `sharded_optimizer_state` back and turn each local shard into a DTensor like its parameter."""
    from torch.distributed.tensor import DTensor

    optimizer.load_state_dict(sd)
    for group in optimizer.param_groups:
        for param in group["params"]:
            if not is_sharded(param):
                continue
            state = optimizer.state.get(param, {})
            for key, value in state.items():
                if torch.is_tensor(value) and not is_sharded(value) and value.shape == param.to_local().shape:
                    state[key] = DTensor.from_local(value.to(param.to_local().device), param.device_mesh,
                                                    param.placements, shape=param.shape, stride=param.stride())


def model_metadata(variant, expert: str | None, cfg, state, learning_rate: float) -> dict[str, str]:
    """The header of a fully fine-tuned DiT file: the SAI model spec (architecture without `/lora`), what
    was trained and how, and the resolved config."""
    from library.config import config_to_dict

    s = cfg.saving
    meta = {
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": f"wan{variant.version}-{variant.name.lower()}",
        "modelspec.implementation": f"https://github.com/Wan-Video/Wan{variant.version}",
        "modelspec.title": s.metadata_title or s.output_name or "WAN fine-tune",
        "modelspec.date": datetime.fromtimestamp(state.started_at, timezone.utc).strftime("%Y-%m-%dT%H:%M:%S"),
        "ss_base_model_version": f"wan{variant.version}_{variant.name}",
        "ss_training_type": "full_fine_tune",
        "ss_steps": str(state.global_step), "ss_epoch": str(state.epoch), "ss_seed": str(state.seed),
        "ss_learning_rate": str(learning_rate), "ss_optimizer": cfg.optimizer.optimizer_type,
        "ss_training_started_at": str(state.started_at), "ss_training_finished_at": str(time.time()),
    }
    if expert:
        meta["ss_expert"] = expert
    for key, value in (("modelspec.author", s.metadata_author), ("modelspec.description", s.metadata_description),
                       ("modelspec.license", s.metadata_license), ("modelspec.tags", s.metadata_tags),
                       ("ss_training_comment", s.training_comment)):
        if value:
            meta[key] = str(value)
    if not s.no_metadata:
        meta["ss_training_config"] = json.dumps(config_to_dict(cfg), default=str)
    return meta


# ---- the optimizer step inside the backward pass ------------------------------------------------------


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
        from .trainer import derive_seed

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

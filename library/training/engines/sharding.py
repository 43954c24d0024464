"""Sharding of full fine-tuning over processes with PyTorch FSDP2 (`fsdp`): each block, then the rest of
the model, is split across the processes and gathered for its own forward and backward pass only; the
optimizer state of a sharded run is saved and restored per process."""

from __future__ import annotations

import logging

import torch

from .parameters import prepare_parameters

logger = logging.getLogger(__name__)


def sharding(cfg) -> bool:
    """`fsdp` with more than one process (one process has nothing to shard across)."""
    import torch.distributed as dist

    return bool(cfg.finetune.full_fine_tune and cfg.finetune.fsdp and dist.is_available() and dist.is_initialized()
                and dist.get_world_size() > 1)


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


def local_shard(value):
    return value.to_local() if is_sharded(value) else value


def sharded_optimizer_state(optimizer: torch.optim.Optimizer) -> dict:
    """The optimizer's state dict with this process's local shards instead of DTensors (picklable)."""
    sd = optimizer.state_dict()
    sd["state"] = {i: {k: local_shard(v) for k, v in st.items()} for i, st in sd["state"].items()}
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

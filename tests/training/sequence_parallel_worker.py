"""Run under torchrun (gloo): one tiny DiT (4 heads), one sample, the loss and gradients of the whole
sequence on this process against the same sample split over every process (sequence parallelism), for a
LoRA with each attention mode of `--modes` and, with `--fsdp`, for full fine-tuning sharded with FSDP2.
Rank 0 writes the largest differences as JSON.

    python -m torch.distributed.run --standalone --nproc_per_node N tests/training/sequence_parallel_worker.py OUT \
        [--modes ulysses all_gather] [--fsdp]
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from library.runtime.sequence_parallel import SequenceParallel  # noqa: E402
from library.wan.model import WanModel  # noqa: E402
from library.wan.variants import get_variant  # noqa: E402
from networks import lora_wan  # noqa: E402
from tests.helpers import random_official_dit_state  # noqa: E402


def sample(variant, height: int = 10, seed: int = 1):
    """Latents of 3 frames x height x 10 (height 10: 75 tokens, padded for 2 and 4 processes; 12: 90 tokens,
    frames of 30 split into local groups of 15 for 2 processes), per-frame timesteps, text."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, variant.in_dim, 3, height, 10, generator=g)
    target = torch.randn(1, variant.out_dim, 3, height, 10, generator=g)
    per_frame = torch.tensor([0.0, 400.0, 900.0])
    tokens = height // 2 * 5
    timestep = per_frame.repeat_interleave(tokens)[None]  # [1, 3 x tokens]: one modulation group per frame (TI2V)
    context = [torch.randn(7, variant.text_dim, generator=g)]
    return x, target, timestep, context


def loss_of(model, batch, scalar_t: bool) -> torch.Tensor:
    x, target, timestep, context = batch
    t = torch.tensor([500.0]) if scalar_t else timestep
    return ((model(x, t, context) - target) ** 2).mean()


def grads(params) -> list[torch.Tensor]:
    out = []
    for p in params:
        g = p.grad if p.grad is not None else torch.zeros_like(p)
        out.append((g.full_tensor() if hasattr(g, "full_tensor") else g).detach().clone())
    return out


def lora_models(variant):
    """The tiny DiT with a LoRA whose up-projections are random (so every LoRA weight gets a gradient)."""
    model = WanModel(variant)
    model.load_state_dict(random_official_dit_state(variant, seed=0))
    torch.manual_seed(5)
    net = lora_wan.create_network(1.0, 4, 4, None, None, model)
    net.apply_to()
    with torch.no_grad():
        for lora in net.loras:
            lora.lora_up.weight.normal_(0, 0.1)
    params = list(net.parameters())
    return model, model, params, params


def sharded_models(variant, world: int):
    """The tiny DiT, every weight trained, sharded with FSDP2 over every process (beside the trainer's 2-D
    data x sequence mesh, as in a run); the reference is an unsharded copy."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    model = WanModel(variant)
    model.load_state_dict(random_official_dit_state(variant, seed=0))
    reference = copy.deepcopy(model)
    init_device_mesh("cpu", (1, world), mesh_dim_names=("data", "sequence"))
    mesh = init_device_mesh("cpu", (world,))
    for block in model.blocks:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model, reference, list(model.parameters()), list(reference.parameters())


def compare(models, sp, sharded: bool) -> dict:
    """Loss and gradient differences on three cases: per-frame timesteps on 75 tokens (padded) and on 90
    tokens (local modulation groups), one timestep with gradient checkpointing."""
    model, reference, params, ref_params = models
    variant = model.variant
    report = {}
    for name, scalar_t, batch in (("per_frame", False, sample(variant)), ("per_frame_90", False, sample(variant, 12)),
                                  ("scalar_checkpointed", True, sample(variant))):
        if scalar_t:  # gradient checkpointing: the backward pass recomputes split blocks
            for m in {id(model): model, id(reference): reference}.values():
                m.enable_gradient_checkpointing(True)
        for p in (*params, *ref_params):
            p.grad = None
        expected = loss_of(reference, batch, scalar_t)
        expected.backward()
        want = grads(ref_params)
        for p in (*params, *ref_params):
            p.grad = None
        with sp.active(model):
            got = loss_of(model, batch, scalar_t)
            got.backward()
        if not sharded:  # the trainer's mean over processes (FSDP reduces its gradients itself)
            for p in params:
                dist.all_reduce(p.grad, op=dist.ReduceOp.AVG)
        have = grads(params)
        report[name] = {"loss": abs(got.item() - expected.item()), "expected_loss": expected.item(),
                        "grad": max((a - b).abs().max().item() for a, b in zip(have, want)),
                        "grad_scale": max(b.abs().max().item() for b in want)}
    return report


def compare_data_groups(variant, groups: int) -> dict:
    """A 2-D mesh, `groups` data-parallel groups x the rest per sample, a LoRA: each group splits its own sample;
    the mean over every process of the gradients = one process's gradients of the mean loss over the samples."""
    from torch.distributed.device_mesh import init_device_mesh

    world, rank = dist.get_world_size(), dist.get_rank()
    n = world // groups
    mesh = init_device_mesh("cpu", (groups, n), mesh_dim_names=("data", "sequence"))
    sp = SequenceParallel(mesh.get_group("sequence"), n, mesh.get_local_rank("sequence"))
    model, _, params, _ = lora_models(variant)
    samples = [sample(variant, 12, seed=2 + d) for d in range(groups)]
    expected = sum(loss_of(model, batch, False) for batch in samples) / groups
    expected.backward()
    want = grads(params)
    for p in params:
        p.grad = None
    with sp.active(model):
        got = loss_of(model, samples[rank // n], False)
        got.backward()
    for p in params:
        dist.all_reduce(p.grad, op=dist.ReduceOp.AVG)
    have = grads(params)
    losses = [torch.zeros(1) for _ in range(world)]
    dist.all_gather(losses, got.detach().view(1))
    mean = sum(loss.item() for loss in losses) / world
    return {f"lora {groups}x{n} per_frame_90": {
        "loss": abs(mean - expected.item()), "expected_loss": expected.item(),
        "grad": max((a - b).abs().max().item() for a, b in zip(have, want)),
        "grad_scale": max(b.abs().max().item() for b in want)}}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--modes", nargs="+", default=["ulysses"], help="attention modes compared with a LoRA")
    parser.add_argument("--fsdp", action="store_true", help="then full fine-tuning sharded with FSDP2 (ulysses)")
    parser.add_argument("--data_groups", type=int, default=1, help="then a LoRA on data-parallel groups x sequence")
    args = parser.parse_args()
    dist.init_process_group("gloo")
    world, rank = dist.get_world_size(), dist.get_rank()
    torch.use_deterministic_algorithms(True)
    variant = dataclasses.replace(get_variant("t2v-tiny"), num_heads=args.heads)
    report = {}
    for mode in args.modes:
        sp = SequenceParallel(dist.group.WORLD, world, rank, mode)
        report.update({f"lora {mode} {k}": v for k, v in compare(lora_models(variant), sp, False).items()})
    if args.fsdp:
        sp = SequenceParallel(dist.group.WORLD, world, rank, "ulysses")
        report.update({f"fsdp {k}": v for k, v in compare(sharded_models(variant, world), sp, True).items()})
    if args.data_groups > 1:
        report.update(compare_data_groups(variant, args.data_groups))
    if rank == 0:
        Path(args.out).write_text(json.dumps(report))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()

"""The process layout of a run: data-parallel groups x sequence groups (`sequence_parallel_size` N).

The processes form a 2-D DeviceMesh ("data", "sequence"): process p is slice p % N of the samples of
data-parallel rank p // N, and the N processes of a sequence group read the same batches (`TrainData.regroup`)
and split each sample's tokens (`library.runtime.sequence_parallel`). Noise, timesteps and every other draw
are keyed by item, so a sequence group draws what one process would; the gradients are the same too (see
that module). Saving is unchanged: the main process writes the weights, a sharded (fsdp) run a state shard
per process. A state remembers N, and resuming with another N is refused (the data positions would differ).
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass

from library.runtime.sequence_parallel import SequenceParallel, SequenceParallelError, check_heads

from .checkpoints.state import StateError

logger = logging.getLogger(__name__)


@dataclass
class Layout:
    size: int = 1  # processes per sample
    sequence: SequenceParallel | None = None

    def active(self, *models):
        """Forward passes of these models split their tokens over the sequence group (no-op without one)."""
        return contextlib.nullcontext() if self.sequence is None else self.sequence.active(*models)


def setup_parallel(cfg, variant, accelerator, data, payload: dict | None = None) -> Layout:
    """The sequence group of this process (none when N = 1); the data is regrouped so the processes of a
    group read the same batches. `payload`: the state being resumed, whose N must be this run's."""
    a = cfg.attention
    n, world, rank = a.sequence_parallel, accelerator.num_processes, accelerator.process_index
    if payload is not None:
        saved = payload["run_state"].get("sequence_parallel", 1)
        if saved != n:
            raise StateError(f"resume: {payload['folder']} was saved with sequence_parallel_size = {saved}, this run "
                             f"has {n}; resume it with sequence_parallel_size = {saved} (and as many processes)")
    if n == 1:
        return Layout()
    check_heads(variant.num_heads, n, a.sequence_parallel_attention)
    if variant.is_vace:
        raise SequenceParallelError(f"sequence_parallel_size = {n}: the VACE models ({variant.name}) are not split "
                                    "over processes (their context hints would need the same split); set "
                                    "sequence_parallel_size = 1")
    if world % n:
        raise SequenceParallelError(
            f"sequence_parallel_size = {n}, but {world} process(es) were launched: launch a multiple of {n} "
            f"(e.g. `accelerate launch --num_processes {n}` or `torchrun --nproc_per_node {n}`), or lower it")
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh(accelerator.device.type, (world // n, n), mesh_dim_names=("data", "sequence"))
    group = SequenceParallel(mesh.get_group("sequence"), n, mesh.get_local_rank("sequence"),
                             a.sequence_parallel_attention)
    data.regroup(rank // n, world // n)
    logger.info("sequence parallelism: %d data-parallel group(s) x %d processes per sample (%s); process %d holds "
                "token slice %d of data-parallel rank %d", world // n, n, a.sequence_parallel_attention, rank,
                group.rank, rank // n)
    return Layout(n, group)

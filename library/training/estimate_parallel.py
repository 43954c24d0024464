"""Sequence-parallel rows of the step estimate (`tools/benchmark_wan.py --estimate --sequence_parallel N`):
one sample split over N GPUs, each computing 1 / N of the step (its token slice through every Linear, its
heads over every token in attention) and sending its all-to-all traffic (`all_to_all_bytes`), counted on
the GPU's link inside a node (NVLink) and across nodes (InfiniBand: every byte over the network, the case of
a sequence group spread one GPU per node). The all-to-alls sit between the projections and the attention
kernel, so their time is added, not overlapped. Every figure is an estimate (rates: `gpu_rates`)."""

from __future__ import annotations

from dataclasses import dataclass

from library.runtime.sequence_parallel import all_to_all_bytes

from .estimate import StepEstimate
from .gpu_rates import LINKS_SOURCE
from .planning.lora import Settings, Workload, estimate


@dataclass(frozen=True)
class SplitRow:
    size: int
    tokens_per_gpu: int
    compute_s: float
    traffic_gb: float  # sent per GPU a step
    nvlink_s: float  # step time with the traffic inside a node
    infiniband_s: float  # step time with the traffic across nodes
    planned_gib: float  # the planner's peak per GPU (checkpointing as in the estimate)

    def tokens_per_s(self, tokens: int, seconds: float) -> float:
        return tokens / seconds / self.size


def split_rows(result: StepEstimate, sizes: tuple[int, ...], mode: str = "ulysses") -> list[SplitRow]:
    s, v, gpu = result.setup, result.setup.variant, result.gpu
    tokens = s.tokens()
    rows = []
    for n in sizes:
        traffic = all_to_all_bytes(tokens, v.dim, n, v.num_layers, 2, mode, 3 if s.checkpointing else 2) * s.batch
        compute = result.seconds / n
        work = Workload(v, s.width, s.height, s.frames, s.batch, s.rank, "adamw", sequence_parallel=n)
        planned = estimate(work, Settings(checkpointing=s.checkpointing)).total
        rows.append(SplitRow(n, work.local_tokens, compute, traffic / 1e9,
                             compute + traffic / (gpu.intra_node[1] * 1e9),
                             compute + traffic / (gpu.inter_node[1] * 1e9), planned))
    return rows


def split_table(result: StepEstimate, sizes: tuple[int, ...], mode: str = "ulysses") -> str:
    gpu, tokens = result.gpu, result.setup.tokens() * result.setup.batch
    (intra, intra_rate), (inter, inter_rate) = gpu.intra_node, gpu.inter_node
    lines = [f"ESTIMATE, sequence parallelism ({mode}): one sample over N GPUs; traffic at {intra} "
             f"({intra_rate:g} GB/s) inside a node and {inter} ({inter_rate:g} GB/s) across nodes",
             f"  {'N':>2}  {'tokens/GPU':>10}  {'compute s':>9}  {'sent GB/GPU':>11}  {'step s NVLink':>13}  "
             f"{'tok/s/GPU':>9}  {'step s IB':>9}  {'tok/s/GPU':>9}  {'planned GiB/GPU':>15}"]
    for r in split_rows(result, sizes, mode):
        lines.append(f"  {r.size:>2}  {r.tokens_per_gpu:>10}  {r.compute_s:>9.2f}  {r.traffic_gb:>11.1f}  "
                     f"{r.nvlink_s:>13.2f}  {r.tokens_per_s(tokens, r.nvlink_s):>9.0f}  {r.infiniband_s:>9.2f}  "
                     f"{r.tokens_per_s(tokens, r.infiniband_s):>9.0f}  {r.planned_gib:>15.1f}")
    lines.append(f"  link rates: {LINKS_SOURCE}")
    return "\n".join(lines)

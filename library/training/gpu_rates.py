"""Sustained rates of the GPUs `library/training/estimate.py` models, each with its source. Figures from
datasheets and papers are marked so; the rest are assumptions, and every estimate built on them is one.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class GpuRates:
    """Sustained rates assumed for one GPU. TFLOP/s and TB/s; attention as (forward, backward) per backend
    in the FlashAttention papers' convention (backward = 2.5x the forward's FLOPs)."""

    name: str
    peak_tflops: float  # dense bf16 tensor-core peak (datasheet), the MFU denominator
    matmul_tflops: float  # large bf16 GEMMs (cuBLAS), sustained
    vector_tflops: float  # fp32 CUDA-core work (elementwise maths that is not memory-bound)
    bandwidth_tbs: float  # sustained DRAM bandwidth
    attention: dict = field(default_factory=dict)  # "fa2" | "fa3" | "cudnn" -> (forward, backward)
    capability: tuple[int, int] = (9, 0)
    source: str = ""
    fp8_matmul_tflops: float = 0.0  # large fp8 x fp8 GEMMs with fp32 accumulation (`_scaled_mm`); 0: none
    memory_gib: float = 0.0  # what torch reports as the card's memory (the planner's input for `--plan`)
    # sequence parallelism: sustained all-to-all rate per GPU and direction, GB/s, inside a node (NVLink, or
    # PCIe where the card has none) and across nodes (one InfiniBand NIC per GPU); sources in LINKS_SOURCE
    intra_node: tuple[str, float] = ("NVLink 4", 360.0)
    inter_node: tuple[str, float] = ("InfiniBand NDR 400 Gb/s", 40.0)
    # activation offload: sustained copy rate per direction between the GPU and pinned host memory, GB/s
    # (source: HOST_LINK_SOURCE)
    host_link: tuple[str, float] = ("PCIe 5.0 x16", 51.2)


LINKS_SOURCE = (
    "NVLink: NVIDIA H100 / H200 SXM datasheets, NVLink 4 at 900 GB/s per GPU (both directions, 450 each); A100 "
    "SXM datasheet, NVLink 3 at 600 GB/s (300 each). PCIe: 4.0 x16 32 GB/s and 5.0 x16 64 GB/s per direction "
    "(PCI-SIG). InfiniBand: NDR 400 Gb/s (50 GB/s) and HDR 200 Gb/s (25 GB/s) per port (NVIDIA ConnectX-7 / -6 "
    "datasheets; DGX H100 / A100 give each GPU one such port). Sustained all-to-all = 80% of the per-direction "
    "link rate: an assumption (NCCL all-to-all on NVSwitch and on rail-optimised InfiniBand reaches about that "
    "in published nccl-tests runs), not a measurement."
)

HOST_LINK_SOURCE = (
    "host link: the H100 SXM, H200 SXM and RTX 5090 reach host memory over PCIe 5.0 x16, the A100 SXM and RTX "
    "4090 over PCIe 4.0 x16 (NVIDIA datasheets); per direction 64 GB/s (5.0) and 32 GB/s (4.0) (PCI-SIG). "
    "Sustained = 80% of that, 51.2 and 25.6 GB/s: an assumption (pinned-memory copies of large buffers, e.g. "
    "CUDA's bandwidthTest, reach about 80-85% of the link), not a measurement."
)

_HOPPER_ATTENTION = {"fa2": (370.0, 322.0), "fa3": (648.0, 561.0), "cudnn": (595.0, 516.0)}
_HOPPER_SOURCE = ("peak: NVIDIA H100 / H200 datasheets (989 TFLOP/s dense bf16 SXM; 3.35 / 4.8 TB/s HBM); "
                  "sustained matmul 650 TFLOP/s and 2.8 TB/s on the H100 (issue 17's assumptions, about 2/3 of "
                  "peak FLOPs and 84% of peak bandwidth), H200 bandwidth 4.0 TB/s (the same 84%); attention: "
                  "forward / backward FA2 370 / 322, FA3 648 / 561, cuDNN 595 / 516 (FlashAttention-3 paper, "
                  "Shah et al. 2024, H100 SXM5 bf16, head dim 128, non-causal, the forward and backward charts at "
                  "sequence length 16k; until 2026-12-06 the backward rates were assumptions, 290 / 500 / 460, "
                  "below the paper's own figures); fp8 matmuls 1300 "
                  "(the datasheets' dense fp8 peak, 1979, is twice bf16's; the same 2/3 sustained assumed); "
                  "memory as torch reports an 80 GB H100 / 141 GB H200, about 79.2 / 139.8 GiB")
GPUS = {
    "h100": GpuRates("H100 SXM (estimate)", 989.0, 650.0, 67.0, 2.8, _HOPPER_ATTENTION, (9, 0), _HOPPER_SOURCE,
                     fp8_matmul_tflops=1300.0, memory_gib=79.2),
    "h200": GpuRates("H200 SXM (estimate)", 989.0, 650.0, 67.0, 4.0, _HOPPER_ATTENTION, (9, 0), _HOPPER_SOURCE,
                     fp8_matmul_tflops=1300.0, memory_gib=139.8),
    "a100": GpuRates("A100 SXM 80GB (estimate)", 312.0, 250.0, 19.5, 1.7, {"fa2": (220.0, 190.0)}, (8, 0),
                     "peak: NVIDIA A100 datasheet (312 TFLOP/s dense bf16, 2.04 TB/s); sustained matmul 250 "
                     "(80% of peak) and 1.7 TB/s (84%) assumed; FA2 220 / 190 (FlashAttention-2 paper, Dao "
                     "2023, A100, head dim 128, about 70% / 60% of peak); no fp8 tensor cores", memory_gib=79.2,
                     intra_node=("NVLink 3", 240.0), inter_node=("InfiniBand HDR 200 Gb/s", 20.0),
                     host_link=("PCIe 4.0 x16", 25.6)),
    "4090": GpuRates("RTX 4090 (estimate)", 165.2, 140.0, 82.6, 0.9, {"fa2": (120.0, 100.0)}, (8, 9),
                     "peak: NVIDIA Ada whitepaper (165.2 TFLOP/s bf16 with fp32 accumulate, 1.01 TB/s GDDR6X); "
                     "sustained matmul 140 (85%), 0.9 TB/s, FA2 120 / 100 assumed (no published figure read); fp8 "
                     "matmuls not modelled", memory_gib=23.6,
                     intra_node=("PCIe 4.0 x16 (no NVLink)", 25.6), inter_node=("InfiniBand HDR 200 Gb/s", 20.0),
                     host_link=("PCIe 4.0 x16", 25.6)),
    "5090": GpuRates("RTX 5090 (estimate)", 209.5, 175.0, 104.8, 1.6, {"fa2": (150.0, 125.0),
                                                                      "cudnn": (150.0, 125.0)}, (12, 0),
                     "peak: NVIDIA Blackwell GeForce whitepaper (209.5 TFLOP/s bf16 with fp32 accumulate, "
                     "1.79 TB/s GDDR7); sustained matmul 175 (84%), 1.6 TB/s, attention 150 / 125 assumed (no "
                     "published figure read); fp8 matmuls not modelled", memory_gib=31.4,
                     intra_node=("PCIe 5.0 x16 (no NVLink)", 51.2), inter_node=("InfiniBand HDR 200 Gb/s", 20.0)),
}

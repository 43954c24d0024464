"""The training-step benchmark behind `tools/benchmark_wan.py`: a full-size DiT with random weights
built straight on the device (no download), the memory features applied as in training, then warm-up and
timed steps of LoRA training or (`full`) full fine-tuning. Reports s/step, tokens/s, peak VRAM, host RAM,
MFU and, when given, the planner's estimate beside the measured peak.

MFU counts the model FLOPs of a LoRA step over a frozen base without recomputation (per sample),

    4 (N - N_c) T + 2 N_c T_c + 12 T^2 d L + 12 T T_c d L

N = Linear weights in the blocks, N_c of them the cross-attention key / value projections (k, v; and
k_img, v_img of WAN 2.1 I2V) that see the T_c context tokens (512 text, + 257 CLIP for WAN 2.1 I2V), not
the T video tokens; d = width, L = layers. The video-side matmuls count forward and input gradient (no
weight gradients for the frozen base; the LoRA's own FLOPs are ignored), the context-side ones forward
only (the text embedding is frozen, so nothing needs their input gradient); self-attention counts
forward 4 T^2 d and backward 8 T^2 d, cross-attention the same with T_c keys. Divided by the step time and
the GPU's dense bf16 peak. Full fine-tuning adds the weight gradients and the context's input gradient:
6 (N - N_c) T + 6 N_c T_c.
"""

from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass, field

import torch
import torch.nn as nn

from library.config.schema import CompileArgs, MemoryArgs
from library.wan.fp8 import FP8Config, FP8Report, quantize_block_fp8
from library.wan.model import WanModel
from library.wan.vace import build_dit
from library.wan.variants import WanVariant

from library.runtime.compiling import compile_blocks
from library.runtime.memory import apply_memory_features, place_model
from .engines.full import FullNetwork
from .engines.fused import FusedBackwardOptimizer
from .engines.parameters import select_trainable
from .optimizers import build_optimizer
from .planning.lora import block_linear_params

logger = logging.getLogger(__name__)

# Dense bf16 tensor-core peaks (vendor datasheets, no sparsity), matched against the device name in order:
# the PCIe and NVL cards before the SXM ones whose name they contain (H100 NVL / H200 NVL: 1,671 TFLOP/s
# with sparsity, 835 dense).
PEAK_TFLOPS = (("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H200 NVL", 835.0), ("H100", 989.0), ("H200", 989.0),
               ("GH200", 989.0), ("A100", 312.0),
               ("L40S", 362.0), ("RTX 6000 Ada", 364.0), ("RTX 4090", 165.0), ("RTX A6000", 155.0),
               ("RTX 3090", 71.0))


def peak_tflops_for(device_name: str) -> float | None:
    return next((tf for key, tf in PEAK_TFLOPS if key in device_name), None)


def step_flops(variant: WanVariant, tokens: int, batch: int = 1, full: bool = False) -> float:
    """Model FLOPs of one training step (the formula of the module docstring; `full`: weight gradients too)."""
    d, layers = variant.dim, variant.num_layers
    image_tokens = variant.clip_tokens * variant.image_frames  # FLF2V: the first and the last frame's
    context = variant.text_len + (image_tokens if variant.image_embedding else 0)
    kv_text = 2 * d * d * layers * variant.text_len  # cross-attention k, v over the text tokens
    kv_image = 2 * d * d * layers * image_tokens if variant.image_embedding else 0  # k_img, v_img
    n_context = (4 if variant.image_embedding else 2) * d * d * layers
    n_video = block_linear_params(variant) * layers - n_context
    matmuls = (6 if full else 4) * n_video * tokens + (6 if full else 2) * (kv_text + kv_image)
    return batch * (matmuls + 12 * tokens**2 * d * layers + 12 * tokens * context * d * layers)


@dataclass
class BenchConfig:
    variant: WanVariant
    width: int
    height: int
    frames: int
    batch_size: int = 1
    rank: int = 32
    steps: int = 5
    warmup: int = 2
    device: str = "cuda"
    dtype: torch.dtype = torch.bfloat16
    memory: MemoryArgs = field(default_factory=lambda: MemoryArgs(gradient_checkpointing=True))
    attention: str = "sdpa"
    fp8_scaled_mm: bool = False
    compile: bool = False
    two_experts: bool = False  # build both experts and alternate them, the inactive one in host memory
    peak_tflops: float | None = None
    seed: int = 0
    full: bool = False  # full fine-tuning: every DiT weight trains (fp32 masters unless full_bf16)
    full_bf16: bool = False
    fused_backward_pass: bool = False
    optimizer: str = "AdamW"
    planned_gib: float | None = None  # the planner's estimate of the peak, printed beside the measurement
    sequence_parallel: object | None = None  # a runtime.sequence_parallel.SequenceParallel: split each sample


@dataclass
class BenchResult:
    device: str
    tokens: int
    seconds_per_step: float
    tokens_per_second: float
    peak_vram_gib: float | None
    peak_reserved_gib: float | None
    host_rss_gib: float
    host_peak_rss_gib: float
    tflop_per_step: float
    mfu: float | None
    setup: str
    losses: list[float]
    planned_gib: float | None = None
    sequence_parallel: int = 1  # processes per sample: tokens/s, VRAM and MFU are per GPU

    def table(self) -> str:
        split = f", split over {self.sequence_parallel} GPUs" if self.sequence_parallel > 1 else ""
        rows = [("device", self.device), ("memory setup", self.setup), ("tokens per sample", f"{self.tokens}{split}"),
                ("s/step", f"{self.seconds_per_step:.3f}"), ("tokens/s per GPU", f"{self.tokens_per_second:.1f}"),
                ("peak VRAM allocated / reserved", "n/a (CPU)" if self.peak_vram_gib is None
                 else f"{self.peak_vram_gib:.2f} / {self.peak_reserved_gib:.2f} GiB"),
                ("host RAM now / peak", f"{self.host_rss_gib:.2f} / {self.host_peak_rss_gib:.2f} GiB"),
                ("model TFLOP per step" + (" per GPU" if split else ""), f"{self.tflop_per_step:.4g}"),
                ("MFU", "n/a (pass --peak_tflops)" if self.mfu is None else f"{100 * self.mfu:.1f}%")]
        if self.planned_gib is not None:
            off = None if self.peak_vram_gib is None else 100 * (self.planned_gib / self.peak_vram_gib - 1)
            measured = "n/a (CPU)" if off is None else f"measured {self.peak_vram_gib:.2f} GiB, {off:+.1f}%"
            rows.append(("planner's peak estimate", f"{self.planned_gib:.2f} GiB ({measured})"))
        width = max(len(k) for k, _ in rows)
        return "\n".join(f"{k.ljust(width)}  {v}" for k, v in rows)


# ---- a random full-size model, built in place ----------------------------------------------------------


def _random_tensor(name: str, shape, device, dtype, gen) -> torch.Tensor:
    if name.endswith("bias"):
        return torch.zeros(shape, device=device, dtype=dtype)
    if "norm" in name:
        return torch.ones(shape, device=device, dtype=dtype)
    std = shape[-1] ** -0.5 if "modulation" in name else 0.02
    return (torch.randn(shape, device=device, generator=gen) * std).to(dtype)


def _materialise(module: nn.Module, prefix: str, device, dtype, gen) -> None:
    for sub_name, sub in module.named_modules(prefix=prefix):
        for leaf, param in list(sub._parameters.items()):
            if param is not None and param.is_meta:
                name = f"{sub_name}.{leaf}"
                want = torch.float32 if WanModel.is_fp32_param(name) else dtype
                sub._parameters[leaf] = nn.Parameter(_random_tensor(name, param.shape, device, want, gen),
                                                     requires_grad=False)


def build_random_model(variant: WanVariant, device, dtype=torch.bfloat16, fp8: FP8Config | None = None,
                       seed: int = 0, host_blocks: int = 0) -> WanModel:
    """A frozen WAN DiT with random weights created directly on `device`, one block at a time (each
    block quantised to fp8 right away when asked, the last `host_blocks` moved to host memory), so a
    bf16 copy of the whole model never exists on the device."""
    device = torch.device(device)
    gen = torch.Generator(device=device).manual_seed(seed)
    with torch.device("meta"):
        model = build_dit(variant)
    for name, child in model.named_children():
        if name != "blocks":
            _materialise(child, name, device, dtype, gen)
    report = FP8Report(fp8.mode) if fp8 is not None else None
    for i, block in enumerate(model.blocks):
        _materialise(block, f"blocks.{i}", device, dtype, gen)
        if fp8 is not None:
            quantize_block_fp8(block, f"blocks.{i}", fp8, report=report)
        if i >= variant.num_layers - host_blocks:
            block.to("cpu")
    model.fp8_report = report
    model.compute_dtype = dtype
    return model.requires_grad_(False).eval()


# ---- the timed steps -----------------------------------------------------------------------------------------


def _rss_gib() -> tuple[float, float]:
    """(current, peak) resident set size of this process, GiB (Linux /proc; 0 elsewhere)."""
    now = peak = 0
    try:
        for line in open("/proc/self/status"):
            if line.startswith("VmRSS:"):
                now = int(line.split()[1]) * 1024
            elif line.startswith("VmHWM:"):
                peak = int(line.split()[1]) * 1024
    except OSError:
        pass
    return now / 2**30, peak / 2**30


def _batch(cfg: BenchConfig, device):
    v = cfg.variant
    st, sh, sw = v.vae_stride
    shape = (cfg.batch_size, v.latent_channels, (cfg.frames - 1) // st + 1, cfg.height // sh, cfg.width // sw)
    gen = torch.Generator(device=device).manual_seed(cfg.seed + 1)
    x0 = torch.randn(shape, device=device, generator=gen)
    noise = torch.randn(shape, device=device, generator=gen)
    sigma = torch.rand(cfg.batch_size, device=device, generator=gen)
    s = sigma.view(-1, 1, 1, 1, 1)
    y = None
    if v.in_dim != v.latent_channels:
        y = torch.zeros(cfg.batch_size, v.in_dim - v.latent_channels, *shape[2:], device=device)
    context = torch.randn(cfg.batch_size, v.text_len, v.text_dim, device=device, generator=gen).to(cfg.dtype)
    tokens = shape[2] // v.patch_size[0] * (shape[3] // v.patch_size[1]) * (shape[4] // v.patch_size[2])
    return dict(x=(1 - s) * x0 + s * noise, t=sigma * 1000, context=context, y=y, target=noise - x0), tokens


def _expert(cfg: BenchConfig, device, seed: int):
    from networks import lora_wan

    fast = cfg.fp8_scaled_mm or cfg.memory.fp8_fast
    fp8 = FP8Config(scaled=cfg.memory.fp8_scaled, use_scaled_mm=fast) if cfg.memory.fp8_base else None
    host_blocks = cfg.memory.blocks_to_swap if device.type == "cuda" else 0
    masters = torch.float32 if cfg.full and not cfg.full_bf16 else cfg.dtype
    model = build_random_model(cfg.variant, device, masters, fp8, seed, host_blocks)
    model.compute_dtype = cfg.dtype
    model.set_attention_backend(cfg.attention)
    setup = apply_memory_features(model, cfg.memory, device)  # gradient_checkpointing_keep_attention too
    torch.manual_seed(seed)
    if cfg.full:
        network = FullNetwork(model, select_trainable(model), None)
    else:
        network = lora_wan.create_network(1.0, cfg.rank, cfg.rank, None, None, model)
        network.apply_to()
        network.to(device)
    if cfg.compile:  # as training does: one graph for every block, eager with a warning where it cannot
        compile_blocks(model, CompileArgs(compile=True), device)
    return model, network, setup


def _optimizer(cfg: BenchConfig, params: list):
    if cfg.full and cfg.fused_backward_pass:
        return FusedBackwardOptimizer([{"params": params, "lr": 1e-5}],
                                      lambda g: build_optimizer(g, cfg.optimizer, 1e-5, quiet=True),
                                      stochastic_seed=cfg.seed if cfg.full_bf16 else None)
    return build_optimizer(params, cfg.optimizer, 1e-5 if cfg.full else 1e-4, quiet=True)


def run_benchmark(cfg: BenchConfig) -> BenchResult:
    device = torch.device(cfg.device)
    cuda = device.type == "cuda"
    experts = []
    for i in range(2 if cfg.two_experts else 1):
        experts.append(_expert(cfg, device, cfg.seed + i))
        if cfg.two_experts:  # each expert waits in host memory, so building the next one fits too
            place_model(experts[-1][0], "cpu")
    params = [p for _, net, _ in experts for p in net.get_trainable_params()]
    optimizer = _optimizer(cfg, params)
    # full fine-tuning with fp32 masters computes in bf16 under autocast, without the weight cache (as trained)
    autocast = (torch.autocast(device.type, dtype=cfg.dtype, cache_enabled=False)
                if cfg.full and not cfg.full_bf16 and cfg.dtype != torch.float32 else contextlib.nullcontext())
    batch, tokens = _batch(cfg, device)
    sp = cfg.sequence_parallel
    n = sp.size if sp is not None else 1
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    losses, start = [], 0.0
    for step in range(cfg.warmup + cfg.steps):
        if step == cfg.warmup:
            _sync(device)
            start = time.perf_counter()
        model = _activate(experts, step)
        with sp.active(model) if sp is not None else contextlib.nullcontext():  # recomputed blocks split too
            with autocast:
                pred = model(batch["x"], batch["t"], batch["context"], y=batch["y"])
            loss = (pred.float() - batch["target"]).pow(2).mean()
            loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    _sync(device)
    seconds = (time.perf_counter() - start) / max(cfg.steps, 1)
    flops = step_flops(cfg.variant, tokens, cfg.batch_size, cfg.full) / n  # per GPU
    peak = cfg.peak_tflops or (peak_tflops_for(torch.cuda.get_device_name(device)) if cuda else None)
    rss, rss_peak = _rss_gib()
    name = torch.cuda.get_device_name(device) if cuda else "cpu"
    return BenchResult(
        device=name, tokens=tokens, seconds_per_step=seconds, tokens_per_second=cfg.batch_size * tokens / seconds / n,
        peak_vram_gib=torch.cuda.max_memory_allocated(device) / 2**30 if cuda else None,
        peak_reserved_gib=torch.cuda.max_memory_reserved(device) / 2**30 if cuda else None,
        host_rss_gib=rss, host_peak_rss_gib=rss_peak, tflop_per_step=flops / 1e12,
        mfu=flops / (seconds * peak * 1e12) if peak else None, setup=experts[0][2].summary(), losses=losses,
        planned_gib=cfg.planned_gib, sequence_parallel=n,
    )


def _activate(experts: list, step: int) -> WanModel:
    """Alternate the experts step by step (two experts): the active one on the device, the other on the host."""
    if len(experts) == 1:
        return experts[0][0]
    active, idle = experts[step % 2], experts[(step + 1) % 2]
    device = torch.device(active[2].device)
    place_model(idle[0], "cpu")
    place_model(active[0], device)
    return active[0]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


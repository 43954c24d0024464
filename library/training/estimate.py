"""A roofline estimate of one training step on a GPU we do not have (`tools/benchmark_wan.py --estimate`).

One full-size LoRA step (forward, loss, backward; the optimizer step on the LoRA is left out) runs on the
`meta` device, where tensors have shapes and no data, under a dispatch mode that records every kernel: its
FLOPs (`torch.utils.flop_counter`'s formulas for matmuls; attention counted by this module) and the bytes
it reads and writes (views are free; a broadcast input is read once). Each kernel then costs

    max(FLOPs / the GPU's rate for its kind, bytes / the GPU's memory bandwidth)

with the rates of `GPUS` (each with its source). With `compiled`, runs of consecutive kernels that are
neither matmuls nor attention are taken as fused the way inductor fuses them: one kernel reading the
buffers that come from outside the run and writing those used after it. Every figure it prints is an
estimate of a roofline, not a measurement: real kernels reach their rate only at large sizes, launch
gaps, host overheads and the optimizer step are not counted, and no graph break is assumed.

Attention is whatever SDPA (or a flash-attn package) would run: on the meta device it is one counting
op, and the GPU's rate for the backend the code would choose (`attention.sdpa_plan` for SDPA) is applied.
`fp8`: fp8 block weights, dequantised per matmul; `fp8_fast`: fp8 matmuls (`_scaled_mm`, at the fp8 rate).
`F.rms_norm` is one counting op forward and one backward too, as CUDA's fused kernel runs it (on the meta
device it would decompose into the CPU formula). `offload_activations`: the block inputs' copies to the
host and back at the GPU's host-link rate, overlapped with the compute (`estimate_offload.py`); the time
the compute waits for them is added; `offload_attention`: the kept self-attention outputs travel with them.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import flop_registry

from library.wan.model import WanModel
from library.wan.vace import build_dit
from library.wan.variants import WanVariant

from .benchmark import step_flops
from .estimate_full import ParamCounts, count_params, full_costs
from .estimate_offload import BlockMarks, OffloadTime, SwapTime, copy_bytes, offload_time, swap_time
from .estimate_ops import counting_rms_norm, counting_sdpa
from .gpu_rates import GPUS, GpuRates
from .planning.lora import KEEP_PER_C, KEEP_PER_HEAD

_MATMULS = {"mm", "addmm", "bmm", "baddbmm", "_scaled_mm", "convolution", "convolution_backward"}
_ATTENTION = {"attention", "attention_backward"}


# ---- recording kernels ---------------------------------------------------------------------------------------


@dataclass
class Kernel:
    name: str
    kind: str  # "matmul" | "attention" | "attention_backward" | "other"
    flops: float
    reads: list  # [(buffer id, bytes)]
    writes: list
    dtype: torch.dtype


def _bytes(t: torch.Tensor) -> int:
    """Bytes a kernel touches in t: each distinct element once (a broadcast dimension, stride 0, is free)."""
    if t.numel() == 0:
        return 0
    return math.prod(s for s, st in zip(t.shape, t.stride()) if st != 0) * t.element_size()


def _tensors(tree) -> list[torch.Tensor]:
    flat, _ = torch.utils._pytree.tree_flatten(tree)
    return [t for t in flat if isinstance(t, torch.Tensor)]


class Trace(list):
    """The kernels of a traced step, with `marks`: where each block's forward and backward pass begin."""

    marks: BlockMarks | None = None
    block_bytes: list | None = None  # each block's weights as stored (what block swap copies)
    params: ParamCounts | None = None  # the model's parameters (full fine-tuning's optimizer and casts)


class KernelRecorder(TorchDispatchMode):
    """Records each kernel of the ops that run under it (views, which launch nothing, are skipped)."""

    def __init__(self):
        super().__init__()
        self.kernels: list[Kernel] = Trace()
        self._alive: list[torch.Tensor] = []  # keeps every buffer alive, so no id is reused

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        name = func._overloadpacket.__name__
        if func.is_view or name in ("detach", "lift_fresh", "alias", "_unsafe_view"):
            return out
        inputs, outputs = _tensors((args, kwargs)), _tensors(out)
        self._alive += outputs
        kind = ("matmul" if name in _MATMULS else name if name in _ATTENTION else "other")
        flops = self._flops(func, name, args, kwargs, out)
        self.kernels.append(Kernel(name, kind, flops, [(t.untyped_storage()._cdata, _bytes(t)) for t in inputs],
                                   [(t.untyped_storage()._cdata, _bytes(t)) for t in outputs],
                                   outputs[0].dtype if outputs else torch.float32))
        return out

    @staticmethod
    def _flops(func, name, args, kwargs, out) -> float:
        if name == "attention":  # q [B, H, Lq, D], k [B, H, Lk, D]: QK^T and PV
            q, k = args[0], args[1]
            return 4.0 * q.shape[0] * q.shape[1] * q.shape[2] * k.shape[2] * q.shape[3]
        if name == "attention_backward":  # 2.5x the forward (five matmuls), the FlashAttention convention
            q, k = args[1], args[2]
            return 10.0 * q.shape[0] * q.shape[1] * q.shape[2] * k.shape[2] * q.shape[3]
        counter = flop_registry.get(func._overloadpacket)
        return float(counter(*args, **kwargs, out_val=out)) if counter else 0.0


# ---- one step on the meta device ------------------------------------------------------------------------------


@dataclass(frozen=True)
class StepSetup:
    """What the traced step trains: one expert, a LoRA of `rank`, bf16 weights and compute."""

    variant: WanVariant
    width: int = 832
    height: int = 480
    frames: int = 81
    batch: int = 1
    rank: int = 32
    checkpointing: bool = True
    keep_attention: bool = False  # selective checkpointing: self-attention outputs kept, not recomputed
    keep_attention_blocks: int = 0  # ... in the last N checkpointed blocks only (without keep_attention)
    skip_blocks: int = 0  # the last N blocks not checkpointed: no recomputation (`gradient_checkpointing_skip_blocks`)
    fp8: bool = False  # block Linear weights in fp8, dequantised for each matmul (`fp8_base`)
    fp8_fast: bool = False  # ... multiplied in fp8 instead (`fp8_fast`; implies fp8 weights)
    offload_activations: bool = False  # checkpointed block inputs copied to the host and back (needs checkpointing)
    blocks_to_swap: int = 0  # the last N blocks streamed from host memory (`blocks_to_swap`; needs checkpointing)
    full: bool = False  # full fine-tuning: every DiT weight trains, no LoRA (`estimate_full.py`)
    full_bf16: bool = False  # ... with bf16 weights, gradients and optimizer state instead of fp32 masters
    optimizer: str = "AdamW"  # ... stepped by this optimizer (its state's size)
    offload_attention: bool = False  # the kept self-attention outputs copied with the offloaded inputs (the compute
    # is keep_attention's; needs offload_activations and keep_attention or keep_attention_blocks)

    def sent_blocks(self) -> int:
        """The blocks whose kept self-attention outputs go to the host with their inputs (`offload_attention`):
        the kept blocks (the last checkpointed ones) but the last checkpointed one, which keeps them."""
        if not (self.offload_attention and self.offload_activations and self.checkpointing):
            return 0
        checkpointed = max(0, self.variant.num_layers - self.skip_blocks)
        kept = checkpointed if self.keep_attention else min(self.keep_attention_blocks, checkpointed)
        return max(0, kept - 1)

    def latent_shape(self) -> tuple[int, ...]:
        v = self.variant
        st, sh, sw = v.vae_stride
        return (self.batch, v.latent_channels, (self.frames - 1) // st + 1, self.height // sh, self.width // sw)

    def tokens(self) -> int:
        _, _, f, h, w = self.latent_shape()
        pt, ph, pw = self.variant.patch_size
        return f // pt * (h // ph) * (w // pw)


def meta_model(variant: WanVariant, dtype=torch.bfloat16) -> WanModel:
    """The DiT on the meta device, frozen, with training dtypes (fp32 norms, modulation and time MLPs)."""
    with torch.device("meta"):
        model = build_dit(variant)
    for name, param in model.named_parameters():
        if not WanModel.is_fp32_param(name):
            param.data = param.data.to(dtype)
    model.compute_dtype = dtype
    return model.requires_grad_(False)


def _fp8_layers(model: WanModel, fast: bool) -> None:
    """The block Linears as fp8 layers on meta (no autocast check: it knows no meta device); `fast`: fp8 matmuls."""
    from library.wan.fp8 import FP8_DTYPE, FP8Linear, _FP8LinearFunction, fp8_targets

    class MetaFP8Linear(FP8Linear):
        def forward(self, x):
            return _FP8LinearFunction.apply(x, self.weight, self.scale_weight, self.bias, torch.bfloat16, fast)

    for name in fp8_targets(model):
        w = model.get_submodule(name).weight
        model.set_submodule(name, MetaFP8Linear(torch.empty(w.shape, dtype=FP8_DTYPE, device="meta"),
                                                torch.empty((), device="meta"), model.get_submodule(name).bias))


def trace_step(setup: StepSetup) -> Trace:
    """Every kernel of one LoRA training step (forward, MSE loss, backward) at full size, on meta, with the
    kernel indices where each block's forward and backward pass begin (`Trace.marks`)."""
    from networks import lora_wan

    v = setup.variant
    model = meta_model(v)
    if setup.fp8 or setup.fp8_fast:
        _fp8_layers(model, setup.fp8_fast)
    model.enable_gradient_checkpointing(setup.checkpointing, setup.keep_attention, setup.keep_attention_blocks,
                                        setup.skip_blocks)
    if setup.full:  # every weight trains: the backward pass computes each weight's gradient
        model.requires_grad_(True)
    else:
        network = lora_wan.create_network(1.0, setup.rank, setup.rank, None, None, model)
        network.apply_to()
        network.to("meta")
    meta = torch.device("meta")
    shape = setup.latent_shape()
    x, target = torch.empty(shape, device=meta), torch.empty(shape, device=meta)
    extra = v.vace_in_dim if v.is_vace else v.in_dim - v.latent_channels  # I2V / Fun channels, or VACE's context
    y = torch.empty(shape[0], extra, *shape[2:], device=meta) if extra else None
    context = torch.empty(setup.batch, v.text_len, v.text_dim, device=meta, dtype=torch.bfloat16)
    clip = torch.empty(setup.batch, v.clip_tokens * v.image_frames, v.clip_dim, device=meta) \
        if v.image_embedding else None  # FLF2V: the first and the last frame's tokens
    recorder, originals = KernelRecorder(), (F.scaled_dot_product_attention, F.rms_norm)
    model.block_runner = recorder.kernels.marks = BlockMarks(recorder.kernels)
    recorder.kernels.block_bytes = [sum(t.numel() * t.element_size() for t in b.state_dict().values())
                                    for b in model.blocks]
    recorder.kernels.params = count_params(model)
    F.scaled_dot_product_attention, F.rms_norm = counting_sdpa, counting_rms_norm
    try:
        with recorder:
            pred = model(x, torch.full((setup.batch,), 500.0, device=meta), context, y=y, clip_fea=clip)
            (pred.float() - target).pow(2).mean().backward()
    finally:
        F.scaled_dot_product_attention, F.rms_norm = originals
    return recorder.kernels


# ---- costing ------------------------------------------------------------------------------------------------------


@dataclass
class Cost:
    name: str
    kind: str
    flops: float
    bytes: float
    seconds: float
    first: int = 0  # the index of its (first) kernel in the trace


def attention_kernel(backend: str, gpu: GpuRates) -> str:
    """Which attention kernel (a key of `gpu.attention`) the code would run for `backend` on this GPU."""
    if backend == "flash3":
        if "fa3" not in gpu.attention:
            raise ValueError(f"FlashAttention 3 runs on Hopper GPUs only, not on the {gpu.name}")
        return "fa3"
    if backend == "sdpa":
        from library.wan import attention

        plan = getattr(attention, "sdpa_plan", None)  # absent before issue 17: PyTorch's order, FA2 first
        enabled = tuple(torch.nn.attention.SDPBackend.__members__[n] for n in
                        ("CUDNN_ATTENTION", "FLASH_ATTENTION", "EFFICIENT_ATTENTION", "MATH"))
        order = plan(gpu.capability, enabled).order if plan else None
        if order and order[0].name == "CUDNN_ATTENTION" and "cudnn" in gpu.attention:
            return "cudnn"
    return "fa2"  # flash_attn, xformers (cutlass, no faster than FA2) and SDPA's FlashAttention 2


def _rate(kernel: Kernel, gpu: GpuRates, attention: str) -> float:
    if kernel.kind == "attention":
        return gpu.attention[attention][0]
    if kernel.kind == "attention_backward":
        return gpu.attention[attention][1]
    if kernel.kind == "matmul" and kernel.name == "_scaled_mm":
        if not gpu.fp8_matmul_tflops:
            raise ValueError(f"the {gpu.name} has no fp8 matmul rate here (fp8 tensor cores: Ada, Hopper)")
        return gpu.fp8_matmul_tflops
    if kernel.kind == "matmul" and kernel.dtype != torch.float32:
        return gpu.matmul_tflops
    return gpu.vector_tflops


def _seconds(flops: float, nbytes: float, tflops: float, gpu: GpuRates) -> float:
    return max(flops / (tflops * 1e12), nbytes / (gpu.bandwidth_tbs * 1e12))


def cost(kernels: list[Kernel], gpu: GpuRates, attention: str, compiled: bool) -> list[Cost]:
    """The estimated time of each kernel; with `compiled`, runs of kernels that are neither matmuls nor
    attention are fused into one, which reads what comes from outside the run and writes what is used after."""
    if not compiled:
        return [Cost(k.name, k.kind, k.flops, sum(b for _, b in k.reads + k.writes),
                     _seconds(k.flops, sum(b for _, b in k.reads + k.writes), _rate(k, gpu, attention), gpu), i)
                for i, k in enumerate(kernels)]
    last_read: dict = {}
    for i, k in enumerate(kernels):
        for buffer, _ in k.reads:
            last_read[buffer] = i
    costs, start = [], 0
    for i in range(len(kernels) + 1):
        if i < len(kernels) and kernels[i].kind == "other":
            continue
        if start < i:
            costs.append(_fused(kernels, start, i, last_read, gpu))
        if i < len(kernels):
            k = kernels[i]
            nbytes = sum(b for _, b in k.reads + k.writes)
            seconds = _seconds(k.flops, nbytes, _rate(k, gpu, attention), gpu)
            costs.append(Cost(k.name, k.kind, k.flops, nbytes, seconds, i))
        start = i + 1
    return costs


def _fused(kernels: list[Kernel], start: int, end: int, last_read: dict, gpu: GpuRates) -> Cost:
    produced, reads, writes = set(), {}, {}
    for k in kernels[start:end]:
        for buffer, nbytes in k.reads:
            if buffer not in produced:
                reads[buffer] = max(reads.get(buffer, 0), nbytes)
        for buffer, nbytes in k.writes:
            produced.add(buffer)
            if last_read.get(buffer, math.inf) >= end:  # used after the run (or never read: a result)
                writes[buffer] = max(writes.get(buffer, 0), nbytes)
    flops = sum(k.flops for k in kernels[start:end])
    nbytes = sum(reads.values()) + sum(writes.values())
    names = sorted({k.name for k in kernels[start:end]})
    name = names[0] if len(names) == 1 else "fused(" + "+".join(names[:4]) + ("+..." if len(names) > 4 else "") + ")"
    return Cost(name, "other", flops, nbytes, _seconds(flops, nbytes, gpu.vector_tflops, gpu), start)


@dataclass
class StepEstimate:
    """The estimate of one step: time, MFU, where the time goes. Every figure is an estimate."""

    gpu: GpuRates
    setup: StepSetup
    attention: str
    compiled: bool
    seconds: float
    mfu: float
    model_tflop: float
    kernels: int
    memory_bound_tb: float
    by_kind: dict
    top: list  # [(name, kind, seconds, count)]
    offload: OffloadTime | None = None  # activation offload's traffic and exposed time (included in `seconds`)
    swap: SwapTime | None = None  # block swap's traffic and, with the activation copies, the wait for it (included)

    def table(self, top: int = 10) -> str:
        from .estimate_report import estimate_table

        return estimate_table(self, top)


def estimate_step(setup: StepSetup, gpu: str = "h100", attention: str = "sdpa", compiled: bool = False,
                  kernels: list[Kernel] | None = None, kernel: str | None = None) -> StepEstimate:
    """Trace (or reuse `kernels` of) one step and cost it on `gpu` (a key of GPUS); `kernel` forces the
    attention kernel (a key of the GPU's attention rates: `--sdpa_kernel`)."""
    rates = GPUS[gpu]
    if kernel is not None and kernel not in rates.attention:
        raise ValueError(f"no {kernel} attention rate for the {rates.name} (it has {', '.join(rates.attention)})")
    if setup.full and (setup.fp8 or setup.fp8_fast or setup.blocks_to_swap):
        raise ValueError("full fine-tuning trains the weights themselves: no fp8 weights, no block swap")
    kernels = trace_step(setup) if kernels is None else kernels
    kernel = kernel or attention_kernel(attention, rates)
    costs = cost(kernels, rates, kernel, compiled)
    seconds = sum(c.seconds for c in costs)
    offload = swap = None
    marks, input_bytes = getattr(kernels, "marks", None), 4 * setup.variant.dim * setup.tokens() * setup.batch
    if (setup.offload_activations or setup.blocks_to_swap) and (marks is None or not setup.checkpointing):
        raise ValueError("activation offload and block swap need checkpointing and a traced step (trace_step)")
    if setup.offload_attention and not (setup.offload_activations and (setup.keep_attention
                                                                       or setup.keep_attention_blocks)):
        raise ValueError("offload_attention sends the kept self-attention outputs with the offloaded block inputs: "
                         "it needs activation offload and kept attention (keep_attention or keep_attention_blocks)")
    v = setup.variant  # one block's kept self-attention output and log-sum-exp (the planner's constants)
    sent, kept = setup.sent_blocks(), (KEEP_PER_C * v.dim + KEEP_PER_HEAD * v.num_heads) * setup.tokens() * setup.batch
    if setup.offload_activations:
        offload = offload_time(costs, marks, input_bytes, rates, setup.skip_blocks, kept, sent)
    if setup.blocks_to_swap:  # the wait for weights and activations together (they share the link)
        if setup.skip_blocks:
            raise ValueError("block swap checkpoints every block: it cannot be combined with skip_blocks")
        swap = swap_time(costs, marks, kernels.block_bytes, rates, setup.blocks_to_swap,
                         copy_bytes(input_bytes, kept, len(marks.forward), sent) if setup.offload_activations
                         else 0.0)
    seconds += swap.exposed_s if swap else offload.exposed_s if offload else 0.0
    if setup.full:  # after the copies' replay: the optimizer step ends the step
        checkpointed = setup.variant.num_layers - setup.skip_blocks if setup.checkpointing else 0
        extra = full_costs(kernels.params, setup.optimizer, setup.full_bf16, checkpointed, rates, Cost)
        costs, seconds = costs + extra, seconds + sum(c.seconds for c in extra)
    by_kind, groups = defaultdict(float), defaultdict(lambda: [0.0, 0])
    for c in costs:
        label = {"matmul": "fp8 matmuls" if c.name == "_scaled_mm" else "matmuls",
                 "attention": f"attention forward ({kernel})",
                 "attention_backward": f"attention backward ({kernel})", "optimizer": "optimizer step",
                 "cast": "fp32 master casts"}.get(c.kind, "memory-bound kernels")
        by_kind[label] += c.seconds
        groups[(c.name, c.kind)][0] += c.seconds
        groups[(c.name, c.kind)][1] += 1
    top = sorted(((n, k, s, count) for (n, k), (s, count) in groups.items()), key=lambda t: -t[2])
    flops = step_flops(setup.variant, setup.tokens(), setup.batch, full=setup.full)
    memory = sum(c.bytes for c in costs if c.kind in ("other", "optimizer", "cast")) / 1e12
    mfu = flops / (seconds * rates.peak_tflops * 1e12)
    return StepEstimate(rates, setup, f"{attention} ({kernel})", compiled, seconds, mfu, flops / 1e12, len(costs),
                        memory, dict(by_kind), top, offload, swap)

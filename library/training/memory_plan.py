"""The memory planner: from the GPU's memory and the training job, estimate weights, LoRA + optimizer
state, activations and workspace, and choose fp8 / block swap / checkpointing (`auto_memory`,
`tools/plan_memory.py`).

Candidates are tried from fastest and most precise to most frugal; the first that fits is the plan:

    1 bf16 weights                 4 fp8 + checkpointing + activation offload
    2 bf16 + checkpointing         5 ... + block swap of N blocks, the smallest N that fits
    3 bf16 + checkpointing + activation offload

With two experts (WAN 2.2 A14B) each candidate is tried with both experts on the GPU, then with the
inactive one in host memory (`offload_inactive_dit`). A bigger card never gets a later candidate, so the
plan only adds features as the card gets smaller. When nothing fits, the plan says how many frames would.

The activation figures are per token and per block, in bytes, for this repo's DiT and LoRA (fp32 LoRA
maths) with a flash-style attention kernel (saves q, k, v, out and the log-sum-exp). They were measured
on the CPU with saved-tensor hooks and a dispatch-level allocation tracker on scaled-down blocks (see
tests/memory/test_plan.py, which re-measures them); the full-size figures are estimates until the GPU
benchmark (`tools/benchmark_wan.py`) measures them.

Full fine-tuning (`estimate_full`, `plan_full`, `tools/plan_memory.py --full`) has its own ladder, from
fastest and most precise to most frugal; with several processes the sharded rungs follow:

    1 fp32 master weights              6 fsdp, fp32 masters + checkpointing
    2 fp32 masters + checkpointing     7 fsdp, full_bf16 + checkpointing
    3 full_bf16 + checkpointing        8 fsdp, full_bf16 + checkpointing + activation offload
    4 ... + fused_backward_pass        9 ... + fsdp_cpu_offload (shards and optimizer state in host memory)
    5 ... + activation offload

Its weight, gradient and optimizer-state bytes are exact sums over the DiT's tensors (a meta-device model),
checked against a real optimizer step in tests/memory/test_plan.py; its activation and workspace figures
are the LoRA ones re-measured for trainable weights (ACT_FULL_PER_C), still estimates at full size.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from dataclasses import dataclass

from library.wan.variants import WanVariant, get_variant

GIB = 2**30
# Saved for backward by one block, per token: 43 C + 4 F bytes, plus 49 bytes per LoRA rank unit (measured
# on a bf16 block with LoRA by tests/memory/test_plan.py; the LoRA down-projection runs in bf16 and
# keeps no fp32 copy of its input).
ACT_PER_C, ACT_PER_F, ACT_PER_RANK = 43, 4, 49
# Transient gradients while one block runs its backward pass, per token.
WORK_PER_C, WORK_PER_F = 26, 3
FIXED_WORKSPACE_GIB = 0.25  # cuBLAS / attention kernel workspaces
CUDA_CONTEXT_GIB = 0.6  # the CUDA context and kernels: outside PyTorch's allocator, inside the card
FRAGMENTATION = 0.95  # the share of the rest the caching allocator can really use
# Optimizer state per fp32 LoRA parameter, in bytes. Full fine-tuning counts per tensor instead: states in
# the parameter's own dtype (OPTIMIZER_STATES), 8-bit states (OPTIMIZER_8BIT), or Adafactor's factored rows
# and columns; see `optimizer_state_bytes`.
OPTIMIZER_BYTES = {"adamw": 8, "adam": 8, "adamw8bit": 2, "adam8bit": 2, "pagedadamw8bit": 2, "lion": 4,
                   "lion8bit": 1, "adafactor": 1, "prodigy": 16, "sgd": 0, "sgdnesterov": 4}
SWAP_IN_FLIGHT = 3  # swapped blocks on the GPU at once with one block of prefetch (see block_swap.py)


@dataclass(frozen=True)
class Workload:
    variant: WanVariant
    width: int
    height: int
    frames: int
    batch_size: int = 1
    rank: int = 32
    optimizer: str = "adamw"
    experts: int = 1  # 2: both WAN 2.2 A14B experts are trained in one run

    @property
    def tokens(self) -> int:
        """Video tokens per sample: latent frames x (latent H / 2) x (latent W / 2)."""
        st, sh, sw = self.variant.vae_stride
        pt, ph, pw = self.variant.patch_size
        return ((self.frames - 1) // st + 1) // pt * (self.height // sh // ph) * (self.width // sw // pw)


@dataclass(frozen=True)
class Settings:
    fp8: bool = False
    checkpointing: bool = False
    offload_activations: bool = False
    blocks_to_swap: int = 0
    offload_inactive: bool = False

    def label(self) -> str:
        parts = ["fp8" if self.fp8 else "bf16"]
        if self.checkpointing:
            parts.append("ckpt" + ("+offload" if self.offload_activations else ""))
        if self.blocks_to_swap:
            parts.append(f"swap {self.blocks_to_swap}")
        if self.offload_inactive:
            parts.append("inactive expert on CPU")
        return ", ".join(parts)


@dataclass(frozen=True)
class Estimate:
    """GiB on the GPU at the peak (the backward pass of one block)."""

    weights: float
    lora: float  # LoRA weights, gradients and optimizer state
    activations: float
    workspace: float

    @property
    def total(self) -> float:
        return self.weights + self.lora + self.activations + self.workspace


# ---- sizes -----------------------------------------------------------------------------------------------


def block_linear_params(v: WanVariant) -> int:
    """Weights of the Linear layers of one block (what fp8 converts and MFU counts)."""
    image = 2 * v.dim * v.dim if v.image_embedding else 0
    return 8 * v.dim * v.dim + image + 2 * v.dim * v.ffn_dim


def block_other_params(v: WanVariant) -> tuple[int, int]:
    """(bf16 biases, fp32 norms + modulation) of one block."""
    linears = 10 if v.image_embedding else 8
    biases = linears * v.dim + v.ffn_dim + v.dim
    fp32 = 6 * v.dim + 2 * v.dim + (5 if v.image_embedding else 4) * v.dim
    return biases, fp32


def outer_params(v: WanVariant) -> tuple[int, int]:
    """(bf16, fp32) parameters outside the blocks: embeddings, time MLPs (fp32), head, CLIP projection."""
    c, patch = v.dim, math.prod(v.patch_size)
    bf16 = v.in_dim * patch * c + c + v.text_dim * c + c + c * c + c + c * patch * v.out_dim + patch * v.out_dim
    fp32 = v.freq_dim * c + c + c * c + c + 6 * c * c + 6 * c + 2 * c
    if v.image_embedding:
        d = v.clip_dim
        bf16 += d * d + d + d * c + c + 2 * d + 2 * c  # the CLIP projection's LayerNorms load in bf16 too
    return bf16, fp32


def lora_params(v: WanVariant, rank: int) -> int:
    """LoRA parameters over the WAN targets of every block: rank x (in + out) per Linear."""
    per_block = 8 * 2 * v.dim + (4 * v.dim if v.image_embedding else 0) + 2 * (v.dim + v.ffn_dim)
    return rank * per_block * v.num_layers


def _block_bytes(v: WanVariant, fp8: bool) -> float:
    biases, fp32 = block_other_params(v)
    scales = 12 * 4 if fp8 else 0
    return block_linear_params(v) * (1 if fp8 else 2) + scales + biases * 2 + fp32 * 4


def estimate(w: Workload, s: Settings) -> Estimate:
    v, t, b = w.variant, w.tokens, w.batch_size
    c, f = v.dim, v.ffn_dim
    bf16, fp32 = outer_params(v)
    resident_blocks = v.num_layers - s.blocks_to_swap + min(s.blocks_to_swap, SWAP_IN_FLIGHT)
    experts_on_gpu = 1 if (s.offload_inactive or w.experts == 1) else w.experts
    weights = experts_on_gpu * (bf16 * 2 + fp32 * 4 + resident_blocks * _block_bytes(v, s.fp8))
    lora = w.experts * lora_params(v, w.rank) * (8 + OPTIMIZER_BYTES.get(w.optimizer.lower(), 8))
    per_block = (ACT_PER_C * c + ACT_PER_F * f + ACT_PER_RANK * w.rank) * t * b
    context = 16 * c * v.text_len * b * (1 if s.checkpointing else v.num_layers)
    shared = (4 * v.head_dim + 4 * c) * t * b  # RoPE tables, the incoming fp32 gradient
    if not s.checkpointing:
        activations = v.num_layers * per_block + context + shared
    else:
        stored = 4 * c * t * b * (2 if s.offload_activations else v.num_layers)  # fp32 block inputs
        activations = per_block + stored + context + shared
    workspace = (WORK_PER_C * c + WORK_PER_F * f) * t * b + FIXED_WORKSPACE_GIB * GIB
    return Estimate(weights / GIB, lora / GIB, activations / GIB, workspace / GIB)


# ---- the plan --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MemoryPlan:
    vram_gb: float
    budget_gb: float  # what the allocator can use: (VRAM - CUDA context) x fragmentation margin
    workload: Workload
    settings: Settings
    estimate: Estimate
    fits: bool
    candidates: tuple[tuple[Settings, Estimate], ...]

    def apply(self, memory):
        """A copy of a `MemoryArgs` with the planned settings (`auto_memory`)."""
        s = self.settings
        return dataclasses.replace(
            memory, fp8_base=s.fp8, fp8_scaled=s.fp8, gradient_checkpointing=s.checkpointing,
            gradient_checkpointing_cpu_offload=s.offload_activations, blocks_to_swap=s.blocks_to_swap,
            use_pinned_memory_for_block_swap=s.blocks_to_swap > 0 or memory.use_pinned_memory_for_block_swap,
            offload_inactive_dit=s.offload_inactive,
        )

    def table(self) -> str:
        w = self.workload
        head = (f"{w.variant.name} x{w.experts} expert(s), {w.width}x{w.height}x{w.frames}, batch {w.batch_size}, "
                f"{w.tokens} tokens, LoRA rank {w.rank}, {w.optimizer}; {self.vram_gb:g} GiB card, "
                f"{self.budget_gb:.1f} GiB usable (estimates)")
        cols = ("", "settings", "weights", "LoRA+opt", "activations", "workspace", "total", "fits")
        rows = [cols]
        for s, e in self.candidates:
            mark = "->" if s == self.settings else ""
            rows.append((mark, s.label(), *(f"{x:.1f}" for x in (e.weights, e.lora, e.activations, e.workspace,
                                                                  e.total)), "yes" if e.total <= self.budget_gb else "no"))
        widths = [max(len(r[i]) for r in rows) for i in range(len(cols))]
        lines = [head] + ["  ".join(cell.ljust(wd) if i < 2 else cell.rjust(wd) for i, (cell, wd) in
                                    enumerate(zip(r, widths))) for r in rows]
        if self.fits:
            verdict = f"plan: {self.settings.label()} ({self.estimate.total:.1f} GiB)"
        else:
            frames = largest_frames(self.vram_gb, w)
            hint = f"at {w.width}x{w.height} up to {frames} frames fit" if frames else "no frame count fits"
            verdict = (f"does not fit even with {self.settings.label()} ({self.estimate.total:.1f} GiB > "
                       f"{self.budget_gb:.1f}); {hint}; or lower the resolution, batch size or rank")
        return "\n".join(lines + [verdict])


def _candidates(w: Workload):
    base = [Settings(), Settings(checkpointing=True), Settings(checkpointing=True, offload_activations=True),
            Settings(fp8=True, checkpointing=True, offload_activations=True)]
    swaps = [Settings(True, True, True, n) for n in range(1, w.variant.num_layers)]
    for s in base + swaps:
        yield s
        if w.experts > 1:
            yield dataclasses.replace(s, offload_inactive=True)


def plan_memory(vram_gb: float, variant: WanVariant | str, width: int, height: int, frames: int,
                batch_size: int = 1, rank: int = 32, optimizer: str = "adamw", experts: int = 1) -> MemoryPlan:
    """The first candidate (see the module docstring) whose estimated peak fits the card."""
    variant = get_variant(variant) if isinstance(variant, str) else variant
    w = Workload(variant, width, height, frames, batch_size, rank, optimizer, experts)
    budget = (vram_gb - CUDA_CONTEXT_GIB) * FRAGMENTATION
    tried = []
    for s in _candidates(w):
        e = estimate(w, s)
        tried.append((s, e))
        if e.total <= budget:
            return MemoryPlan(vram_gb, budget, w, s, e, True, _shown(tried))
    s, e = tried[-1]
    return MemoryPlan(vram_gb, budget, w, s, e, False, _shown(tried))


def largest_frames(vram_gb: float, w: Workload) -> int:
    """The most frames (4k + 1) that fit with the most frugal settings, 0 when not even 1 frame does."""
    frugal = Settings(True, True, True, w.variant.num_layers - 1, w.experts > 1)
    budget = (vram_gb - CUDA_CONTEXT_GIB) * FRAGMENTATION
    best = 0
    for frames in range(1, w.frames + 1, 4):
        if estimate(dataclasses.replace(w, frames=frames), frugal).total > budget:
            break
        best = frames
    return best


def _shown(tried: list) -> tuple:
    """The table's rows: the non-swap candidates and the last one tried (the plan)."""
    keep = [(s, e) for s, e in tried if not s.blocks_to_swap]
    if tried[-1][0].blocks_to_swap:
        keep.append(tried[-1])
    return tuple(keep)


def detect_vram_gb(device=None) -> float | None:
    """Total memory of the CUDA device in GiB, or None without CUDA."""
    import torch

    if not torch.cuda.is_available():
        return None
    return torch.cuda.get_device_properties(device or torch.cuda.current_device()).total_memory / GIB


# ---- full fine-tuning ------------------------------------------------------------------------------------

# Saved for backward by one block whose own weights train, per token (measured like ACT_PER_C, on fp32
# weights under bf16 autocast with a trainable timestep embedding): 22 C more than a LoRA block without its
# rank term, for the fp32 normalised inputs that the gradients of the norms, the modulation and the gates need.
ACT_FULL_PER_C, ACT_FULL_PER_F = 65, 4
# Optimizer states per element in the parameter's own dtype (4 bytes for fp32 masters, 2 with full_bf16).
OPTIMIZER_STATES = {"adamw": 2, "adam": 2, "lion": 1, "prodigy": 4, "sgd": 0, "sgdnesterov": 1}
# bitsandbytes 8-bit states, 1 byte per element each, plus an fp32 absmax per block of 256; tensors under
# 4096 elements keep fp32 states.
OPTIMIZER_8BIT = {"adamw8bit": 2, "adam8bit": 2, "pagedadamw8bit": 2, "lion8bit": 1}
# Temporaries of the optimizer step. torch's AdamW on CUDA defaults to its multi-tensor (foreach) step, which
# allocates one tensor list the size of a state (sqrt(v)) for every tensor it steps at once; the others loop
# over the tensors, with this many fp32 copies of the tensor being stepped.
FOREACH_STEP = ("adamw", "adam")
STEP_TEMPS = {"adafactor": 4, "lion": 1, "prodigy": 2, "sgd": 0, "sgdnesterov": 0}
AVERAGING_BUCKET = 1 << 26  # elements per gradient-averaging collective without fsdp (Optimization.average_gradients)
# With fsdp, unsharded blocks on the GPU at once: the one computing and the one prefetched.
FSDP_GATHERED_BLOCKS = 2
# Autocast's weight cache would keep the bf16 copy of each trainable fp32 Linear / Conv weight for the whole
# forward pass, checkpointed or not, and under fsdp of the unsharded weight (measured on the CPU with FSDP2).
# The trainer autocasts full fine-tuning without the cache (Trainer.autocast_kwargs), so only the copies saved
# for backward by non-checkpointed layers remain.
AUTOCAST_WEIGHT_CACHE = False


@dataclass(frozen=True)
class FullWorkload(Workload):
    """A full fine-tuning job (`rank` is unused): the processes training together and the trainable set."""

    processes: int = 1
    trainable_patterns: tuple[str, ...] = ()
    frozen_patterns: tuple[str, ...] = ()


@dataclass(frozen=True)
class FullSettings:
    full_bf16: bool = False
    checkpointing: bool = False
    offload_activations: bool = False
    fused_backward_pass: bool = False
    fsdp: bool = False
    fsdp_cpu_offload: bool = False

    def label(self) -> str:
        parts = ["bf16" if self.full_bf16 else "fp32 masters"]
        if self.checkpointing:
            parts.append("ckpt" + ("+offload" if self.offload_activations else ""))
        if self.fused_backward_pass:
            parts.append("fused")
        if self.fsdp:
            parts.append("fsdp" + (" + cpu offload" if self.fsdp_cpu_offload else ""))
        return ", ".join(parts)


@dataclass(frozen=True)
class ParamInfo:
    name: str
    shape: tuple[int, ...]
    block: int  # the block index, -1 outside the blocks
    fp32: bool  # kept in fp32 whatever the training precision (WanModel.is_fp32_param)
    cast: bool  # a Linear / Conv parameter: autocast computes with a bf16 copy of it
    trainable: bool

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@functools.lru_cache(maxsize=32)
def param_inventory(v: WanVariant, include: tuple[str, ...] = (),
                    exclude: tuple[str, ...] = ()) -> tuple[ParamInfo, ...]:
    """Every DiT parameter (from a meta-device model) and whether it trains (`trainable_patterns` /
    `frozen_patterns`, chosen exactly as the trainer chooses them)."""
    import torch

    from library.wan.model import WanModel

    from .full import select_trainable

    with torch.device("meta"):
        model = WanModel(v)
    trainable = set(select_trainable(model, include, exclude))
    layers = (torch.nn.Linear, torch.nn.Conv3d)
    cast = {f"{m}.{p}".lstrip(".") for m, mod in model.named_modules() if isinstance(mod, layers)
            for p, _ in mod.named_parameters(recurse=False)}
    return tuple(ParamInfo(n, tuple(p.shape), int(n.split(".")[1]) if n.startswith("blocks.") else -1,
                           WanModel.is_fp32_param(n), n in cast, n in trainable) for n, p in model.named_parameters())


def optimizer_state_bytes(optimizer: str, shape: tuple[int, ...], dtype_bytes: int) -> int:
    """Bytes of optimizer state for one trainable tensor stored in `dtype_bytes` per element."""
    key, n = optimizer.lower().replace("_", ""), math.prod(shape)
    if key in OPTIMIZER_8BIT:
        return OPTIMIZER_8BIT[key] * (n + 4 * math.ceil(n / 256) if n >= 4096 else 4 * n)
    if key == "adafactor":  # transformers' Adafactor without beta1: fp32 row and column means, or a full
        if len(shape) < 2:  # second moment for vectors
            return 4 * n
        return 4 * (math.prod(shape[:-1]) + math.prod(shape[:-2]) * shape[-1])
    return OPTIMIZER_STATES.get(key, 2) * dtype_bytes * n


@dataclass(frozen=True)
class StateBytes:
    """Exact bytes of one expert's weights, gradients and optimizer state, unsharded, and the pieces the
    peak is built from."""

    weights: int
    grads: int  # every trainable tensor's gradient (the dtype of its weight)
    optimizer: int
    largest_grad: int  # the largest trainable tensor's gradient: all `fused_backward_pass` keeps at once
    block_weights: int  # the largest block's parameters (what fsdp gathers)
    block_grads: int
    outer_weights: int  # embeddings, time MLPs, head (fsdp's root: stays gathered through the step)
    outer_grads: int
    cast: int  # bf16 copies of the trainable fp32 Linear / Conv parameters that autocast computes with
    block_cast: int  # ... of the largest block
    outer_cast: int  # ... outside the blocks
    step: int  # the optimizer step's temporaries


@functools.lru_cache(maxsize=256)
def state_bytes(w: FullWorkload, s: FullSettings) -> StateBytes:
    params = param_inventory(w.variant, tuple(w.trainable_patterns), tuple(w.frozen_patterns))
    master = 2 if s.full_bf16 else 4

    def stored(p: ParamInfo) -> int:  # frozen weights are bf16 unless the model keeps them in fp32
        return 4 if p.fp32 else (master if p.trainable else 2)

    train = [p for p in params if p.trainable]
    copied = [p for p in train if p.cast and stored(p) == 4]

    def per_block(items, size) -> tuple[int, int]:  # (the largest block's sum, the sum outside the blocks)
        blocks: dict[int, int] = {}
        for p in items:
            blocks[p.block] = blocks.get(p.block, 0) + size(p)
        outer = blocks.pop(-1, 0)
        return max(blocks.values(), default=0), outer

    block_w, outer_w = per_block(params, lambda p: p.numel * stored(p))
    block_g, outer_g = per_block(train, lambda p: p.numel * stored(p))
    block_c, outer_c = per_block(copied, lambda p: 2 * p.numel)
    largest = max(train, key=lambda p: p.numel * stored(p))
    key = w.optimizer.lower().replace("_", "")
    if key in FOREACH_STEP:
        step = largest.numel * stored(largest) if s.fused_backward_pass else sum(p.numel * stored(p) for p in train)
    else:
        step = 0 if key in OPTIMIZER_8BIT else STEP_TEMPS.get(key, 2) * 4 * largest.numel
    return StateBytes(
        weights=sum(p.numel * stored(p) for p in params), grads=sum(p.numel * stored(p) for p in train),
        optimizer=sum(optimizer_state_bytes(w.optimizer, p.shape, stored(p)) for p in train),
        largest_grad=largest.numel * stored(largest), block_weights=block_w, block_grads=block_g,
        outer_weights=outer_w, outer_grads=outer_g, cast=sum(2 * p.numel for p in copied), block_cast=block_c,
        outer_cast=outer_c, step=step)


@dataclass(frozen=True)
class FullEstimate:
    """GiB per process at the peak of a step (`peak`: the end of the forward pass, the backward pass or the
    optimizer step); `host` is the host RAM the process holds for the GPU (offloaded shards, activations)."""

    weights: float
    grads: float
    optimizer: float
    copies: float  # bf16 copies autocast keeps, fsdp's gathered blocks and unsharded block gradients
    activations: float
    workspace: float  # backward-pass transients, the optimizer step's temporaries, kernel workspaces
    host: float
    peak: str

    @property
    def total(self) -> float:
        return self.weights + self.grads + self.optimizer + self.copies + self.activations + self.workspace


def estimate_full(w: FullWorkload, s: FullSettings) -> FullEstimate:
    """The peak GPU memory of one process: the largest of the three moments of a step (see FullEstimate)."""
    v, t, b, layers = w.variant, w.tokens, w.batch_size, w.variant.num_layers
    c, f = v.dim, v.ffn_dim
    sb = state_bytes(w, s)
    n = w.processes if s.fsdp else 1
    on_gpu = 0 if s.fsdp_cpu_offload else 1
    weights, optim = w.experts * sb.weights / n * on_gpu, w.experts * sb.optimizer / n * on_gpu
    gathered = FSDP_GATHERED_BLOCKS * sb.block_weights + sb.outer_weights if s.fsdp else 0
    # activations: LoRA's rules with the full fine-tuning coefficients
    per_block = (ACT_FULL_PER_C * c + ACT_FULL_PER_F * f) * t * b
    block_input = 4 * c * t * b  # what checkpointing keeps of a block: its fp32 input
    context = 16 * c * v.text_len * b * (1 if s.checkpointing else layers)
    shared = (4 * v.head_dim + 4 * c) * t * b
    work = (WORK_PER_C * c + WORK_PER_F * f) * t * b + FIXED_WORKSPACE_GIB * GIB + sb.largest_grad
    if s.checkpointing:  # kept per block through the backward pass: (activations, bf16 copies)
        kept, kept_copies = (0 if s.offload_activations else block_input), 0
        fixed = per_block + (2 * block_input if s.offload_activations else 0)  # the recomputed block, inputs in flight
        fixed_copies = sb.block_cast
    else:
        kept, kept_copies, fixed, fixed_copies = per_block, sb.block_cast, 0, 0
    host = layers * block_input if s.checkpointing and s.offload_activations else 0
    step = sb.step / n
    if s.fsdp_cpu_offload:
        host += (w.experts * (sb.weights + sb.optimizer) + sb.grads) / n + step
    # the end of the forward pass: autocast's cache holds a bf16 copy of every trainable fp32 weight; without
    # the cache, the copies saved for backward (non-checkpointed layers) remain
    forward_copies = sb.cast if AUTOCAST_WEIGHT_CACHE or not s.checkpointing else sb.outer_cast
    moments = [FullEstimate(weights, 0, optim, forward_copies + gathered, layers * kept + fixed + context + shared,
                            FIXED_WORKSPACE_GIB * GIB, host, "forward")]
    # backward: the first block to run it still has every block's kept tensors and one block's gradients; the
    # last has one block's kept tensors and every gradient
    in_flight = sb.outer_cast + fixed_copies + (gathered + sb.block_grads if s.fsdp else 0)
    if s.fused_backward_pass:
        early_grads = late_grads = 0  # only the tensor being stepped (in `work`), and its step temporaries
        work += step
    else:
        early_grads, late_grads = (sb.block_grads + sb.outer_grads) / n * on_gpu, sb.grads / n * on_gpu
    for stack, grads in ((layers, early_grads), (1, late_grads)):
        moments.append(FullEstimate(weights, grads, optim, in_flight + stack * kept_copies,
                                    stack * kept + fixed + context + shared, work, host, "backward"))
    if not s.fused_backward_pass:
        averaging = 2 * AVERAGING_BUCKET * (2 if s.full_bf16 else 4) if w.processes > 1 and not s.fsdp else 0
        moments.append(FullEstimate(weights, sb.grads / n * on_gpu, optim, 0, 0,
                                    step * on_gpu + averaging + FIXED_WORKSPACE_GIB * GIB, host, "step"))
    peak = max(moments, key=lambda e: e.total)
    sizes = ("weights", "grads", "optimizer", "copies", "activations", "workspace", "host")
    return dataclasses.replace(peak, **{k: getattr(peak, k) / GIB for k in sizes})


@dataclass(frozen=True)
class FullPlan:
    vram_gb: float
    budget_gb: float
    workload: FullWorkload
    settings: FullSettings
    estimate: FullEstimate
    fits: bool
    candidates: tuple[tuple[FullSettings, FullEstimate], ...]  # those tried, up to the plan
    hints: tuple[str, ...] = ()  # when nothing fits: what would

    def apply(self, memory, finetune):
        """Copies of a `MemoryArgs` and a `FineTuneArgs` with the planned settings."""
        s = self.settings
        return (dataclasses.replace(memory, gradient_checkpointing=s.checkpointing,
                                    gradient_checkpointing_cpu_offload=s.offload_activations),
                dataclasses.replace(finetune, full_fine_tune=True, full_bf16=s.full_bf16,
                                    fused_backward_pass=s.fused_backward_pass, fsdp=s.fsdp,
                                    fsdp_cpu_offload=s.fsdp_cpu_offload))

    def table(self) -> str:
        w = self.workload
        head = (f"{w.variant.name} x{w.experts} expert(s), {w.width}x{w.height}x{w.frames}, batch {w.batch_size}, "
                f"{w.tokens} tokens, full fine-tuning, {w.optimizer}, {w.processes} process(es); {self.vram_gb:g} GiB "
                f"card, {self.budget_gb:.1f} GiB usable (estimates, GiB per process)")
        cols = ("", "settings", "weights", "grads", "optim", "copies", "activations", "workspace", "total", "peak at",
                "host RAM", "fits")
        rows = [cols]
        for s, e in self.candidates:
            rows.append(("->" if s == self.settings else "", s.label(), *(f"{x:.1f}" for x in (
                e.weights, e.grads, e.optimizer, e.copies, e.activations, e.workspace, e.total)), e.peak,
                f"{e.host:.1f}", "yes" if e.total <= self.budget_gb else "no"))
        widths = [max(len(r[i]) for r in rows) for i in range(len(cols))]
        lines = [head] + ["  ".join(cell.ljust(wd) if i < 2 else cell.rjust(wd) for i, (cell, wd) in
                                    enumerate(zip(r, widths))) for r in rows]
        if self.fits:
            verdict = f"plan: {self.settings.label()} ({self.estimate.total:.1f} GiB per process)"
        else:
            verdict = (f"does not fit even with {self.settings.label()} ({self.estimate.total:.1f} GiB > "
                       f"{self.budget_gb:.1f}); " + ("; ".join(self.hints) or "nothing tried fits"))
        return "\n".join(lines + [verdict])


def full_candidates(processes: int) -> list[FullSettings]:
    """The full fine-tuning ladder of the module docstring: the sharded rungs only with several processes
    (fused_backward_pass and fsdp do not combine)."""
    ladder = [FullSettings(), FullSettings(checkpointing=True), FullSettings(True, True),
              FullSettings(True, True, fused_backward_pass=True), FullSettings(True, True, True, True)]
    if processes > 1:
        ladder += [FullSettings(checkpointing=True, fsdp=True), FullSettings(True, True, fsdp=True),
                   FullSettings(True, True, True, fsdp=True),
                   FullSettings(True, True, True, fsdp=True, fsdp_cpu_offload=True)]
    return ladder


def plan_full(vram_gb: float, variant: WanVariant | str, width: int, height: int, frames: int, batch_size: int = 1,
              optimizer: str = "adamw", processes: int = 1, experts: int = 1, trainable_patterns: tuple[str, ...] = (),
              frozen_patterns: tuple[str, ...] = (), show_all: bool = False) -> FullPlan:
    """The first rung of the full fine-tuning ladder whose estimated peak per process fits the card; when none
    does, the plan says what would (another optimizer, more GPUs, fewer frames). `show_all` keeps every rung in
    the table, not only those tried."""
    variant = get_variant(variant) if isinstance(variant, str) else variant
    w = FullWorkload(variant, width, height, frames, batch_size, 0, optimizer, experts, processes,
                     tuple(trainable_patterns), tuple(frozen_patterns))
    budget = (vram_gb - CUDA_CONTEXT_GIB) * FRAGMENTATION
    tried = [(s, estimate_full(w, s)) for s in full_candidates(processes)]
    chosen = next((i for i, (_, e) in enumerate(tried) if e.total <= budget), None)
    if chosen is not None:
        s, e = tried[chosen]
        return FullPlan(vram_gb, budget, w, s, e, True, tuple(tried if show_all else tried[: chosen + 1]))
    s, e = tried[-1]
    return FullPlan(vram_gb, budget, w, s, e, False, tuple(tried), _full_hints(budget, w))


def _fits_full(budget: float, w: FullWorkload) -> FullSettings | None:
    return next((s for s in full_candidates(w.processes) if estimate_full(w, s).total <= budget), None)


def _full_hints(budget: float, w: FullWorkload) -> tuple[str, ...]:
    hints = []
    for optimizer in ("AdamW8bit", "Adafactor"):
        if optimizer.lower() != w.optimizer.lower().replace("_", ""):
            s = _fits_full(budget, dataclasses.replace(w, optimizer=optimizer))
            if s:
                hints.append(f"with {optimizer}: {s.label()}")
    more = next((n for n in (2, 4, 8, 16, 32, 64) if n > w.processes and
                 _fits_full(budget, dataclasses.replace(w, processes=n))), None)
    if more:
        rung = _fits_full(budget, dataclasses.replace(w, processes=more))
        hints.append(f"with {w.optimizer} over {more} GPUs: {rung.label()}")
    for n in (w.processes,) if more else (w.processes, max(8, w.processes)):  # fewer frames (on more GPUs)
        fewer = dataclasses.replace(w, processes=n)
        frames = max((fr for fr in range(1, w.frames, 4) if _fits_full(budget, dataclasses.replace(fewer, frames=fr))),
                     default=0)
        if frames:
            where = f" over {n} GPUs" if n != w.processes else ""
            hints.append(f"at {w.width}x{w.height} up to {frames} frames{where}")
            break
    return tuple(hints)

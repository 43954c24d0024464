"""The memory planner: from the GPU's memory and the training job, estimate weights, LoRA + optimizer
state, activations and workspace, and choose fp8 / block swap / checkpointing (`auto_memory`,
`tools/plan_memory.py`).

Candidates are tried from fastest and most precise to most frugal; the first that fits the GPU, and
whose host memory fits the host, is the plan:

    1 bf16 weights                                   6 bf16 + ckpt + offload, keeping attention in K blocks,
    2 bf16 + checkpointing keeping self-attention      each K on the GPU, then on the host
    3 bf16 + ckpt + offload keeping self-attention   7 bf16 + checkpointing + activation offload
    4 ... keeping self-attention on the host         8 fp8 + ckpt + offload keeping attention on the host
    5 bf16 + ckpt keeping attention in K blocks,     9 ... + block swap of N blocks, the smallest N that fits
      then bf16 + checkpointing                     10 fp8 + ckpt + offload, then + block swap of N blocks

Then the skip stage: on top of the first rung that fits (with checkpointing and without block swap), the
last N blocks are not checkpointed (`gradient_checkpointing_skip_blocks`), the largest N that fits; where that
rung does not offload, its variant with activation offload is tried too, and where it keeps attention on the
GPU its variant keeping it on the host, and the largest N wins (a tie keeps the earlier: less traffic). A
skipped block keeps all its activations (`per_block` in `estimate`, about 8.5 GiB for an A14B block at
832x480x81) and runs no recomputation at all, the largest saving per block; N = 1 costs about nothing, as the
last block's backward pass follows its forward pass directly. Keeping attention in K blocks becomes K - N, the
kept set minus the skipped blocks, so no block recomputes more than before. It only spends leftover memory on
speed, so a bigger card never gets fewer skipped blocks on the same rung.

Keeping self-attention is selective checkpointing (`gradient_checkpointing_keep_attention`): each block's
self-attention output and log-sum-exp stay on the GPU (2 C + 4 H bytes a token and block), so the backward
pass does not run the attention forward again. "In K blocks" keeps them in the last K blocks only
(`gradient_checkpointing_keep_attention_blocks`), K from num_layers - 1 down to 1: the largest K that fits.
Activation offload (`gradient_checkpointing_cpu_offload`) moves each checkpointed block input (the fp32
residual stream, 4 C bytes a token) to pinned host memory in the forward pass and back in the backward.
"On the host" (`gradient_checkpointing_offload_attention`) sends each kept output with its block's input and
gets it back with it, one block ahead of the backward pass; the last checkpointed block keeps both on the GPU.
The GPU then holds the kept outputs of the blocks in flight only (`_checkpointed_peak`): one block's more than
plain ckpt + offload, which is 0.32 GiB for A14B at 832x480x81 against 12.2 GiB for every block's; the host
holds those of the other kept blocks beside their inputs.

Why offload keeping every block's attention (3) comes before keeping K < num_layers blocks without offload
(5): by the step-time estimator (`tools/benchmark_wan.py --estimate`, `estimate_offload.py`) the copies run
beside the compute and hide behind it. For one A14B expert at 832x480x81 on an H100 a block input is 0.67 GB
each way, 13.1 ms over PCIe 5.0 at 51.2 GB/s, against 75 ms of forward and 203 ms of backward compute per
block: nothing is exposed, so rung 3 runs as fast as rung 2 (10.58 s a step, estimate), while keeping 19 of
40 blocks without offload recomputes 21 self-attentions (11.35 s). The same holds for TI2V-5B (6.5 ms
against 32 ms) and on an RTX 4090 over PCIe 4.0 (26 ms against 350 ms for A14B). Keeping 39 blocks without
offload would only win where the copies are exposed by more than one attention forward (37 ms here); the
transfer time over a block's forward compute is at most rate / (6 C link) for any token count (matmuls
alone), 0.4 for C = 5120 on an H100 over PCIe 5.0. Rung 5 needs more GPU memory than rung 3 anyway:
offload frees 4 C T (L - 2) bytes, keeping every block costs (2 C + 4 H) T (L - 1), about half of that; so
rung 5 (and plain checkpointing) is reached only when the host cannot hold the offloaded inputs.

Why the kept outputs on the host (4) come right after keeping them on the GPU (3) and before every rung that
recomputes attention: they make each copy half as long again (0.34 GB more, 39.5 ms in all a block each way
over PCIe 4.0 against 350 ms of forward compute on an RTX 4090; 19.8 ms against 75 ms on an H100), still
hidden, while a recomputed self-attention costs its forward pass again (about 180 ms a block on the 4090).
Rung 3 stays first where it fits: no extra traffic. Rung 4 fits the GPU wherever rung 5, or 6 with K > 1,
does (it needs one kept output more than ckpt + offload), so those are reached only when the host cannot hold
the kept outputs; in 6 each K is tried on the GPU, then on the host, so the largest K either way wins. fp8
weights come after every bf16 rung (they cost precision), and among the fp8 rungs the same holds: keeping
attention on the host, with block swap where needed (9: the 24 GB plans, fp8 + ckpt + offload keeping
attention on the host + swap 36 on an RTX 4090, 50.3 s a step against 57.6 s recomputing it with swap 35,
estimates), before any fp8 rung that recomputes attention (10), which is where the planner falls back when
the host RAM check refuses the kept outputs. A swapped block's copy (13.7 ms on the 4090) hides as well, so
block swap keeping attention comes before no swap recomputing it. With `fp8_fast` (fp8 matmuls need fp8
weights) every rung is taken with fp8 weights, the swap rungs of 9 right after rung 4.

Host RAM: `plan_memory(host_ram_gb=...)` (auto_memory: MemAvailable shared among the node's processes,
`host.detect_host_ram_gb`) skips every candidate whose host memory, `Estimate.host` (offloaded block inputs
in exact-size pinned buffers, L - 1 of them, with the kept outputs sent along; swapped blocks; an inactive
expert), is more than
`HOST_FRACTION` of it; the table says "no: host RAM". Without it (None) host RAM is not checked.

With two experts (WAN 2.2 A14B) each candidate is tried with both experts on the GPU, then with the
inactive one in host memory (`offload_inactive_dit`). A bigger card never gets a later candidate, so the
plan only adds features as the card gets smaller. When nothing fits, the plan says how many frames would.

The activation figures are per token and per block, in bytes, for this repo's DiT and LoRA (fp32 LoRA
maths) with a flash-style attention kernel (saves q, k, v, out and the log-sum-exp). They were measured
on the CPU with saved-tensor hooks and a dispatch-level allocation tracker on scaled-down blocks (see
tests/memory/test_plan.py, which re-measures them); the full-size figures are estimates until the GPU
benchmark (`tools/benchmark_wan.py`) measures them.

Full fine-tuning is planned in `full.py`; the table is drawn by `table.py`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from library.wan.variants import WanVariant, get_variant

from .host import HOST_FRACTION
from .lora_settings import Estimate, Settings, Workload, skipping_label  # noqa: F401  (imported from here by others)
from .sizes import _block_bytes, lora_params, outer_params, vace_params
from .sizes import block_linear_params, block_other_params  # noqa: F401  (imported from here by others)
from .table import lora_table

GIB = 2**30
# Saved for backward by one block, per token: 43 C + 4 F bytes, plus 49 bytes per LoRA rank unit (measured
# on a bf16 block with LoRA by tests/memory/test_plan.py; the LoRA down-projection runs in bf16 and
# keeps no fp32 copy of its input).
ACT_PER_C, ACT_PER_F, ACT_PER_RANK = 43, 4, 49
# Transient gradients while one block runs its backward pass, per token.
WORK_PER_C, WORK_PER_F = 26, 3
# Kept per token and block by selective checkpointing: the self-attention output in bf16 (2 C bytes) and
# its fp32 log-sum-exp, one per head (4 H bytes); measured by tests/memory/test_plan.py.
KEEP_PER_C, KEEP_PER_HEAD = 2, 4
FIXED_WORKSPACE_GIB = 0.25  # cuBLAS / attention kernel workspaces
CUDA_CONTEXT_GIB = 0.6  # the CUDA context and kernels: outside PyTorch's allocator, inside the card
FRAGMENTATION = 0.95  # the share of the rest the caching allocator can really use
# Optimizer state per fp32 LoRA parameter, in bytes. Full fine-tuning counts per tensor instead: states in
# the parameter's own dtype (OPTIMIZER_STATES), 8-bit states (OPTIMIZER_8BIT), or Adafactor's factored rows
# and columns; see `optimizer_state_bytes`.
OPTIMIZER_BYTES = {"adamw": 8, "adam": 8, "adamw8bit": 2, "adam8bit": 2, "pagedadamw8bit": 2, "lion": 4,
                   "lion8bit": 1, "adafactor": 1, "prodigy": 16, "sgd": 0, "sgdnesterov": 4}
SWAP_IN_FLIGHT = 3  # swapped blocks on the GPU at once with one block of prefetch (see block_swap.py)


# ---- sizes (the parts' counts: sizes.py) ----------------------------------------------------------------


def estimate(w: Workload, s: Settings) -> Estimate:
    v, t, b = w.variant, w.local_tokens, w.batch_size
    c, f = v.dim, v.ffn_dim
    bf16, fp32 = outer_params(v)
    resident_blocks = v.num_layers - s.blocks_to_swap + min(s.blocks_to_swap, SWAP_IN_FLIGHT)
    experts_on_gpu = 1 if (s.offload_inactive or w.experts == 1) else w.experts
    vace_bf16, vace_fp32 = vace_params(v)  # VACE blocks: always resident, never fp8
    outside = bf16 * 2 + fp32 * 4 + vace_bf16 * 2 + vace_fp32 * 4
    weights = experts_on_gpu * (outside + resident_blocks * _block_bytes(v, s.fp8))
    # host memory: each swapped block of each expert on the GPU, the whole inactive expert, and every block input
    # but the last one's (`memory.BlockRunner`) in an exact-size pinned buffer
    host = experts_on_gpu * s.blocks_to_swap * _block_bytes(v, s.fp8)
    if s.offload_inactive and w.experts > 1:
        host += outside + v.num_layers * _block_bytes(v, s.fp8)
    checkpointed = s.checkpointed_blocks(v.num_layers)
    if s.checkpointing and s.offload_activations:
        host += 4 * c * t * b * max(0, checkpointed - 1)
    host += kept_bytes(w) * s.sent_blocks(v.num_layers)  # `offload_attention`: the kept outputs sent with them
    lora = w.experts * lora_params(v, w.rank) * (8 + OPTIMIZER_BYTES.get(w.optimizer.lower(), 8))
    per_block = (ACT_PER_C * c + ACT_PER_F * f + ACT_PER_RANK * w.rank) * t * b + w.gathered_bytes()
    context = 16 * c * v.text_len * b * (1 if s.checkpointing else v.num_layers)
    shared = (4 * v.head_dim + 4 * c) * t * b  # RoPE tables, the incoming fp32 gradient
    vace = len(v.vace_layers)
    shared += 2 * c * t * b * vace  # VACE: one bf16 hint per VACE block, kept until its base block adds it
    if not s.checkpointing:
        activations = (v.num_layers + vace) * per_block + context + shared
    else:
        activations = _checkpointed_peak(w, s, per_block, context) + shared
    workspace = (WORK_PER_C * c + WORK_PER_F * f) * t * b + FIXED_WORKSPACE_GIB * GIB + w.split_bytes()
    return Estimate(weights / GIB, lora / GIB, activations / GIB, workspace / GIB, host / GIB)


def kept_bytes(w: Workload) -> int:
    """What selective checkpointing keeps of one block: its self-attention output and log-sum-exp, bytes."""
    return (KEEP_PER_C * w.variant.dim + KEEP_PER_HEAD * w.variant.num_heads) * w.local_tokens * w.batch_size


def _checkpointed_peak(w: Workload, s: Settings, per_block: float, context: float) -> float:
    """Activation bytes at the peak with checkpointing, the larger of two moments. (B) the backward pass of the
    last checkpointed block: its recomputed activations, the fp32 inputs of the checkpointed blocks (with
    offload the last one's and the one coming back; the VACE blocks' are never offloaded) and the kept
    self-attention outputs of the other kept blocks. (A) with `skip_blocks` N, the backward pass of the last
    block: the N skipped blocks' full activations (and cross-attention context), every kept self-attention
    output and the checkpointed inputs still on the device (with offload only the last one's). With N = 1, (A)
    is about (B): checkpointing the last block saves nothing at the peak."""
    v, t, b = w.variant, w.local_tokens, w.batch_size
    block_input, vace, keep = 4 * v.dim * t * b, len(v.vace_layers), kept_bytes(w)
    checkpointed, kept = s.checkpointed_blocks(v.num_layers), s.kept_blocks(v.num_layers)
    # Kept outputs on the GPU at (B) besides the recomputed block's own (in `per_block`), and at (A). With them
    # on the host (`offload_attention`) only those of the blocks in flight: the last checkpointed block's, which
    # never leave (its own at (B), the one of (A)), and at (B) the block before's, coming back with its input
    # (prefetched when a block's backward pass begins). The copies going out in the forward pass end long
    # before either moment, behind the forward compute of the blocks after them.
    other_kept = min(1, max(0, kept - 1)) if s.attention_on_host else max(0, kept - 1)
    peaks = []
    if checkpointed:
        inputs = min(2, checkpointed) if s.offload_activations else checkpointed
        peaks.append(per_block + context + block_input * (inputs + vace) + other_kept * keep)
    if s.skip_blocks:
        inputs = min(1, checkpointed) if s.offload_activations else checkpointed
        kept_at_a = min(1, kept) if s.attention_on_host else kept
        peaks.append(s.skip_blocks * (per_block + context) + block_input * (inputs + vace) + kept_at_a * keep)
    return max(peaks)


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
    host_gb: float | None = None  # host RAM the GPU's buffers may take (HOST_FRACTION of the given); None: unchecked
    margin_gb: float = 0.0  # held back after an out-of-memory error (planning/margin.py)

    def apply(self, memory):
        """A copy of a `MemoryArgs` with the planned settings (`auto_memory`)."""
        s = self.settings
        return dataclasses.replace(
            memory, fp8_base=s.fp8, fp8_scaled=s.fp8, gradient_checkpointing=s.checkpointing,
            gradient_checkpointing_cpu_offload=s.offload_activations,
            gradient_checkpointing_keep_attention=s.keep_attention,
            gradient_checkpointing_keep_attention_blocks=0 if s.keep_attention else s.keep_attention_blocks,
            gradient_checkpointing_offload_attention=s.attention_on_host,
            gradient_checkpointing_skip_blocks=s.skip_blocks if s.checkpointing else 0,
            blocks_to_swap=s.blocks_to_swap,
            use_pinned_memory_for_block_swap=s.blocks_to_swap > 0 or memory.use_pinned_memory_for_block_swap,
            offload_inactive_dit=s.offload_inactive,
        )

    @property
    def rung(self) -> Settings:
        """The ladder rung the plan is built on: the plan without its skip stage (`skip_blocks`), which is the
        table's last row when it applied."""
        return self.candidates[-2][0] if self.settings.skip_blocks and len(self.candidates) > 1 else self.settings

    def table(self) -> str:
        return lora_table(self, 0 if self.fits else largest_frames(self.vram_gb, self.workload, self.host_gb,
                                                                           self.margin_gb))


def _candidates(w: Workload, fp8: bool = False):
    """The ladder (module docstring), each rung with both experts on the GPU, then with the inactive one on the
    host. With `fp8` every rung has fp8 weights, so nothing is tried first for precision's sake: the swap rungs
    keeping attention on the host follow the rung without swap that keeps it there (4), before any rung that
    recomputes attention."""
    n_layers = w.variant.num_layers
    ckpt = Settings(checkpointing=True)
    offload = Settings(checkpointing=True, offload_activations=True)
    on_gpu = dataclasses.replace(offload, keep_attention=True)
    on_host = dataclasses.replace(on_gpu, offload_attention=True)

    def some(offloaded: bool) -> list[Settings]:  # keeping attention in the last K blocks, the largest K first;
        rungs = []  # with offload, each K with the kept outputs on the GPU, then on the host (from K = 2 on)
        for k in range(n_layers - 1, 0, -1):
            rungs.append(Settings(checkpointing=True, offload_activations=offloaded, keep_attention_blocks=k))
            if offloaded and k > 1:
                rungs.append(dataclasses.replace(rungs[-1], offload_attention=True))
        return rungs

    first = [Settings(), dataclasses.replace(ckpt, keep_attention=True), on_gpu, on_host]
    rest = [*some(False), ckpt, *some(True), offload]
    host_swaps = [dataclasses.replace(on_host, fp8=True, blocks_to_swap=n) for n in range(1, n_layers)]
    swaps = [Settings(True, True, True, n) for n in range(1, n_layers)]
    if fp8:
        ladder = [dataclasses.replace(s, fp8=True) for s in first] + host_swaps + [
            dataclasses.replace(s, fp8=True) for s in rest] + swaps
    else:
        fp8_offload = dataclasses.replace(offload, fp8=True)
        ladder = first + rest + [dataclasses.replace(on_host, fp8=True), *host_swaps, fp8_offload, *swaps]
    for s in ladder:
        yield s
        if w.experts > 1:
            yield dataclasses.replace(s, offload_inactive=True)


def plan_memory(vram_gb: float, variant: WanVariant | str, width: int, height: int, frames: int,
                batch_size: int = 1, rank: int = 32, optimizer: str = "adamw", experts: int = 1,
                fp8: bool = False, sequence_parallel: int = 1, gather_kv: bool = False,
                host_ram_gb: float | None = None, margin_gb: float = 0.0) -> MemoryPlan:
    """The first candidate (see the module docstring) whose estimated peak fits the card and whose host memory
    fits `HOST_FRACTION` of `host_ram_gb` (the host RAM this process may use; None: not checked); with `fp8`
    only candidates with fp8 weights (`fp8_fast` needs them); with `sequence_parallel` N each process holds
    1 / N of every sample's tokens (with `gather_kv`, the `all_gather` attention, also every token's keys and
    values of the block it runs); `margin_gb` less memory than the card's (after an out-of-memory error)."""
    variant = get_variant(variant) if isinstance(variant, str) else variant
    w = Workload(variant, width, height, frames, batch_size, rank, optimizer, experts, sequence_parallel, gather_kv)
    budget = (vram_gb - CUDA_CONTEXT_GIB) * FRAGMENTATION - margin_gb
    host = None if host_ram_gb is None else host_ram_gb * HOST_FRACTION
    tried = []
    for s in _candidates(w, fp8):
        e = estimate(w, s)
        tried.append((s, e))
        if e.total <= budget and (host is None or e.host <= host):
            skipped = skip_blocks(w, s, budget, host)
            shown = _shown(tried) + ((skipped,) if skipped else ())
            return MemoryPlan(vram_gb, budget, w, *(skipped or (s, e)), True, shown, host, margin_gb)
    s, e = tried[-1]
    return MemoryPlan(vram_gb, budget, w, s, e, False, _shown(tried), host, margin_gb)


def skip_blocks(w: Workload, s: Settings, budget: float, host: float | None) -> tuple[Settings, Estimate] | None:
    """The skip stage on top of `s`, the first rung that fits (module docstring): the largest N whose
    settings, with the last N blocks not checkpointed, still fit, for `s` and (when `s` does not offload) for
    `s` with activation offload, whichever allows more (a tie keeps `s`, with less traffic); keeping
    attention in K blocks becomes K - N, so no block recomputes more than with `s`. Attention the GPU keeps
    is not moved to the host to skip more blocks: by the estimate one or two more skipped blocks save 0.2-0.6%
    of an 80 GB step, against about 10 GiB more page-locked host RAM per process and twice the host traffic,
    which the estimate cannot check against a real link. None without checkpointing, with block swap, or
    when not even N = 1 fits."""
    if not s.checkpointing or s.blocks_to_swap:
        return None
    offloaded = dataclasses.replace(s, offload_activations=True)
    options = [s] + ([offloaded] if not s.offload_activations else [])
    best = None
    for option in options:
        for n in range(w.variant.num_layers, 0, -1):
            if best is not None and n <= best[0].skip_blocks:
                break
            k = dataclasses.replace(option, skip_blocks=n,
                                    keep_attention_blocks=max(0, option.keep_attention_blocks - n))
            e = estimate(w, k)
            if e.total <= budget and (host is None or e.host <= host):
                best = (k, e)
                break
    return best


def largest_frames(vram_gb: float, w: Workload, host_gb: float | None = None, margin_gb: float = 0.0) -> int:
    """The most frames (4k + 1) that fit with the most frugal settings (the GPU, and `host_gb` of host RAM
    when given), 0 when not even 1 frame does."""
    frugal = Settings(True, True, True, w.variant.num_layers - 1, w.experts > 1)
    budget = (vram_gb - CUDA_CONTEXT_GIB) * FRAGMENTATION - margin_gb
    best = 0
    for frames in range(1, w.frames + 1, 4):
        e = estimate(dataclasses.replace(w, frames=frames), frugal)
        if e.total > budget or (host_gb is not None and e.host > host_gb):
            break
        best = frames
    return best


def _shown(tried: list) -> tuple:
    """The table's rows: the candidates without block swap or partial attention keeping, and the last one
    tried (the plan)."""
    keep = [(s, e) for s, e in tried if not s.blocks_to_swap and not s.keep_attention_blocks]
    if tried[-1][0].blocks_to_swap or tried[-1][0].keep_attention_blocks:
        keep.append(tried[-1])
    return tuple(keep)


def detect_vram_gb(device=None) -> float | None:
    """Total memory of the CUDA device in GiB, or None without CUDA."""
    import torch

    if not torch.cuda.is_available():
        return None
    return torch.cuda.get_device_properties(device or torch.cuda.current_device()).total_memory / GIB

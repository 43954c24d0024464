"""The memory planner for full fine-tuning (`tools/plan_memory.py --full`, a config with
`full_fine_tune = true`): per process, the weights, gradients and optimizer state as exact sums over the
model's tensors, activations and workspace at the peak of a step (end of the forward pass, backward pass,
optimizer step), with `full_bf16`, `fused_backward_pass`, `fsdp` and `fsdp_cpu_offload`, and a ladder of
settings from fastest to most frugal, then two speed stages on the rung chosen. The LoRA planner and the shared
constants are in `lora.py`; the settings and the exact state bytes in `full_state.py`.

The ladder, from fastest and most precise to most frugal; with several processes the sharded rungs follow:

    1 fp32 master weights              6 fsdp, fp32 masters + checkpointing
    2 fp32 masters + checkpointing     7 fsdp, full_bf16 + checkpointing
    3 full_bf16 + checkpointing        8 fsdp, full_bf16 + checkpointing + activation offload
    4 ... + fused_backward_pass        9 ... + fsdp_cpu_offload (shards and optimizer state in host memory)
    5 ... + activation offload

Then the speed stages (`speed_stages`), on top of the first rung that fits when it checkpoints and does not
shard (fsdp rungs are left as they are: fsdp with selective or partial checkpointing is not verified
anywhere), each kept only where it still fits the GPU and the host (as the rung is checked), both only
spending the memory the rung leaves over:

- keeping self-attention (`gradient_checkpointing_keep_attention`): every checkpointed block keeps its
  self-attention output and log-sum-exp (KEEP_PER_C C + KEEP_PER_HEAD H bytes a token and block), so the
  backward pass runs no attention forward again;
- then the last N blocks unchecked (`gradient_checkpointing_skip_blocks`), the largest N < num_layers that
  fits: each keeps all its activations and cross-attention context (`per_block`) and, with fp32 masters,
  the bf16 weight copies autocast saves for its backward pass (`StateBytes.block_cast`), and is not
  recomputed; with activation offload only the checkpointed blocks' inputs go to the host, the last
  checkpointed one's stays (L - N - 1 of them). The backward pass then peaks either in the last skipped
  block (every kept tensor, the skipped blocks' activations, the first gradients) or in the first
  recomputed block (the skipped blocks freed, their gradients held). N = 1 costs about nothing: the last
  block's backward pass follows its forward pass directly.

For TI2V-5B at 1280x704x121 on an 80 GiB card: bf16 + checkpointing (48.7 GiB), then keeping attention and
skipping the last 4 blocks (70.8 GiB), 3.54 s a step on an H100 instead of 4.06 s (estimates: `tools/
benchmark_wan.py --estimate --full --plan`); the plan's table shows the rung, then the extended row.

Host RAM: `plan_full(host_ram_gb=...)` (auto_memory: MemAvailable shared among the node's processes,
`host.detect_host_ram_gb`) skips every rung whose host memory per process, `FullEstimate.host`, is more than
`HOST_FRACTION` of it ("no: host RAM" in the table): the offloaded block inputs (L - 1 of them, the last
block's stays on the GPU; fewer with skipped blocks) and with fsdp_cpu_offload this process's own shards
(each local process holds its 1 / N, so the node holds its processes' share of the whole) of the weights and
gradients, page-locked and rounded up to powers of two by torch's host allocator, and its shards of the
optimizer state.

Its weight, gradient and optimizer-state bytes are exact sums over the DiT's tensors (a meta-device model),
checked against a real optimizer step in tests/memory/test_plan.py; its activation and workspace figures
are the LoRA ones re-measured for trainable weights (ACT_FULL_PER_C), still estimates at full size.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Callable

from library.wan.variants import WanVariant, get_variant

from .full_state import FullSettings, FullWorkload, state_bytes
from .full_state import optimizer_state_bytes  # noqa: F401  (imported from here by others)
from .host import HOST_FRACTION
from .lora import (CUDA_CONTEXT_GIB, FIXED_WORKSPACE_GIB, FRAGMENTATION, GIB, KEEP_PER_C, KEEP_PER_HEAD, WORK_PER_C,
                   WORK_PER_F)
from .table import full_table

# Saved for backward by one block whose own weights train, per token (measured like ACT_PER_C, on fp32
# weights under bf16 autocast with a trainable timestep embedding): 19 C more than a LoRA block without its
# rank term, for the normalised inputs that the gradients of the norms, the modulation and the gates need
# (62.3-62.5 C measured; 65 before the gates kept their input in the compute dtype instead of an fp32 copy).
ACT_FULL_PER_C, ACT_FULL_PER_F = 63, 4
AVERAGING_BUCKET = 1 << 26  # elements per gradient-averaging collective without fsdp (Optimization.average_gradients)
# With fsdp, unsharded blocks on the GPU at once: the one computing and the one prefetched.
FSDP_GATHERED_BLOCKS = 2
# Autocast's weight cache would keep the bf16 copy of each trainable fp32 Linear / Conv weight for the whole
# forward pass, checkpointed or not, and under fsdp of the unsharded weight (measured on the CPU with FSDP2).
# The trainer autocasts full fine-tuning without the cache (Trainer.autocast_kwargs), so only the copies saved
# for backward by non-checkpointed layers remain.
AUTOCAST_WEIGHT_CACHE = False


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
    """The peak GPU memory of one process: the largest of the moments of a step (see FullEstimate and, for
    `keep_attention` and `skip_blocks`, the module docstring)."""
    v, t, b, layers = w.variant, w.local_tokens, w.batch_size, w.variant.num_layers
    c, f = v.dim, v.ffn_dim
    if s.checkpointing and not s.checkpointed_blocks(layers):  # every block skipped: no checkpointing
        return estimate_full(w, FullSettings(s.full_bf16, False, False, s.fused_backward_pass, s.fsdp,
                                             s.fsdp_cpu_offload))
    sb = state_bytes(w, dataclasses.replace(s, keep_attention=False, skip_blocks=0))  # the stages hold no state
    n = w.processes if s.fsdp else 1
    on_gpu = 0 if s.fsdp_cpu_offload else 1
    weights, optim = w.experts * sb.weights / n * on_gpu, w.experts * sb.optimizer / n * on_gpu
    gathered = FSDP_GATHERED_BLOCKS * sb.block_weights + sb.outer_weights if s.fsdp else 0
    # activations: LoRA's rules with the full fine-tuning coefficients
    per_block = (ACT_FULL_PER_C * c + ACT_FULL_PER_F * f) * t * b + w.gathered_bytes()
    block_input = 4 * c * t * b  # what checkpointing keeps of a block: its fp32 input
    context = 16 * c * v.text_len * b * (1 if s.checkpointing else layers)
    shared = (4 * v.head_dim + 4 * c) * t * b
    work = (WORK_PER_C * c + WORK_PER_F * f) * t * b + FIXED_WORKSPACE_GIB * GIB + sb.largest_grad + w.split_bytes()
    # the stages: each checkpointed block's kept self-attention output and log-sum-exp; the skipped blocks'
    # whole activations, cross-attention context and saved bf16 weight copies (as without checkpointing)
    keep = (KEEP_PER_C * c + KEEP_PER_HEAD * v.num_heads) * t * b if s.keep_attention and s.checkpointing else 0
    skipped = s.skip_blocks if s.checkpointing else 0
    skipped_acts, skipped_copies = skipped * (per_block + context), skipped * sb.block_cast
    in_transit = 2 * block_input if s.checkpointing and s.offload_activations else 0
    if s.checkpointing:  # kept per block through the backward pass: (activations, bf16 copies)
        kept, kept_copies = (0 if s.offload_activations else block_input), 0
        fixed = per_block + in_transit  # the recomputed block, inputs in flight
        fixed_copies = sb.block_cast
        stacked = s.checkpointed_blocks(layers)
    else:
        kept, kept_copies, fixed, fixed_copies, stacked = per_block, sb.block_cast, 0, 0, layers
    # host memory, this process's share: every checkpointed block input but the last one's (`memory.BlockRunner`:
    # the backward pass needs it first, it stays with the two in flight in `fixed`) in exact-size pinned buffers;
    # with fsdp_cpu_offload its own shards (pinned, see `pinned_shards`), optimizer state and step temporaries
    host = (stacked - 1) * block_input if s.checkpointing and s.offload_activations else 0
    step = sb.step / n
    if s.fsdp_cpu_offload:
        host += w.experts * (sb.pinned_weights + sb.optimizer / n) + sb.pinned_grads + step
    # the end of the forward pass: autocast's cache holds a bf16 copy of every trainable fp32 weight; without
    # the cache, the copies saved for backward (non-checkpointed layers and blocks) remain; the last block
    # computing holds `fixed` (its own kept attention among it), or the skipped blocks hold all theirs
    forward_copies = sb.cast if AUTOCAST_WEIGHT_CACHE or not s.checkpointing else sb.outer_cast + skipped_copies
    last = skipped_acts + in_transit if skipped else fixed + context
    moments = [FullEstimate(weights, 0, optim, forward_copies + gathered,
                            stacked * kept + (stacked - (not skipped)) * keep + last + shared,
                            FIXED_WORKSPACE_GIB * GIB, host, "forward")]
    # backward: the first checkpointed block to run it still has every checkpointed block's kept tensors and
    # the gradients of the blocks after it; the last has one block's kept tensors and every gradient
    in_flight = sb.outer_cast + (gathered + sb.block_grads if s.fsdp else 0)
    if s.fused_backward_pass:
        early_grads = later_grads = late_grads = 0  # only the tensor being stepped (in `work`), its temporaries
        work += step
    else:
        early_grads, late_grads = (sb.block_grads + sb.outer_grads) / n * on_gpu, sb.grads / n * on_gpu
        later_grads = min(late_grads, early_grads + skipped * sb.block_grads / n * on_gpu)
    for stack, grads in ((stacked, later_grads), (1, late_grads)):
        moments.append(FullEstimate(weights, grads, optim, in_flight + fixed_copies + stack * kept_copies,
                                    stack * kept + max(0, stack - 1) * keep + fixed + context + shared, work, host,
                                    "backward"))
    if skipped:  # its start, in the last skipped block: every kept tensor, the skipped blocks' activations
        moments.append(FullEstimate(weights, early_grads, optim, in_flight + skipped_copies,
                                    stacked * (kept + keep) + in_transit / 2 + skipped_acts + shared, work, host,
                                    "backward"))
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
    candidates: tuple[tuple[FullSettings, FullEstimate], ...]  # those tried, up to the plan (its stages last)
    hints: tuple[str, ...] = ()  # when nothing fits: what would
    host_gb: float | None = None  # host RAM per process the GPU's buffers may take (HOST_FRACTION of the given)
    margin_gb: float = 0.0  # held back after an out-of-memory error (planning/margin.py)

    def apply(self, memory, finetune):
        """Copies of a `MemoryArgs` and a `FineTuneArgs` with the planned settings."""
        return self.settings.apply(memory, finetune)

    @property
    def rung(self) -> FullSettings:
        """The ladder rung the plan is built on: its settings without the speed stages."""
        return dataclasses.replace(self.settings, keep_attention=False, skip_blocks=0)

    def table(self) -> str:
        return full_table(self)


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
              frozen_patterns: tuple[str, ...] = (), show_all: bool = False,
              allow: Callable[[FullSettings], bool] | None = None, sequence_parallel: int = 1,
              gather_kv: bool = False, host_ram_gb: float | None = None, margin_gb: float = 0.0) -> FullPlan:
    """The first rung of the full fine-tuning ladder whose estimated peak per process fits the card and whose
    host memory (`FullEstimate.host`) fits `HOST_FRACTION` of `host_ram_gb`, the host RAM this process may use
    (None: not checked); when none does, the plan is the most frugal rung the host holds and says what would
    fit (another optimizer, more GPUs, fewer frames). `show_all` keeps every rung in the table, not only those
    tried; `allow` leaves out the rungs a config cannot use; `margin_gb` less than the card's memory."""
    variant = get_variant(variant) if isinstance(variant, str) else variant
    w = FullWorkload(variant, width, height, frames, batch_size, 0, optimizer, experts, processes=processes,
                     trainable_patterns=tuple(trainable_patterns), frozen_patterns=tuple(frozen_patterns),
                     sequence_parallel=sequence_parallel, gather_kv=gather_kv)
    budget = (vram_gb - CUDA_CONTEXT_GIB) * FRAGMENTATION - margin_gb
    host = None if host_ram_gb is None else host_ram_gb * HOST_FRACTION
    tried = [(s, estimate_full(w, s)) for s in full_candidates(processes) if allow is None or allow(s)]
    chosen = next((i for i, (_, e) in enumerate(tried) if _fits(e, budget, host)), None)
    if chosen is not None:
        s, e = tried[chosen]
        faster = speed_stages(w, s, budget, host, allow)
        shown = tried[: chosen + 1] + ([faster] if faster else []) + (tried[chosen + 1:] if show_all else [])
        return FullPlan(vram_gb, budget, w, *(faster or (s, e)), True, tuple(shown), (), host, margin_gb)
    held = [(s, e) for s, e in tried if host is None or e.host <= host] or tried  # never more than the host holds
    s, e = held[-1]
    return FullPlan(vram_gb, budget, w, s, e, False, tuple(tried), _full_hints(budget, w, host), host, margin_gb)


def speed_stages(w: FullWorkload, s: FullSettings, budget: float, host: float | None,
                 allow: Callable[[FullSettings], bool] | None = None) -> tuple[FullSettings, FullEstimate] | None:
    """The speed stages on top of `s`, the rung that fits (module docstring): `keep_attention` if it still
    fits, then the largest `skip_blocks` N (0 < N < num_layers) that fits on top of that. None when `s` does
    not checkpoint, shards with fsdp, or no stage fits (or `allow` refuses them)."""
    if not s.checkpointing or s.fsdp:
        return None

    def fitting(settings: FullSettings) -> tuple[FullSettings, FullEstimate] | None:
        e = estimate_full(w, settings)
        return (settings, e) if _fits(e, budget, host) and (allow is None or allow(settings)) else None

    best = fitting(dataclasses.replace(s, keep_attention=True))
    base = best[0] if best else s
    for n in range(w.variant.num_layers - 1, 0, -1):  # the most memory first: the first that fits is the largest
        skipping = fitting(dataclasses.replace(base, skip_blocks=n))
        if skipping:
            return skipping
    return best


def _fits(e: FullEstimate, budget: float, host: float | None) -> bool:
    return e.total <= budget and (host is None or e.host <= host)


def _fits_full(budget: float, w: FullWorkload, host: float | None = None) -> FullSettings | None:
    return next((s for s in full_candidates(w.processes) if _fits(estimate_full(w, s), budget, host)), None)


def _full_hints(budget: float, w: FullWorkload, host: float | None = None) -> tuple[str, ...]:
    """What would fit the card (and `host` GiB of host RAM per process): other optimizers, more GPUs (with the
    same host RAM each: more nodes), fewer frames."""
    hints = []
    for optimizer in ("AdamW8bit", "Adafactor"):
        if optimizer.lower() != w.optimizer.lower().replace("_", ""):
            s = _fits_full(budget, dataclasses.replace(w, optimizer=optimizer), host)
            if s:
                hints.append(f"with {optimizer}: {s.label()}")
    more = next((n for n in (2, 4, 8, 16, 32, 64) if n > w.processes and
                 _fits_full(budget, dataclasses.replace(w, processes=n), host)), None)
    if more:
        rung = _fits_full(budget, dataclasses.replace(w, processes=more), host)
        hints.append(f"with {w.optimizer} over {more} GPUs: {rung.label()}")
    for n in (w.processes,) if more else (w.processes, max(8, w.processes)):  # fewer frames (on more GPUs)
        fewer = dataclasses.replace(w, processes=n)
        frames = max((fr for fr in range(1, w.frames, 4)
                      if _fits_full(budget, dataclasses.replace(fewer, frames=fr), host)), default=0)
        if frames:
            where = f" over {n} GPUs" if n != w.processes else ""
            hints.append(f"at {w.width}x{w.height} up to {frames} frames{where}")
            break
    return tuple(hints)

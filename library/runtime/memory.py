"""Memory features of a training run, applied to each loaded expert by one call:

    apply_memory_features(model, cfg.memory, device)

- fp8 (`fp8_base`, `fp8_scaled`): block Linear weights in float8 (see `library.wan.fp8`); best done while
  loading (`load_dit(..., fp8=fp8_config(cfg.memory))`), otherwise the loaded model is converted here.
  With `fp8_fast` their matmuls run in fp8 (`torch._scaled_mm`) where the GPU has fp8 tensor cores
  (compute capability 8.9+); elsewhere one warning, and the weights are dequantised to bf16 for each matmul.
- gradient checkpointing per block (`gradient_checkpointing`), with the checkpointed block inputs (the
  fp32 residual stream, the only activations checkpointing keeps) copied to host memory on a side stream
  and brought back for the recomputation (`gradient_checkpointing_cpu_offload`, `offload.py`; every block's but
  the last one's, which the backward pass needs first). It composes with selective checkpointing: the
  offloader's saved-tensor hooks only take the block input that checkpointing saves.
- selective checkpointing (`gradient_checkpointing_keep_attention`): each block's self-attention output
  and log-sum-exp are kept as well, so the backward pass recomputes everything but the attention; with
  `gradient_checkpointing_keep_attention_blocks` N only in the last N checkpointed blocks. With activation
  offload and `gradient_checkpointing_offload_attention` they go to the host with the block input and come
  back with it (`kept_attention.py`; the last checkpointed block keeps them on the device with its input).
- partial checkpointing (`gradient_checkpointing_skip_blocks`): the last N blocks are not checkpointed and keep
  every activation; activation offload and keeping attention apply to the checkpointed blocks before them,
  and the last checkpointed block's input is the one that stays on the device. It cannot be combined with
  block swap (the swapped blocks are the last ones, whose weights autograd would then hold on the GPU).
- block swap (`blocks_to_swap`, `use_pinned_memory_for_block_swap`): see `block_swap.py`.

Block swap and activation offload need CUDA; elsewhere they are no-ops with a log line. They work
through `WanModel.block_runner`, the one hook the model offers around each block.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch
import torch.nn as nn

from library.wan.fp8 import FP8Config, FP8Linear, FP8Report, quantize_model_fp8, scaled_mm_supported

from .block_swap import BlockSwapper, CudaTransport
from .kept_attention import KeptAttention
from .offload import ActivationOffloader

logger = logging.getLogger(__name__)


def fp8_config(memory) -> FP8Config | None:
    """The `load_dit(fp8=...)` argument for a `MemoryArgs`: None unless `fp8_base`."""
    fast = bool(getattr(memory, "fp8_fast", False))
    return FP8Config(scaled=bool(memory.fp8_scaled), use_scaled_mm=fast) if memory.fp8_base else None


# ---- the block runner ------------------------------------------------------------------------------


@dataclass(eq=False)
class BlockRunner:
    """`WanModel.block_runner`: runs each block with block swap and / or activation offload around it. With
    `blocks` (the model's block count) the last block's input is not offloaded: the backward pass needs it
    first, so a copy back could not overlap anything; instead the input of the block before it starts coming
    back when the last block's backward pass begins. With 0 every block's input is offloaded. The last
    `skipped` blocks are not checkpointed (`gradient_checkpointing_skip_blocks`): their inputs are never
    offloaded, and "the last block" above is the last checkpointed one."""

    swapper: BlockSwapper | None = None
    offloader: ActivationOffloader | None = None
    blocks: int = 0
    skipped: int = 0

    def run(self, i: int, block: nn.Module, args: tuple, run_block) -> torch.Tensor:
        x = args[0]  # [B, L, C] fp32 residual stream
        if self.swapper is not None:
            self.swapper.before_forward(i)
        offload = self.offloader is not None and torch.is_grad_enabled() and \
            not (self.skipped and i >= self.blocks - self.skipped)
        last = offload and i == self.blocks - self.skipped - 1
        if offload and not last:
            with self.offloader.hooks(x):
                out = run_block(block, args)
        else:
            out = run_block(block, args)
        if last and out.requires_grad:
            offloader = self.offloader
            out.register_hook(lambda grad: offloader.prefetch_newest())
        if self.swapper is not None:
            training = torch.is_grad_enabled() and out.requires_grad
            self.swapper.after_forward(i, keep_for_backward=training)
            if training:
                self._hook_backward(i, x, out)
        return out

    def _hook_backward(self, i: int, x: torch.Tensor, out: torch.Tensor) -> None:
        """The gradient of a block's output arrives just before its backward (and recomputation) runs;
        the gradient of its input is complete just after."""
        swapper = self.swapper
        out.register_hook(lambda grad: swapper.before_backward(i))
        if x.requires_grad:
            x.register_hook(lambda grad: swapper.after_backward(i))


# ---- placing a model -----------------------------------------------------------------------------------


def place_model(model: nn.Module, device) -> None:
    """`model.to(device)`, except that blocks handled by a block swapper stay in host memory. Use this in
    place of `.to()` to move an expert in and out of the GPU (`offload_inactive_dit`)."""
    device = torch.device(device)
    runner = getattr(model, "block_runner", None)
    swapper = runner.swapper if isinstance(runner, BlockRunner) else None
    if swapper is None:
        model.to(device)
        return
    swapper.reset()
    for name, child in model.named_children():
        if name != "blocks":
            child.to(device)
    for i, block in enumerate(model.blocks):
        if i not in swapper.swapped:
            block.to(device)


# ---- the entry point --------------------------------------------------------------------------------------


@dataclass
class MemorySetup:
    """What `apply_memory_features` did, for the start-of-run log."""

    device: str
    fp8: FP8Report | None = None
    gradient_checkpointing: bool = False
    keep_attention: bool = False
    keep_attention_blocks: int = 0  # of the model's blocks, the last checkpointed ones
    skip_blocks: int = 0  # the last blocks, not checkpointed
    activation_offload: bool = False
    attention_offload: bool = False  # the kept self-attention outputs go to the host with the block inputs
    blocks_to_swap: int = 0
    notes: list[str] = field(default_factory=list)

    def summary(self) -> str:
        parts = [self.fp8.summary() if self.fp8 else "bf16/fp16/fp32 weights",
                 f"checkpointing {'on' if self.gradient_checkpointing else 'off'}"
                 + (f" keeping self-attention in {self.keep_attention_blocks} blocks" if self.keep_attention else "")
                 + ((" skipping the last block" if self.skip_blocks == 1 else
                     f" skipping the last {self.skip_blocks} blocks") if self.gradient_checkpointing and
                    self.skip_blocks else "")
                 + (" (activations offloaded" + (", kept self-attention outputs too)" if self.attention_offload
                                                 else ")") if self.activation_offload else ""),
                 f"{self.blocks_to_swap} blocks swapped" if self.blocks_to_swap else "no block swap"]
        return f"memory on {self.device}: " + "; ".join(parts + self.notes)


def _note(setup: MemorySetup, message: str, *args, warn: bool = False) -> None:
    text = message % args
    (logger.warning if warn else logger.info)(text)
    setup.notes.append(text)


def _fp8_matmuls(model: nn.Module, fast: bool, device: torch.device, setup: MemorySetup) -> None:
    """`fp8_fast`: the fp8 layers multiply in fp8 where this device can (`FP8Linear` decides per call and
    falls back to dequantising when it cannot); says which, once."""
    layers = [m for m in model.modules() if isinstance(m, FP8Linear)]
    for layer in layers:
        layer.use_scaled_mm = fast
    if not fast or not layers:
        return
    dtype = model._dtype() if hasattr(model, "_dtype") else torch.bfloat16
    if not scaled_mm_supported(device, 16, 16):
        what = "a CPU" if device.type != "cuda" else "this GPU (compute capability %d.%d)" % \
            torch.cuda.get_device_capability(device)
        message = ("fp8_fast: fp8 matmuls need an NVIDIA GPU of compute capability 8.9+ (Ada, Hopper, Blackwell), "
                   f"not {what}: the fp8 weights are dequantised to bf16 for each matmul instead")
    elif dtype != torch.bfloat16:
        message = ("fp8_fast multiplies in fp8 with bf16 compute only (PyTorch's row-wise fp8 matmul writes bf16 on "
                   f"most GPUs); this model computes in {str(dtype).removeprefix('torch.')}, so the fp8 weights are "
                   "dequantised for each matmul instead: set mixed_precision = \"bf16\" for fp8 matmuls")
    else:
        _note(setup, "fp8_fast: %d fp8 Linear layers multiply in fp8 (torch._scaled_mm)", len(layers))
        return
    _note(setup, "%s", message, warn=not _fp8_matmuls.warned)  # warned once a process, not once an expert
    _fp8_matmuls.warned = True


_fp8_matmuls.warned = False


def apply_memory_features(model: nn.Module, memory, device, prefetch: int = 1, transport=None,
                          place: bool = True, offloader: ActivationOffloader | None = None) -> MemorySetup:
    """Apply a `MemoryArgs` (or anything with the same fields) to a loaded WAN model and put the model on
    `device` (swapped blocks stay in host memory; `place=False` leaves the rest where it is, for an expert
    that waits in host memory until `place_model` brings it in). Call once per expert, after `load_dit`;
    create the LoRA network afterwards and move it to `device`. `transport` replaces the CUDA side-stream
    copies of block swap (tests pass `HostTransport()` to run the schedule on the CPU), `offloader` the
    activation offloader (tests pass `ActivationOffloader(torch.device("cpu"))`, which keeps clones)."""
    device = torch.device(device)
    setup = MemorySetup(str(device))
    # 1. fp8 weights (already there when the loader did it)
    if memory.fp8_base:
        if any(isinstance(m, FP8Linear) for m in model.modules()):
            setup.fp8 = getattr(model, "fp8_report", None)
        else:
            work = device if device.type == "cuda" else None
            setup.fp8 = quantize_model_fp8(model, scaled=bool(memory.fp8_scaled), work_device=work)
        _fp8_matmuls(model, bool(getattr(memory, "fp8_fast", False)), device, setup)
    # 2. checkpointing and what rides on it
    swap, checkpointing = int(memory.blocks_to_swap or 0), bool(memory.gradient_checkpointing)
    offload = bool(getattr(memory, "gradient_checkpointing_cpu_offload", False)) and checkpointing
    offload_attention = bool(getattr(memory, "gradient_checkpointing_offload_attention", False))
    if swap and device.type != "cuda" and transport is None:
        _note(setup, "block swap needs a CUDA device: blocks_to_swap = %d is ignored on %s", swap, device)
        swap = 0
    if offload and device.type != "cuda" and offloader is None:
        _note(setup, "activation offload needs a CUDA device: gradient_checkpointing_cpu_offload%s is ignored "
                     "on %s", " (with gradient_checkpointing_offload_attention)" if offload_attention else "", device)
        offload = offload_attention = False
    if swap and not checkpointing:
        _note(setup, "blocks_to_swap = %d: turning on gradient_checkpointing (without it autograd would keep "
                     "every swapped block's weights on the GPU until the backward pass)", swap, warn=True)
        checkpointing = True
    skip = int(getattr(memory, "gradient_checkpointing_skip_blocks", 0) or 0) if checkpointing else 0
    if skip and swap:
        _note(setup, "gradient_checkpointing_skip_blocks = %d is ignored with block swap (blocks_to_swap = %d): the "
                     "swapped blocks are the last ones and must be checkpointed", skip, swap, warn=True)
        skip = 0
    model.enable_gradient_checkpointing(
        checkpointing, keep_attention=bool(getattr(memory, "gradient_checkpointing_keep_attention", False)),
        keep_attention_blocks=int(getattr(memory, "gradient_checkpointing_keep_attention_blocks", 0) or 0),
        skip_blocks=skip)
    setup.gradient_checkpointing, setup.activation_offload, setup.blocks_to_swap = checkpointing, offload, swap
    setup.keep_attention = model.checkpoint_keep_attention
    setup.keep_attention_blocks = model.checkpoint_keep_attention_blocks
    setup.skip_blocks = model.checkpoint_skip_blocks
    if offload_attention and not (offload and model.checkpoint_keep_attention):
        _note(setup, "gradient_checkpointing_offload_attention is ignored: it needs activation offload "
                     "(gradient_checkpointing_cpu_offload) and kept attention in some checkpointed block")
        offload_attention = False
    setup.attention_offload = offload_attention
    # 3. the runner around each block, then placement
    swapper = None
    if swap:
        swapper = BlockSwapper(model.blocks, swap, transport or CudaTransport(device), prefetch=prefetch,
                               pin_memory=bool(memory.use_pinned_memory_for_block_swap))
    offloader = (offloader or ActivationOffloader(device)) if offload else None
    model.block_runner = BlockRunner(swapper, offloader, len(model.blocks), model.checkpoint_skip_blocks) \
        if (swapper or offloader) else None
    model.keep_attention_context_fn = KeptAttention(offloader) if offload_attention else None
    if place:
        place_model(model, device)
    logger.info("%s", setup.summary())
    return setup

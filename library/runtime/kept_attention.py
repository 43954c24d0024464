"""Kept self-attention outputs in host memory (`gradient_checkpointing_offload_attention`, issue 17).

Selective checkpointing (`gradient_checkpointing_keep_attention[_blocks]`) keeps each checkpointed block's
self-attention outputs, the attention result and its log-sum-exp (2 C + 4 H bytes a token: 0.32 GiB an A14B block
at 832x480x81), so the backward pass does not run the attention forward again. With activation offload the block
inputs go to the host, but torch's selective checkpointing keeps those outputs on the GPU, in a storage of its
own (`create_selective_checkpoint_contexts`) that offers no way to move them. This module keeps them itself:

- `KeptAttention(offloader)` is a `context_fn` of `torch.utils.checkpoint`, installed as
  `WanModel.keep_attention_context_fn` by `apply_memory_features`. Each checkpointed call of a block that keeps
  its attention gets a pair of TorchDispatchModes sharing one `KeptOutputs`: in the forward pass `_Keep` runs
  every op and stores the outputs of the ops `library.wan.model.is_self_attention_op` picks (the predicate
  torch's contexts use for the same blocks, out= variants excluded); in the recomputation `_Replay` hands each
  such op its stored outputs, by op and call order, instead of running it; any other op runs again.
- The large tensors among those outputs (one element or more per query token and head: the result and the
  log-sum-exp; not RNG seeds, empty masks or sizes) go to the host through `ActivationOffloader.ride`, tied to
  the block's input that the offloader has just sent (its saved-tensor hook runs before the block's forward).
  The store keeps only the offloader's record, so their GPU memory is free once the copy has read it (the copy
  runs on the offloader's side stream, `record_stream` holds the memory until then; host buffers come from its
  `HostBufferPool`). They come back with that input: its copy back also starts theirs, so block i-1's input and
  attention come back while block i recomputes; `_Replay` takes them (`ActivationOffloader.take`: the compute
  stream waits for their copy's event). A block whose input stays on the device (the last checkpointed one)
  keeps them on the device, as torch's contexts do.

Why not torch's modes with a hook: their storage holds `_VersionWrapper`s of private layout that changes between
releases (this project supports torch 2.4 to 2.15), and newer torch's `CheckpointPolicy.*_CPU_OFFLOAD` acts only
in graphs torch.compile partitions (eagerly it recomputes), not in this checkpoint around compiled blocks. These
two modes use only the documented `TorchDispatchMode` extension point. They mark themselves
`ignore_compile_internals` so compiled blocks still compile (Dynamo skips frames under other dispatch modes) and
see the compiled code's attention kernels when it runs. Without `gradient_checkpointing_offload_attention` the
model keeps torch's contexts, so nothing changes there. Outputs are returned detached (no autograd history kept
here, so no reference cycle) and never mutated by the block, so values are those of keeping them on the device,
bit for bit; a call the replay finds nothing for (an op order that changed) just runs the op.
"""

from __future__ import annotations

import weakref
from collections import defaultdict

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from library.wan.model import is_self_attention_op

from .offload import ActivationOffloader, _Offloaded


class KeptOutputs:
    """The kept self-attention outputs of one checkpointed block call: for each op, in call order, the output's
    items (detached device tensors, the offloader's records of host copies, other values) and its container type
    (None: a single tensor), or None once the recomputation has taken them."""

    def __init__(self, offloader: ActivationOffloader | None):
        self.offloader = offloader
        self.entries: dict = defaultdict(list)

    def keep(self, op, args: tuple, out) -> None:
        q = next(a for a in args if isinstance(a, torch.Tensor))
        large = max(1, q.numel() // max(1, q.shape[-1]))  # one element per query token and head
        container = type(out) if isinstance(out, (tuple, list)) else None
        kept = []
        for item in (out if container else (out,)):
            if isinstance(item, torch.Tensor):
                item = item.detach()
                if self.offloader is not None and item.is_floating_point() and item.numel() >= large:
                    packed = self.offloader.ride(item)
                    item = item if packed is None else packed
            kept.append(item)
        self.entries[op].append((container, kept))

    def take(self, op, index: int):
        """The outputs of the `index`-th call of `op`, on the device; None when there are none (left)."""
        calls = self.entries.get(op, ())
        if index >= len(calls) or calls[index] is None:
            return None
        container, kept = calls[index]
        calls[index] = None
        items = [self.offloader.take(item) if isinstance(item, _Offloaded) else item for item in kept]
        return container(items) if container else items[0]

    def counts(self) -> tuple[int, int]:
        """(tensors held on the device, tensors held as host copies) not yet taken."""
        items = [item for calls in self.entries.values() for entry in calls if entry is not None for item in entry[1]]
        return sum(isinstance(i, torch.Tensor) for i in items), sum(isinstance(i, _Offloaded) for i in items)


class _Keep(TorchDispatchMode):
    """The forward pass: runs every op, stores the self-attention kernels' outputs."""

    def __init__(self, store: KeptOutputs):
        super().__init__()
        self.store = store

    @classmethod
    def ignore_compile_internals(cls) -> bool:
        return True

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if is_self_attention_op(func, args, kwargs):
            self.store.keep(func, args, out)
        return out


class _Replay(TorchDispatchMode):
    """The recomputation: the self-attention kernels' stored outputs in place of running them again."""

    def __init__(self, store: KeptOutputs):
        super().__init__()
        self.store = store
        self.calls: dict = defaultdict(int)

    @classmethod
    def ignore_compile_internals(cls) -> bool:
        return True

    def __enter__(self):
        self.calls.clear()
        return super().__enter__()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if is_self_attention_op(func, args, kwargs):
            index = self.calls[func]
            self.calls[func] += 1
            out = self.store.take(func, index)
            if out is not None:
                return out
        return func(*args, **kwargs)


class KeptAttention:
    """`WanModel.keep_attention_context_fn` that sends the kept self-attention outputs of each block whose input
    `offloader` offloads to host memory with it (None: keep them all on the device, as torch's contexts do).
    `stores` holds the `KeptOutputs` of the checkpointed calls still alive (weakly; for logs and tests)."""

    def __init__(self, offloader: ActivationOffloader | None):
        self.offloader = offloader
        self.stores: weakref.WeakSet = weakref.WeakSet()

    def __call__(self) -> tuple[TorchDispatchMode, TorchDispatchMode]:
        store = KeptOutputs(self.offloader)
        self.stores.add(store)
        return _Keep(store), _Replay(store)

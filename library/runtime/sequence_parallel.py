"""Sequence parallelism: one sample's video tokens split over the N processes of a sequence group.

Each process embeds the whole sample (cheap), keeps its own contiguous slice of the tokens (the sequence
padded at the end to a multiple of N) with the RoPE rows and per-token modulation of that slice, and runs
every block on the slice. Everything in a block is per token except self-attention, which needs every
key; two ways are offered:

- `ulysses` (DeepSpeed-Ulysses): one all-to-all turns q, k, v of [tokens / N, all heads] into
  [all tokens, heads / N], the unchanged attention kernel (any backend) runs on the full sequence for its
  heads, and a second all-to-all returns [tokens / N, all heads]. N must divide the head count. Traffic
  per block: 4 x (N - 1) / N of the local q/k/v/out bytes each way.
- `all_gather`: k and v of every process are gathered (the padding cut off) and the local queries attend
  to all of them; any N, but each process holds the full keys and values of a block (2 x tokens x width).

The head's output is gathered so every process returns the whole prediction and computes the same loss.
The gather's backward sums the N identical gradients of that loss (a reduce-scatter), so each process
holds N times its own share of the parameter gradients: the usual mean over all processes (data
parallelism, FSDP, the fused pass) then yields the data-parallel mean of the sequence group's sums,
i.e. exactly the gradients of one process on the same samples.

The collectives are PyTorch's autograd-aware functional collectives; they run on NCCL and on gloo.
The model calls `split`, `attention` and `gather` through its `sequence_parallel` attribute (None: the
whole sequence on this process); `active(model)` sets it for a forward pass and its backward pass, which
recomputes checkpointed blocks and so must split them the same way.
"""

from __future__ import annotations

import contextlib
import math

import torch
import torch.nn.functional as F

from library.errors import UserError
from library.wan.attention import attention as attention_kernel

MODES = ("ulysses", "all_gather")


class SequenceParallelError(UserError, ValueError):
    """A sequence-parallel setting this model or launch cannot use; the message says what to change."""


def check_heads(num_heads: int, size: int, mode: str, where: str = "sequence_parallel_size") -> None:
    """Ulysses splits the heads: N must divide them."""
    if mode not in MODES:
        raise SequenceParallelError(f"sequence_parallel_attention = {mode!r}: choose one of {', '.join(MODES)}")
    if size > 1 and mode == "ulysses" and num_heads % size:
        fits = [n for n in range(2, num_heads + 1) if num_heads % n == 0 and n <= 64]
        raise SequenceParallelError(
            f"{where} = {size}: Ulysses sequence parallelism splits the attention heads, and {size} does not "
            f"divide this model's {num_heads} heads; use one of {', '.join(map(str, fits[:8]))}, or set "
            "sequence_parallel_attention = 'all_gather' (any size; every process then holds the full keys and "
            "values of a block)")


class SequenceParallel:
    """The sequence group of this process: `size` processes, this one at `rank` in it."""

    def __init__(self, group, size: int, rank: int, mode: str = "ulysses"):
        if mode not in MODES:
            raise SequenceParallelError(f"sequence_parallel_attention = {mode!r}: choose one of {', '.join(MODES)}")
        self.group, self.size, self.rank, self.mode = group, size, rank, mode
        self.length = 0  # tokens of the sample in the forward pass under way (set by `split`)

    # ---- collectives (autograd-aware) ----------------------------------------------------------------

    def _all_to_all(self, t: torch.Tensor) -> torch.Tensor:
        """Chunk i of dim 0 goes to process i; chunk i of the result came from process i."""
        from torch.distributed._functional_collectives import all_to_all_single_autograd

        return all_to_all_single_autograd(t.contiguous(), None, None, self.group)  # waited for at first use

    def _all_gather(self, t: torch.Tensor, dim: int) -> torch.Tensor:
        import torch.distributed._functional_collectives as fc

        gather = getattr(fc, "all_gather_single_autograd", None) or fc.all_gather_tensor_autograd  # renamed in 2.13
        return gather(t.contiguous(), dim, self.group)

    # ---- the three steps the model calls ----------------------------------------------------------------

    def local_tokens(self, length: int) -> int:
        return math.ceil(length / self.size)

    def split(self, x: torch.Tensor, e: torch.Tensor, e0: torch.Tensor, rope: tuple):
        """x [B, L, C], e [B, G, C], e0 [B, G, 6, C], rope ([L, 1, D/2, 2] x 2) -> this process's slice of
        each. Modulation groups (G > 1: one per frame for TI2V) become the local slice's own groups of equal
        size (the gcd of the tokens per group and per process), so no per-token copy is made."""
        length = x.shape[1]
        local = self.local_tokens(length)
        pad = local * self.size - length
        self.length = length
        start = self.rank * local
        x = F.pad(x, (0, 0, 0, pad))[:, start:start + local]
        rope = tuple(F.pad(t, (0, 0, 0, 0, 0, 0, 0, pad))[start:start + local] for t in rope)
        groups = e0.shape[1]
        if groups > 1:  # per-frame (or per-token) modulation: the groups of the local slice, as few as can be
            size = length // groups
            step = math.gcd(size, local)  # a local group never straddles two groups of the sample
            index = torch.arange(start, start + local, step, device=x.device).clamp(max=length - 1) // size
            e, e0 = e[:, index], e0[:, index]  # padding tokens take the last group
        return x, e, e0, rope

    def attention(self, q, k, v, backend: str = "sdpa", split_batch: bool = False) -> torch.Tensor:
        """Self-attention of the local queries [B, L/N, H, D] over every process's keys; same layout out."""
        if self.mode == "all_gather":
            kv = self._all_gather(torch.stack([k, v]), 2)[:, :, :self.length]  # [2, B, L, H, D]
            return attention_kernel(q, kv[0], kv[1], backend, split_batch)
        n, (b, local, heads, d) = self.size, q.shape
        send = torch.stack([q, k, v]).view(3, b, local, n, heads // n, d).permute(3, 0, 1, 2, 4, 5)
        full = self._all_to_all(send)  # [N (source), 3, B, L/N, H/N, D]
        full = full.permute(1, 2, 0, 3, 4, 5).reshape(3, b, n * local, heads // n, d)[:, :, :self.length]
        out = attention_kernel(full[0], full[1], full[2], backend, split_batch)  # [B, L, H/N, D]
        out = F.pad(out, (0, 0, 0, 0, 0, n * local - self.length))
        back = self._all_to_all(out.view(b, n, local, heads // n, d).transpose(0, 1))  # [N (heads), B, L/N, H/N, D]
        return back.permute(1, 2, 0, 3, 4).reshape(b, local, heads, d)

    def gather(self, out: torch.Tensor) -> torch.Tensor:
        """The head's output of the local tokens [B, L/N, P] -> every token's [B, L, P] on every process."""
        return self._all_gather(out, 1)[:, :self.length]

    @contextlib.contextmanager
    def active(self, *models):
        """Split the tokens of these models' forward passes (training): hold it over the backward pass too
        (gradient checkpointing recomputes the blocks there); restored afterwards."""
        for model in models:
            model.set_sequence_parallel(self)
        try:
            yield
        finally:
            for model in models:
                model.set_sequence_parallel(None)


def all_to_all_bytes(tokens: int, dim: int, size: int, layers: int, bytes_per_value: int = 2,
                     mode: str = "ulysses", passes: int = 2) -> float:
    """Bytes one process sends per training step of one sample under sequence parallelism of `size`: per
    block and pass, Ulysses sends (N - 1) / N of its q, k, v and attention output (4 x local tokens x width);
    `all_gather` sends its k and v to N - 1 processes (the backward reduce-scatters as much back). `passes`:
    forward and backward (2), plus the recomputed forward with gradient checkpointing (3). The gather of the
    head's output (out_dim values a token) is left out: under 0.1% of it."""
    if size <= 1:
        return 0.0
    local = math.ceil(tokens / size) * dim * bytes_per_value
    per_block = 4 * local * (size - 1) / size if mode == "ulysses" else 2 * local * (size - 1)
    return per_block * layers * passes

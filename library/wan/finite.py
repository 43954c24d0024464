"""The NaN / infinity screen of every model load (DiT, VAE, umT5, CLIP vision): a weight holding NaN or
infinity is refused with a `NonFiniteWeights` error naming the file and tensor, at load time, instead of
a NaN loss, NaN latents or NaN text embeddings many minutes later. The staged GPU loads (`staged_load.py`)
take the sums on the device and call `check_finite` only for a tensor whose sum was not finite.
"""

from __future__ import annotations

import torch

from .checkpoint_files import Checkpoint, CheckpointError

_FP8 = (torch.float8_e4m3fn, torch.float8_e5m2)


class NonFiniteWeights(CheckpointError):
    """A checkpoint tensor holds NaN or infinity; the message names the file and the tensor."""


def _non_finite(tensor: torch.Tensor) -> tuple[int, int] | None:
    """(NaN count, infinity count) of a tensor holding either, else None. One sum per tensor (NaN and
    infinity survive a sum): a read of every weight at memory speed, about 3 GB/s per two CPU cores, beside
    the disk reads a load does anyway; only a non-finite sum (or an overflow, ruled out here) pays for the
    exact count. fp8 is summed in bf16 (an exact cast)."""
    if not tensor.is_floating_point():
        return None
    screen = tensor.to(torch.bfloat16) if tensor.dtype in _FP8 else tensor
    if torch.isfinite(screen.sum()):
        return None
    nan, inf = int(screen.isnan().sum()), int(screen.isinf().sum())
    return (nan, inf) if nan or inf else None


def _refuse(where, key: str, tensor: torch.Tensor, counts: tuple[int, int]) -> None:
    raise NonFiniteWeights(
        f"{where}: tensor {key!r} holds {counts[0]} NaN and {counts[1]} infinite values (of {tensor.numel()}); "
        "the file is damaged or was saved from a diverged training: use another copy of the model (or an earlier "
        "checkpoint)")


def refuse_non_finite(where, key: str, tensor: torch.Tensor) -> None:
    """Raise `NonFiniteWeights` naming `where` (the file) and `key` when `tensor` holds NaN or infinity."""
    counts = _non_finite(tensor)
    if counts:
        _refuse(where, key, tensor, counts)


def check_finite(ckpt: Checkpoint, file_key: str, tensor: torch.Tensor) -> None:
    """`refuse_non_finite` for the tensor `file_key` of `ckpt`, named with the file (or shard) holding it."""
    counts = _non_finite(tensor)
    if counts:
        _refuse(ckpt.file_of(file_key), file_key, tensor, counts)

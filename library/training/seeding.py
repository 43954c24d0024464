"""Keyed randomness: every random draw of a run comes from a generator seeded by the run seed and the
draw's position (step, micro-step, item, purpose), so a resumed run, another process split or a
recomputed step draws the same numbers."""

from __future__ import annotations

import hashlib

import torch


def derive_seed(*parts) -> int:
    """A 63-bit seed from the run seed and a position (step, micro-step, sample, purpose)."""
    digest = hashlib.sha256(":".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def generator(*parts) -> torch.Generator:
    return torch.Generator().manual_seed(derive_seed(*parts))

"""Near-duplicate removal by perceptual hash.

Each image, and each clip's middle frame, has a 64-bit DCT hash (`quality.phash`). Going from the best
combined score down, an item whose hash is within `max_distance` bits of an item already kept is a
near-duplicate of it; so of each group of near-duplicates the best one stays.
"""

from __future__ import annotations

import numpy as np


def hamming(a: int, b: int) -> int:
    return int(bin(a ^ b).count("1"))


def _popcount(values: np.ndarray) -> np.ndarray:
    """Set bits per uint64 (np.bitwise_count needs numpy 2; this works on 1.26 too)."""
    return np.unpackbits(values.view(np.uint8)).reshape(-1, 64).sum(axis=1)


def find_duplicates(hashes: list[int], scores: list[float], max_distance: int) -> dict[int, tuple[int, int]]:
    """{index of a duplicate: (index of the kept item it repeats, distance)}; indices into `hashes`."""
    order = sorted(range(len(hashes)), key=lambda i: (-scores[i], i))
    kept_idx: list[int] = []
    kept = np.zeros(0, dtype=np.uint64)
    duplicates: dict[int, tuple[int, int]] = {}
    for i in order:
        value = np.uint64(hashes[i])
        if kept.size:
            distances = _popcount(np.bitwise_xor(kept, value))
            nearest = int(np.argmin(distances))
            if int(distances[nearest]) <= max_distance:
                duplicates[i] = (kept_idx[nearest], int(distances[nearest]))
                continue
        kept_idx.append(i)
        kept = np.append(kept, value)
    return duplicates

"""Parameter counts and bytes of the WAN DiT's parts, for the memory planners (`lora.py`, `full.py`) and the
MFU formula: block Linears, block biases and fp32 norms / modulation, the parts outside the blocks, VACE's
blocks and the LoRA over the WAN targets."""

from __future__ import annotations

import math

from library.wan.variants import WanVariant


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
        bf16 += v.clip_tokens * v.image_frames * d if v.end_frame else 0  # FLF2V: img_emb.emb_pos
    return bf16, fp32


def vace_params(v: WanVariant) -> tuple[int, int]:
    """(bf16, fp32) parameters of a VACE model's VACE blocks (block weights, `after_proj` on each and
    `before_proj` on the first) and VACE patch embedding; (0, 0) for other models."""
    n = len(v.vace_layers)
    if not n:
        return 0, 0
    biases, fp32 = block_other_params(v)
    projections = (n + 1) * (v.dim * v.dim + v.dim)
    patch = v.vace_in_dim * math.prod(v.patch_size) * v.dim + v.dim
    return n * (block_linear_params(v) + biases) + projections + patch, n * fp32


def lora_params(v: WanVariant, rank: int) -> int:
    """LoRA parameters over the WAN targets of every block (VACE blocks included): rank x (in + out) per
    Linear."""
    per_block = 8 * 2 * v.dim + (4 * v.dim if v.image_embedding else 0) + 2 * (v.dim + v.ffn_dim)
    return rank * per_block * (v.num_layers + len(v.vace_layers))


def _block_bytes(v: WanVariant, fp8: bool) -> float:
    biases, fp32 = block_other_params(v)
    scales = 12 * 4 if fp8 else 0
    return block_linear_params(v) * (1 if fp8 else 2) + scales + biases * 2 + fp32 * 4

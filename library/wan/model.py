"""The WAN diffusion transformer (DiT) for every variant: WAN 2.2 T2V/I2V-A14B experts, TI2V-5B, and
WAN 2.1 T2V-1.3B / T2V-14B / I2V-14B (CLIP image tokens).

One self-contained file. Parameter names are the official checkpoint names
(`blocks.0.self_attn.q.weight`), so official and ComfyUI files load without renaming; other formats are
mapped in `loading.py`. Shape notation: B batch, L video tokens, C model width, H heads, D head dim,
G modulation groups (1 per sample, F per frame or L per token).

Precision: timestep embedding, modulation, norms and the residual stream run in fp32, as the official
model does under autocast; the Linear layers run in `compute_dtype` (by default the dtype of the
weights). The output is always fp32.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

from .attention import attention, check_backend, choose_sdpa
from .variants import WanVariant


# --------------------------------------------------------------------------------------------------
# Small building blocks
# --------------------------------------------------------------------------------------------------


def sinusoidal_embedding(dim: int, t: torch.Tensor) -> torch.Tensor:
    """[N] timesteps -> [N, dim] fp32 embedding, cos half first, computed in float64 like the original."""
    half = dim // 2
    freqs = torch.pow(10000.0, -torch.arange(half, dtype=torch.float64, device=t.device) / half)
    angles = t.to(torch.float64)[:, None] * freqs[None]  # [N, half]
    return torch.cat([torch.cos(angles), torch.sin(angles)], dim=1).float()


class RMSNorm(nn.Module):
    """RMS norm over the last dim in fp32, cast back to the input dtype, then scaled by `weight` in that dtype
    (the official order of operations). `F.rms_norm` does the first part in one kernel, upcasting bf16 /
    fp16 inside it, instead of separate fp32 cast, square, mean, rsqrt and multiply kernels."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, (x.shape[-1],), eps=self.eps) * self.weight.to(x.dtype)


class FP32LayerNorm(nn.LayerNorm):
    """LayerNorm computed in fp32 whatever the input or parameter dtype; returns fp32."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight.float() if self.weight is not None else None
        bias = self.bias.float() if self.bias is not None else None
        return F.layer_norm(x.float(), self.normalized_shape, weight, bias, self.eps)


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x [B, L, C] * (1 + scale) + shift, with shift/scale [B, G, C] shared by L/G consecutive tokens; one
    `addcmul` over the tokens."""
    b, length, c = x.shape
    groups = shift.shape[1]
    x = x.view(b, groups, length // groups, c)
    return torch.addcmul(shift[:, :, None], x, 1 + scale[:, :, None]).view(b, length, c)


def gated_residual(x: torch.Tensor, y: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """x + y * g: the fp32 residual stream x [B, L, C] plus the block output y [B, L, C] (compute dtype)
    gated by g [B, G, C] (grouped like `modulate`), in fp32, in one `addcmul` (y is promoted inside it,
    never copied to fp32)."""
    b, length, c = x.shape
    groups = g.shape[1]
    view = (b, groups, length // groups, c)
    return torch.addcmul(x.view(view), y.view(view), g[:, :, None]).view(b, length, c)


# --------------------------------------------------------------------------------------------------
# 3D rotary position embedding
# --------------------------------------------------------------------------------------------------


def rope_axis_dims(head_dim: int) -> tuple[int, int, int]:
    """Rotary dims given to (frame, height, width): 44/42/42 for head dim 128."""
    hw = 2 * (head_dim // 6)
    return head_dim - 2 * hw, hw, hw


def rope_tables(grid: tuple[int, int, int], head_dim: int, device, theta: float = 10000.0,
                frame_positions: Sequence[int] | None = None):
    """cos/sin tables [L, 1, D/2, 2] (fp32) for a (F, H, W) token grid in f-major order, laid out for
    `apply_rope`: cos repeated for both members of a pair, sin as (-sin, +sin). `frame_positions` (F
    integers) replaces the frame positions 0..F-1 (one-frame training and inference: the RoPE time index of
    each latent frame, as musubi-tuner's `f_indices`).

    Each axis has its own frequency ladder 1/theta^(2i/D_axis); pair j of a head is rotated by the
    frame angle for the first D_f/2 pairs, then the height angle, then the width angle.
    """
    angles = []
    for size, axis_dim, n_before in zip(grid, rope_axis_dims(head_dim), range(3)):
        inv = 1.0 / theta ** (torch.arange(0, axis_dim, 2, dtype=torch.float64, device=device) / axis_dim)
        pos = torch.arange(size, dtype=torch.float64, device=device)
        if n_before == 0 and frame_positions is not None:
            pos = torch.tensor(list(frame_positions), dtype=torch.float64, device=device)
        a = pos[:, None] * inv[None]  # [size, axis_dim/2]
        shape = [1, 1, 1, a.shape[1]]
        shape[n_before] = size
        angles.append(a.view(shape).expand(*grid, a.shape[1]))
    table = torch.cat(angles, dim=-1).reshape(-1, 1, head_dim // 2)  # [L, 1, D/2]
    cos, sin = torch.cos(table).float(), torch.sin(table).float()
    return torch.stack([cos, cos], dim=-1), torch.stack([-sin, sin], dim=-1)  # [L, 1, D/2, 2] each


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs (x[2j], x[2j+1]) of x [B, L, H, D] by the table angles, real-valued and in
    fp32: (x0, x1) -> (x0 cos - x1 sin, x1 cos + x0 sin) = x * cos + swap(x) * (-sin, sin). The bf16 / fp16
    input is promoted inside the multiplies (no fp32 copy of x)."""
    pairs = x.unflatten(-1, (-1, 2))  # [B, L, H, D/2, 2]
    return (pairs * cos + pairs.flip(-1) * sin).flatten(-2).to(x.dtype)


# --------------------------------------------------------------------------------------------------
# Attention modules
# --------------------------------------------------------------------------------------------------


class SelfAttention(nn.Module):
    def __init__(self, dim: int, num_heads: int, eps: float):
        super().__init__()
        self.num_heads = num_heads
        self.q, self.k, self.v, self.o = (nn.Linear(dim, dim) for _ in range(4))
        self.norm_q = RMSNorm(dim, eps)  # over the full width, before the head split
        self.norm_k = RMSNorm(dim, eps)
        self.sequence_parallel = None  # set by WanModel.set_sequence_parallel: attention over split tokens

    def forward(self, x: torch.Tensor, rope: tuple, backend: str, split: bool) -> torch.Tensor:
        b, length, _ = x.shape  # [B, L, C] in compute dtype
        q = self.norm_q(self.q(x)).view(b, length, self.num_heads, -1)
        k = self.norm_k(self.k(x)).view(b, length, self.num_heads, -1)
        v = self.v(x).view(b, length, self.num_heads, -1)
        q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        attend = attention if self.sequence_parallel is None else self.sequence_parallel.attention
        return self.o(attend(q, k, v, backend, split).flatten(2))


class CrossAttention(nn.Module):
    """Cross-attention to the text tokens; WAN 2.1 I2V adds a second attention to the CLIP tokens."""

    def __init__(self, dim: int, num_heads: int, eps: float, image_tokens: int = 0):
        super().__init__()
        self.num_heads = num_heads
        self.image_tokens = image_tokens
        self.q, self.k, self.v, self.o = (nn.Linear(dim, dim) for _ in range(4))
        self.norm_q = RMSNorm(dim, eps)
        self.norm_k = RMSNorm(dim, eps)
        if image_tokens:
            self.k_img = nn.Linear(dim, dim)
            self.v_img = nn.Linear(dim, dim)
            self.norm_k_img = RMSNorm(dim, eps)

    def _heads(self, t: torch.Tensor) -> torch.Tensor:
        return t.view(t.shape[0], t.shape[1], self.num_heads, -1)

    def forward(self, x: torch.Tensor, context: torch.Tensor, backend: str, split: bool) -> torch.Tensor:
        # x [B, L, C]; context [B, (257 +) 512, C], CLIP tokens first for WAN 2.1 I2V
        image, text = context[:, : self.image_tokens], context[:, self.image_tokens :]
        q = self._heads(self.norm_q(self.q(x)))
        k = self._heads(self.norm_k(self.k(text)))
        out = attention(q, k, self._heads(self.v(text)), backend, split)
        if self.image_tokens:
            k_img = self._heads(self.norm_k_img(self.k_img(image)))
            out = out + attention(q, k_img, self._heads(self.v_img(image)), backend, split)
        return self.o(out.flatten(2))


class WanBlock(nn.Module):
    """Self-attention, cross-attention and FFN; modulated (shift, scale, gate) by the timestep."""

    def __init__(self, dim: int, ffn_dim: int, num_heads: int, eps: float, image_tokens: int = 0):
        super().__init__()
        self.norm1 = FP32LayerNorm(dim, eps, elementwise_affine=False)
        self.self_attn = SelfAttention(dim, num_heads, eps)
        self.norm3 = FP32LayerNorm(dim, eps, elementwise_affine=True)  # before cross-attention
        self.cross_attn = CrossAttention(dim, num_heads, eps, image_tokens)
        self.norm2 = FP32LayerNorm(dim, eps, elementwise_affine=False)
        self.ffn = nn.Sequential(nn.Linear(dim, ffn_dim), nn.GELU(approximate="tanh"), nn.Linear(ffn_dim, dim))
        self.modulation = nn.Parameter(torch.empty(1, 6, dim))  # filled by WanModel.init_weights

    def forward(self, x, e0, context, rope, backend: str = "sdpa", split: bool = False, dtype=None):
        # x [B, L, C] fp32 residual stream; e0 [B, G, 6, C] fp32; context [B, Lc, C] in compute dtype
        dtype = dtype or context.dtype
        mods = (self.modulation.float().unsqueeze(0) + e0).unbind(2)  # 6 x [B, G, C]
        shift_sa, scale_sa, gate_sa, shift_ff, scale_ff, gate_ff = mods
        y = self.self_attn(modulate(self.norm1(x), shift_sa, scale_sa).to(dtype), rope, backend, split)
        x = gated_residual(x, y, gate_sa)
        x = x + self.cross_attn(self.norm3(x).to(dtype), context, backend, split)  # promoted to fp32
        y = self.ffn(modulate(self.norm2(x), shift_ff, scale_ff).to(dtype))
        return gated_residual(x, y, gate_ff)


class Head(nn.Module):
    def __init__(self, dim: int, out_features: int, eps: float):
        super().__init__()
        self.norm = FP32LayerNorm(dim, eps, elementwise_affine=False)
        self.head = nn.Linear(dim, out_features)
        self.modulation = nn.Parameter(torch.empty(1, 2, dim))

    def forward(self, x: torch.Tensor, e: torch.Tensor, dtype) -> torch.Tensor:
        # x [B, L, C] fp32; e [B, G, C] fp32 (time embedding before the projection)
        shift, scale = (self.modulation.float().unsqueeze(0) + e.unsqueeze(2)).unbind(2)
        return self.head(modulate(self.norm(x), shift, scale).to(dtype))


class ImageEmbedding(nn.Module):
    """WAN 2.1 I2V: CLIP ViT-H tokens [B, 257, 1280] -> [B, 257, C] (`img_emb.proj.0/1/3/4`). FLF2V: the
    first and last frames' tokens side by side ([B, 514, 1280], also accepted as [B, 2, 257, 1280] or
    [2B, 257, 1280] with each sample's two frames adjacent) plus the learned `img_emb.emb_pos` [1, 514, 1280]."""

    def __init__(self, clip_dim: int, dim: int, pos_tokens: int = 0):
        super().__init__()
        self.proj = nn.Sequential(
            FP32LayerNorm(clip_dim), nn.Linear(clip_dim, clip_dim), nn.GELU(), nn.Linear(clip_dim, dim),
            FP32LayerNorm(dim),
        )
        self.emb_pos = nn.Parameter(torch.zeros(1, pos_tokens, clip_dim)) if pos_tokens else None

    def forward(self, clip_fea: torch.Tensor, dtype) -> torch.Tensor:
        norm0, lin1, act, lin3, norm4 = self.proj
        if self.emb_pos is not None:
            clip_fea = clip_fea.reshape(-1, *self.emb_pos.shape[1:]) + self.emb_pos.to(clip_fea.dtype)
        x = lin3(act(lin1(norm0(clip_fea).to(dtype))))
        return norm4(x).to(dtype)


def is_self_attention_op(op, args: tuple, kwargs: dict | None = None) -> bool:
    """Whether a dispatched op is a self-attention kernel whose outputs selective checkpointing keeps: SDPA's aten
    kernels, flash-attn's custom ops, this package's opaque op (an op named *attn* / *attention*, not a backward,
    whose first two tensors, q and k, have one shape), never an out= variant (Inductor calls extern kernels with
    out=, into buffers it reuses). Cross-attention (512 keys) is cheap to recompute and its output as large as
    self-attention's, so it is not kept."""
    name = str(op)  # namespace.name.overload, e.g. aten._scaled_dot_product_cudnn_attention.default
    if not ("attn" in name or "attention" in name) or "backward" in name or "bwd" in name:
        return False
    if name.endswith(".out") or (kwargs and "out" in kwargs):
        return False
    tensors = [a for a in args if isinstance(a, torch.Tensor)]
    return len(tensors) >= 2 and tensors[0].shape == tensors[1].shape


def _self_attention_policy(ctx, op, *args, **kwargs) -> CheckpointPolicy:
    """Selective checkpointing: keep what a self-attention kernel returns (`is_self_attention_op`), recompute
    everything else."""
    return CheckpointPolicy.MUST_SAVE if is_self_attention_op(op, args, kwargs) else CheckpointPolicy.PREFER_RECOMPUTE


def _keep_self_attention():
    return create_selective_checkpoint_contexts(_self_attention_policy)


# --------------------------------------------------------------------------------------------------
# The model
# --------------------------------------------------------------------------------------------------


class WanModel(nn.Module):
    """The WAN DiT. `forward(x, timestep, context, y=None, clip_fea=None) -> [B, out_dim, F, H, W]`."""

    # Training facts, read by loaders, memory tools and the trainer.
    FP32_PARAM_PATTERNS = ("modulation", "norm", "time_embedding", "time_projection")
    CHECKPOINTABLE = ("blocks",)  # the LoRA targets are networks.lora_wan.WAN_TARGETS

    def __init__(self, variant: WanVariant):
        super().__init__()
        v = self.variant = variant
        self.attention_backend = "sdpa"
        self.split_attn = False
        self.gradient_checkpointing = False
        self.checkpoint_keep_attention = False  # selective checkpointing somewhere: see enable_gradient_checkpointing
        self.checkpoint_keep_attention_blocks = 0  # ... in this many blocks, the last checkpointed ones
        self.checkpoint_skip_blocks = 0  # the last blocks that are not checkpointed (keep every activation)
        self.compute_dtype: torch.dtype | None = None  # None: the dtype of the Linear weights
        # Compiled blocks: mark the token count dynamic before the first call, so one graph serves every
        # bucket (without it the first bucket is compiled static and the second recompiles)
        self.dynamic_tokens = False
        # Optional object whose `run(index, block, args, run_block)` runs each block in place of a direct
        # call (memory features: block swap, activation offload); None runs the blocks directly.
        self.block_runner = None
        # Optional `context_fn` of `torch.utils.checkpoint` for the blocks that keep their self-attention (the
        # runtime's `KeptAttention` sends the kept outputs to host memory with offloaded block inputs);
        # None: torch's selective checkpointing contexts, which keep them on the device.
        self.keep_attention_context_fn = None
        # Optional object splitting the tokens over processes (library.runtime.sequence_parallel): `split`
        # after the embeddings, `attention` in each self-attention, `gather` after the head; None: all here.
        self.sequence_parallel = None
        # 1. Patch, text and time embeddings
        self.patch_embedding = nn.Conv3d(v.in_dim, v.dim, kernel_size=v.patch_size, stride=v.patch_size)
        self.text_embedding = nn.Sequential(
            nn.Linear(v.text_dim, v.dim), nn.GELU(approximate="tanh"), nn.Linear(v.dim, v.dim)
        )
        self.time_embedding = nn.Sequential(nn.Linear(v.freq_dim, v.dim), nn.SiLU(), nn.Linear(v.dim, v.dim))
        self.time_projection = nn.Sequential(nn.SiLU(), nn.Linear(v.dim, 6 * v.dim))
        # 2. Transformer blocks
        image_tokens = v.clip_tokens * v.image_frames if v.image_embedding else 0
        self.blocks = nn.ModuleList(
            WanBlock(v.dim, v.ffn_dim, v.num_heads, v.eps, image_tokens) for _ in range(v.num_layers)
        )
        # 3. Output head
        self.head = Head(v.dim, math.prod(v.patch_size) * v.out_dim, v.eps)
        # 4. WAN 2.1 I2V image embedding
        if v.image_embedding:
            self.img_emb = ImageEmbedding(v.clip_dim, v.dim, image_tokens if v.end_frame else 0)
        # 5. Fun-Control V1.1 / 2.2: a reference frame [B, z, H, W] embedded as one extra frame of tokens
        if v.ref_conv:
            self.ref_conv = nn.Conv2d(v.latent_channels, v.dim, kernel_size=v.patch_size[1:], stride=v.patch_size[1:])
        self._rope_cache: dict = {}
        if not self.patch_embedding.weight.is_meta:  # on meta (before loading) there is nothing to fill
            self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        """The official from-scratch initialisation: xavier Linear / patch weights, zero biases, normal(0.02)
        text and time MLPs, modulation ~ N(0, 1/dim), zero output head."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
        nn.init.xavier_uniform_(self.patch_embedding.weight.view(self.variant.dim, -1))
        nn.init.zeros_(self.patch_embedding.bias)
        for mlp in (self.text_embedding, self.time_embedding):
            for module in mlp:
                if isinstance(module, nn.Linear):
                    nn.init.normal_(module.weight, std=0.02)
        for name, param in self.named_parameters():
            if name.endswith("modulation"):
                nn.init.normal_(param, std=self.variant.dim**-0.5)
        nn.init.zeros_(self.head.head.weight)

    # ---- configuration ---------------------------------------------------------------------------

    def set_attention_backend(self, backend: str, split_attn: bool = False) -> None:
        self.attention_backend = check_backend(backend)
        self.split_attn = split_attn

    def set_sequence_parallel(self, sequence_parallel) -> None:
        """Split each sample's tokens over a sequence group (None: every token on this process)."""
        self.sequence_parallel = sequence_parallel
        for block in self.blocks:
            block.self_attn.sequence_parallel = sequence_parallel

    def enable_gradient_checkpointing(self, enabled: bool = True, keep_attention: bool = False,
                                      keep_attention_blocks: int = 0, skip_blocks: int = 0) -> None:
        """Checkpoint every block (keep its input, recompute the rest in the backward pass). With
        `keep_attention` the self-attention kernel's outputs (its result and log-sum-exp) are kept too and
        only the cheap rest is recomputed: no second attention forward per block, for 2 T C + 4 H T bytes
        more a block (0.32 GiB for an A14B block at 32,760 tokens). `keep_attention_blocks` K (without
        `keep_attention`) keeps them in the last K checkpointed blocks only (VACE blocks: none) and recomputes
        the others: the backward pass reaches those blocks first, so their kept outputs are freed first and
        the peak holds K - 1 of them besides the block being recomputed.

        `skip_blocks` N: the last N blocks are not checkpointed at all (partial checkpointing): they keep
        every activation and run their forward pass once. Keeping attention applies to the checkpointed
        blocks before them (K counts among those, so at most num_layers - N); VACE blocks are always
        checkpointed when `enabled`. Checkpointing the last block saves nothing at the peak (its backward
        pass comes right after its forward), so N = 1 costs about no memory."""
        n = len(self.blocks)
        skip = max(0, min(int(skip_blocks), n)) if enabled else 0
        checkpointed = n - skip
        count = (checkpointed if keep_attention else max(0, min(int(keep_attention_blocks), checkpointed))) \
            if enabled else 0
        self.gradient_checkpointing = enabled
        self.checkpoint_skip_blocks = skip
        self.checkpoint_keep_attention_blocks = count
        self.checkpoint_keep_attention = count > 0
        for i, block in enumerate(self.blocks):
            block.checkpoint_skip = i >= checkpointed
            block.checkpoint_keep_attention = checkpointed - count <= i < checkpointed
        for block in getattr(self, "vace_blocks", ()):
            block.checkpoint_keep_attention = enabled and keep_attention

    @classmethod
    def is_fp32_param(cls, name: str) -> bool:
        """Parameters the official model keeps (or computes) in fp32: modulation, norms, time MLPs."""
        return any(p in name for p in cls.FP32_PARAM_PATTERNS)

    def _dtype(self) -> torch.dtype:
        if self.compute_dtype is not None:
            return self.compute_dtype
        dtype = self.blocks[0].self_attn.q.weight.dtype if len(self.blocks) else torch.float32
        return dtype if dtype in (torch.float32, torch.float16, torch.bfloat16) else torch.bfloat16

    # ---- pieces of the forward pass ---------------------------------------------------------------

    def _rope(self, grid: tuple[int, int, int], device, frame_positions=None) -> tuple[torch.Tensor, torch.Tensor]:
        positions = None if frame_positions is None else tuple(int(p) for p in frame_positions)
        if positions is not None and len(positions) != grid[0]:
            raise ValueError(f"frame_positions has {len(positions)} entries for {grid[0]} latent frames")
        key = (grid, str(device), positions)
        if key not in self._rope_cache:
            if len(self._rope_cache) > 16:
                self._rope_cache.clear()
            self._rope_cache[key] = rope_tables(grid, self.variant.head_dim, device, frame_positions=positions)
        return self._rope_cache[key]

    def _time_embeddings(self, timestep: torch.Tensor, batch: int, grid: tuple[int, int, int]):
        """timestep [B] or [B, L] -> e [B, G, C] and e0 [B, G, 6, C] in fp32.

        Per-token timesteps (TI2V) are reduced to one group per frame when they are constant within
        each frame (as the TI2V conditioning is), and to one group when constant overall: the maths is
        identical and the [B, L, 6, C] tensor is never built unless tokens really differ.
        """
        t = timestep.float()
        if t.dim() == 0:
            t = t.expand(batch)
        if t.dim() == 1:
            t = t[:, None]  # [B, 1]
        elif t.shape[1] != math.prod(grid):
            raise ValueError(f"per-token timestep has {t.shape[1]} entries, expected {math.prod(grid)} tokens")
        else:
            per_frame = t.view(batch, grid[0], -1)
            if bool((per_frame == per_frame[..., :1]).all()):
                t = per_frame[..., 0]  # [B, F]
                if bool((t == t[:, :1]).all()):
                    t = t[:, :1]  # [B, 1]
        groups = t.shape[1]
        sin = sinusoidal_embedding(self.variant.freq_dim, t.flatten())  # [B*G, freq_dim]
        w = self.time_embedding[0].weight
        e = self.time_embedding(sin.to(w.dtype)).float()  # [B*G, C]
        e0 = self.time_projection(e.to(w.dtype)).float()  # [B*G, 6C]
        return e.view(batch, groups, -1), e0.view(batch, groups, 6, -1)

    def _context(self, context, clip_fea, dtype) -> torch.Tensor:
        """Text tokens zero-padded to text_len (a list of [L_i, 4096] or [B, L, 4096]) -> [B, Lc, C]."""
        text_len = self.variant.text_len
        if isinstance(context, (list, tuple)):
            context = torch.stack([F.pad(c, (0, 0, 0, text_len - c.shape[0])) for c in context])
        elif context.shape[1] < text_len:
            context = F.pad(context, (0, 0, 0, text_len - context.shape[1]))
        if context.shape[1] != text_len:
            raise ValueError(f"context has {context.shape[1]} tokens; WAN takes at most {text_len}")
        ctx = self.text_embedding(context.to(dtype))  # [B, 512, C]
        if self.variant.image_embedding:
            if clip_fea is None:
                raise ValueError(f"{self.variant.name} needs CLIP image features (clip_fea [B, "
                                 f"{self.variant.image_frames * 257}, 1280])")
            ctx = torch.cat([self.img_emb(clip_fea, dtype), ctx], dim=1)  # [B, 257 + 512, C]
        return ctx

    def _unpatchify(self, x: torch.Tensor, grid: tuple[int, int, int]) -> torch.Tensor:
        """[B, L, pt*ph*pw*c] -> [B, c, F*pt, H*ph, W*pw]; token channels ordered (pt, ph, pw, c)."""
        (f, h, w), (pt, ph, pw) = grid, self.variant.patch_size
        x = x.view(x.shape[0], f, h, w, pt, ph, pw, -1)
        x = x.permute(0, 7, 1, 4, 2, 5, 3, 6)  # [B, c, F, pt, H, ph, W, pw]
        return x.reshape(x.shape[0], x.shape[1], f * pt, h * ph, w * pw)

    def run_block(self, block: WanBlock, args: tuple) -> torch.Tensor:
        """One block, checkpointed when gradient checkpointing is on, gradients are being recorded and the block
        is not one of the last `checkpoint_skip_blocks`."""
        if self.gradient_checkpointing and torch.is_grad_enabled() and not getattr(block, "checkpoint_skip", False):
            if getattr(block, "checkpoint_keep_attention", False):
                return checkpoint(block, *args, use_reentrant=False,
                                  context_fn=self.keep_attention_context_fn or _keep_self_attention)
            return checkpoint(block, *args, use_reentrant=False)
        return block(*args)

    # ---- forward ------------------------------------------------------------------------------------

    def embed(self, x, timestep, context, y=None, clip_fea=None, dtype=None, frame_positions=None, full_ref=None):
        """The inputs as the blocks take them: tokens [B, L, C] fp32, e [B, G, C], e0 [B, G, 6, C], the
        context [B, Lc, C], the rope tables and the token grid (F, H, W). `frame_positions`: the RoPE time
        index of each latent frame (one-frame mode), default 0..F-1. `full_ref` [B, z, H, W]: the reference
        latent of a model with `ref_conv` (None: zeros, as the VideoX-Fun pipelines pass without a reference
        image); its tokens lead as frame 0 of an F + 1 grid."""
        dtype = dtype or self._dtype()
        if y is not None:
            x = torch.cat([x, y.to(x.dtype)], dim=1)  # I2V: noisy latents + mask + image latents
        if x.shape[1] != self.variant.in_dim:
            hint = " (I2V models need `y`)" if self.variant.is_i2v and y is None else ""
            raise ValueError(f"{self.variant.name} takes {self.variant.in_dim} input channels, got {x.shape[1]}{hint}")
        x = self.patch_embedding(x.to(self.patch_embedding.weight.dtype))  # [B, C, F, H/2, W/2]
        batch, grid = x.shape[0], tuple(x.shape[2:])
        x = x.flatten(2).transpose(1, 2).float().contiguous()  # [B, L, C], f-major token order
        if self.variant.ref_conv:  # the reference frame's tokens go first, as frame 0 of an F + 1 grid
            if full_ref is None:
                full_ref = x.new_zeros(batch, self.variant.latent_channels,
                                       *(g * p for g, p in zip(grid[1:], self.variant.patch_size[1:])))
            ref = self.ref_conv(full_ref.to(self.ref_conv.weight.dtype)).flatten(2).transpose(1, 2).float()
            x, grid = torch.cat([ref, x], dim=1).contiguous(), (grid[0] + 1, *grid[1:])
        e, e0 = self._time_embeddings(timestep.to(x.device), batch, grid)
        ctx = self._context(context, clip_fea, dtype)
        rope = self._rope(grid, x.device, frame_positions)
        if self.sequence_parallel is not None:  # this process's slice of the tokens, RoPE and modulation
            x, e, e0, rope = self.sequence_parallel.split(x, e, e0, rope)
        if self.dynamic_tokens:
            for t in (x, *rope):
                torch._dynamo.maybe_mark_dynamic(t, 1 if t is x else 0)
        return x, e, e0, ctx, rope, grid

    def run_blocks(self, x, e0, ctx, rope, dtype, after_block=None) -> torch.Tensor:
        """Every block in order; `after_block(i, x)` (VACE: adds the hint of block i) follows block i."""
        for i, block in enumerate(self.blocks):
            args = (x, e0, ctx, rope, self.attention_backend, self.split_attn, dtype)
            if self.block_runner is not None:
                x = self.block_runner.run(i, block, args, self.run_block)
            else:
                x = self.run_block(block, args)
            if after_block is not None:
                x = after_block(i, x)
        return x

    def forward(
        self,
        x: torch.Tensor,
        timestep: torch.Tensor,
        context: torch.Tensor | Sequence[torch.Tensor],
        y: torch.Tensor | None = None,
        clip_fea: torch.Tensor | None = None,
        frame_positions: Sequence[int] | None = None,
        full_ref: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """x [B, C, F, H, W] latents; timestep [B] or [B, L] in 0..1000; context [B, L_txt, text_dim]
        (or a list of [L_i, text_dim]); y [B, C_y, F, H, W] for I2V and Fun; clip_fea [B, 257, 1280] for 2.1
        I2V; frame_positions: the RoPE time index of each latent frame (one-frame mode), default 0..F-1;
        full_ref [B, z, H, W]: the reference latent of a model with `ref_conv` (see `embed`).
        Returns the predicted flow [B, out_dim, F, H, W] in fp32."""
        dtype = self._dtype()
        choose_sdpa()  # SDPA's kernel order for this GPU: chosen and logged once per process
        x, e, e0, ctx, rope, grid = self.embed(x, timestep, context, y, clip_fea, dtype, frame_positions, full_ref)
        x = self.run_blocks(x, e0, ctx, rope, dtype)
        out = self.head(x, e, dtype)  # [B, L, pt*ph*pw*out_dim]
        if self.sequence_parallel is not None:  # every token's output, on every process of the group
            out = self.sequence_parallel.gather(out)
        if self.variant.ref_conv:  # the reference frame's tokens are not part of the output
            out, grid = out[:, grid[1] * grid[2]:], (grid[0] - 1, *grid[1:])
        return self._unpatchify(out.float(), grid)

"""VACE (video creation and editing): the WAN T2V DiT plus a stack of VACE blocks that turn a context video
into hints added to the base blocks' outputs. WAN 2.1 VACE-1.3B / VACE-14B and WAN 2.2 VACE-Fun-A14B.

Official names (ComfyUI uses the same):
- `vace_patch_embedding`: Conv3d(vace_in_dim, dim), the patch embedding of the VACE context (96 channels:
  16 inactive + 16 reactive latent channels + 64 mask channels, see `library/wan/vace_context.py`).
- `vace_blocks.N`: WAN blocks (the base block's names) plus `after_proj` (every one) and `before_proj`
  (block 0 only); VACE block N belongs to base block `vace_layers[N]`.

Forward (official `VaceWanModel`, diffusers `WanVACETransformer3DModel`):

    x = patch_embedding(latents)                      tokens [B, L, C]
    c = vace_patch_embedding(context), zero-padded to L tokens
    c = before_proj(c) + x                            (VACE block 0 only)
    for each VACE block n:  c = block(c);  hint_n = after_proj(c)
    for each base block i:  x = block(x);  x += scale * hint_n   where i == vace_layers[n]

Here the VACE context travels as the model's `y` argument (the conditioning tensor beside the latents, as
I2V's image latents do), so training and sampling pass it like any other conditioning; `vace_scale`
(official `vace_context_scale`, diffusers `control_hidden_states_scale`) is a float or one value per VACE
block. The VACE blocks stay resident (block swap and fp8 apply to the base blocks) and are checkpointed like
the base blocks.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from .attention import choose_sdpa
from .model import WanBlock, WanModel
from .variants import WanVariant


class VaceBlock(WanBlock):
    """A WAN block over the VACE stream c, with `after_proj` giving its hint (and `before_proj` on block 0
    adding the patch-embedded latents x to c first)."""

    def __init__(self, dim: int, ffn_dim: int, num_heads: int, eps: float, first: bool):
        super().__init__(dim, ffn_dim, num_heads, eps)
        self.before_proj = nn.Linear(dim, dim) if first else None
        self.after_proj = nn.Linear(dim, dim)

    def forward(self, c, x, e0, context, rope, backend: str = "sdpa", split: bool = False, dtype=None):
        # c, x [B, L, C] fp32; returns (c [B, L, C] fp32, hint [B, L, C] in compute dtype)
        dtype = dtype or context.dtype
        if self.before_proj is not None:
            c = self.before_proj(c.to(dtype)).float() + x
        c = super().forward(c, e0, context, rope, backend, split, dtype)
        return c, self.after_proj(c.to(dtype))


class VaceWanModel(WanModel):
    """`forward(x, timestep, context, y=vace_context, clip_fea=None, vace_scale=None)`; `y` is the VACE
    context [B, vace_in_dim, F', H, W] with F' <= F latent frames (shorter contexts are zero-padded in tokens,
    as the official model does)."""

    CHECKPOINTABLE = ("blocks", "vace_blocks")

    def __init__(self, variant: WanVariant):
        super().__init__(variant)
        v = variant
        if not v.vace_layers or v.vace_layers[0] != 0 or max(v.vace_layers) >= v.num_layers:
            raise ValueError(f"{v.name}: VACE layers {v.vace_layers} must start at 0 and lie below {v.num_layers}")
        self.vace_scale: float | Sequence[float] = 1.0  # the default of `forward`'s vace_scale
        self.vace_patch_embedding = nn.Conv3d(v.vace_in_dim, v.dim, kernel_size=v.patch_size, stride=v.patch_size)
        self.vace_blocks = nn.ModuleList(
            VaceBlock(v.dim, v.ffn_dim, v.num_heads, v.eps, first=n == 0) for n in range(len(v.vace_layers))
        )
        if not self.patch_embedding.weight.is_meta:
            self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        """The base model's initialisation; the VACE patch embedding like the base one, and `before_proj` /
        `after_proj` zero (the official init: an untrained VACE branch leaves the base model's output as is)."""
        super().init_weights()
        if not hasattr(self, "vace_blocks"):  # called by WanModel.__init__ before the VACE modules exist
            return
        nn.init.xavier_uniform_(self.vace_patch_embedding.weight.view(self.variant.dim, -1))
        nn.init.zeros_(self.vace_patch_embedding.bias)
        for block in self.vace_blocks:
            for proj in (block.before_proj, block.after_proj):
                if proj is not None:
                    nn.init.zeros_(proj.weight)
                    nn.init.zeros_(proj.bias)

    def vace_hints(self, vace_context: torch.Tensor, x: torch.Tensor, e0, ctx, rope, dtype) -> list[torch.Tensor]:
        """The VACE context [B, vace_in_dim, F', H, W] -> one hint [B, L, C] per VACE block."""
        if vace_context.shape[1] != self.variant.vace_in_dim:
            raise ValueError(f"{self.variant.name} takes a VACE context of {self.variant.vace_in_dim} channels, "
                             f"got {vace_context.shape[1]}")
        weight = self.vace_patch_embedding.weight
        c = self.vace_patch_embedding(vace_context.to(x.device, weight.dtype))
        c = c.flatten(2).transpose(1, 2).float()  # [B, L', C]
        if c.shape[0] != x.shape[0] or c.shape[1] > x.shape[1] or c.shape[2:] != x.shape[2:]:
            raise ValueError(f"VACE context gives {list(c.shape)} tokens for latents of {list(x.shape)} tokens; it "
                             "must have the latents' batch and size and at most their frames")
        c = F.pad(c, (0, 0, 0, x.shape[1] - c.shape[1])).contiguous()
        hints = []
        for block in self.vace_blocks:
            c, hint = self.run_block(block, (c, x, e0, ctx, rope, self.attention_backend, self.split_attn, dtype))
            hints.append(hint)
        return hints

    def _scales(self, vace_scale) -> list[float | torch.Tensor]:
        scale = self.vace_scale if vace_scale is None else vace_scale
        n = len(self.variant.vace_layers)
        if isinstance(scale, (int, float)):
            return [float(scale)] * n
        scales = list(torch.as_tensor(scale).flatten().unbind()) if isinstance(scale, torch.Tensor) else list(scale)
        if len(scales) != n:
            raise ValueError(f"vace_scale has {len(scales)} values; {self.variant.name} has {n} VACE blocks")
        return scales

    def forward(self, x, timestep, context, y=None, clip_fea=None, vace_scale=None) -> torch.Tensor:
        """x [B, 16, F, H, W] latents; y the VACE context [B, vace_in_dim, F, H, W]; the rest as `WanModel`.
        Returns the predicted flow [B, out_dim, F, H, W] in fp32."""
        if y is None:
            raise ValueError(f"{self.variant.name} needs a VACE context (y [B, {self.variant.vace_in_dim}, F, H, W]); "
                             "without control video, mask or reference, it is the encoding of a zero video with "
                             "an all-ones mask (library.wan.vace_context)")
        dtype = self._dtype()
        choose_sdpa()
        tokens, e, e0, ctx, rope, grid = self.embed(x, timestep, context, None, clip_fea, dtype)
        hints = self.vace_hints(y, tokens, e0, ctx, rope, dtype)
        scales = self._scales(vace_scale)
        slot = {layer: n for n, layer in enumerate(self.variant.vace_layers)}

        def add_hint(i: int, h: torch.Tensor) -> torch.Tensor:
            n = slot.get(i)
            return h if n is None else h + hints[n] * scales[n]  # fp32 residual stream

        out = self.head(self.run_blocks(tokens, e0, ctx, rope, dtype, add_hint), e, dtype)
        return self._unpatchify(out.float(), grid)


def build_dit(variant: WanVariant) -> WanModel:
    """The DiT class a variant needs: `VaceWanModel` for VACE variants, else `WanModel`."""
    return VaceWanModel(variant) if variant.is_vace else WanModel(variant)

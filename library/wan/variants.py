"""Named WAN model variants: architecture shapes plus the per-variant defaults.

A variant is the single place that knows what a task name means: the DiT shapes, which VAE and
conditioning it uses, and the sampling/training defaults (expert boundary, flow shift, fps, guidance,
frame count, resolution). The trainer, the sampler and the loaders read these fields instead of
hard-coding numbers. Real variants follow the official configs; tiny ones exist for tests and the demo.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from library.errors import UserError


@dataclass(frozen=True)
class WanVariant:
    """One WAN model configuration. Shapes first, then the defaults that travel with the model."""

    name: str
    version: str  # "2.1" or "2.2"
    model_type: str  # "t2v", "i2v", "ti2v" or "vace"
    dim: int
    ffn_dim: int
    num_heads: int
    num_layers: int
    in_dim: int
    out_dim: int
    vae: str  # "2.1" (z 16, 4x8x8) or "2.2" (z 48, 4x16x16)
    image_embedding: bool = False  # WAN 2.1 I2V: CLIP tokens through img_emb, k_img / v_img
    end_frame: bool = False  # WAN 2.1 FLF2V: first and last frame known (y mask, 2 x CLIP tokens, img_emb.emb_pos)
    images_only: bool = False  # text-to-image training of a video model (musubi's t2i-14B): 1-frame items only
    two_experts: bool = False  # WAN 2.2 A14B: a high-noise and a low-noise expert
    # VACE: the base blocks that receive a hint (one VACE block each) and the VACE context channels
    vace_layers: tuple[int, ...] = ()
    vace_in_dim: int = 0
    control: bool = False  # Fun-Control: control-video latents follow the noisy latents (see library/wan/fun.py)
    ref_conv: bool = False  # Fun-Control V1.1 / 2.2: `ref_conv` embeds a reference frame (detected from the file)
    inpaint: bool = False  # Fun-InP: an end frame can be kept too, through the I2V mask (library/wan/fun.py)
    # Defaults that belong to the model, not to a training run.
    boundary: float | None = None  # expert switch as a fraction of 1000 timesteps
    flow_shift: float = 5.0
    sample_steps: int = 50
    guidance: tuple[float, float] = (5.0, 5.0)  # (low-noise expert, high-noise expert)
    fps: int = 16
    num_frames: int = 81
    resolution: tuple[int, int] = (832, 480)  # (width, height)
    # Fixed by the architecture family.
    patch_size: tuple[int, int, int] = (1, 2, 2)
    text_dim: int = 4096
    text_len: int = 512
    freq_dim: int = 256
    eps: float = 1e-6
    clip_dim: int = 1280
    clip_tokens: int = 257
    aliases: tuple[str, ...] = field(default=(), compare=False)

    @property
    def head_dim(self) -> int:
        return self.dim // self.num_heads

    @property
    def vae_stride(self) -> tuple[int, int, int]:
        return (4, 8, 8) if self.vae == "2.1" else (4, 16, 16)

    @property
    def latent_channels(self) -> int:
        return 16 if self.vae == "2.1" else 48

    @property
    def is_i2v(self) -> bool:
        """True when the model needs the image conditioning `y` (extra input channels)."""
        return self.model_type == "i2v"

    @property
    def is_vace(self) -> bool:
        """True when the model has VACE blocks and takes a VACE context (`library.wan.vace`)."""
        return bool(self.vace_layers)

    def shape_signature(self) -> tuple:
        """What the tensor shapes of a checkpoint reveal; used to detect the variant from a file."""
        return (self.dim, self.ffn_dim, self.num_layers, self.in_dim, self.out_dim, self.image_embedding,
                self.end_frame, len(self.vace_layers), self.vace_in_dim)

    @property
    def image_frames(self) -> int:
        """How many frames' CLIP tokens the DiT takes: 2 for FLF2V (first, last), else 1."""
        return 2 if self.end_frame else 1

    def describe(self) -> str:
        kind = {"t2v": "text-to-video", "i2v": "image-to-video", "ti2v": "text/image-to-video",
                "vace": f"VACE, {len(self.vace_layers)} VACE blocks"}[self.model_type]
        kind = "first-last-frame-to-video" if self.end_frame else ("text-to-image" if self.images_only else kind)
        kind += " Fun-Control" if self.control else ""
        return f"{self.name} (WAN {self.version} {kind}, {self.in_dim} input channels)"


_A14B = dict(dim=5120, ffn_dim=13824, num_heads=40, num_layers=40, out_dim=16, vae="2.1")
_14B_21 = dict(dim=5120, ffn_dim=13824, num_heads=40, num_layers=40, out_dim=16, vae="2.1", version="2.1")

VARIANTS: dict[str, WanVariant] = {}


def _register(variant: WanVariant) -> None:
    for key in (variant.name, *variant.aliases):
        VARIANTS[key.lower()] = variant


for _v in (
    # WAN 2.2 (listed first: when shapes are ambiguous, 2.2 wins)
    WanVariant(name="t2v-A14B", version="2.2", model_type="t2v", in_dim=16, two_experts=True,
               boundary=0.875, flow_shift=12.0, sample_steps=40, guidance=(3.0, 4.0),
               resolution=(1280, 720), **_A14B),
    WanVariant(name="i2v-A14B", version="2.2", model_type="i2v", in_dim=36, two_experts=True,
               boundary=0.900, flow_shift=5.0, sample_steps=40, guidance=(3.5, 3.5),
               resolution=(1280, 720), **_A14B),
    WanVariant(name="ti2v-5B", version="2.2", model_type="ti2v", dim=3072, ffn_dim=14336, num_heads=24,
               num_layers=30, in_dim=48, out_dim=48, vae="2.2", flow_shift=5.0, sample_steps=50,
               guidance=(5.0, 5.0), fps=24, num_frames=121, resolution=(1280, 704)),
    # WAN 2.1
    WanVariant(name="t2v-14B", model_type="t2v", in_dim=16, resolution=(1280, 720), **_14B_21),
    WanVariant(name="t2v-1.3B", version="2.1", model_type="t2v", dim=1536, ffn_dim=8960, num_heads=12,
               num_layers=30, in_dim=16, out_dim=16, vae="2.1"),
    WanVariant(name="i2v-14B", model_type="i2v", in_dim=36, image_embedding=True, sample_steps=40,
               **_14B_21),
    # WAN 2.1 FLF2V: the I2V-14B architecture plus img_emb.emb_pos; official sampling defaults (shift 16, 50 steps)
    WanVariant(name="flf2v-14B", model_type="i2v", in_dim=36, image_embedding=True, end_frame=True,
               flow_shift=16.0, resolution=(1280, 720), **_14B_21),
    # musubi-tuner's t2i-14B: the WAN 2.1 T2V-14B model trained and sampled on single images
    WanVariant(name="t2i-14B", model_type="t2v", in_dim=16, images_only=True, num_frames=1, resolution=(1024, 1024),
               **_14B_21),
    # VACE (video creation and editing): the T2V DiT plus VACE blocks fed a 96-channel context
    # [16 inactive | 16 reactive latents | 64 mask] (library/wan/vace.py, docs/vace.md)
    WanVariant(name="vace-A14B", version="2.2", model_type="vace", in_dim=16, two_experts=True,  # VideoX-Fun's
               boundary=0.875, flow_shift=12.0, sample_steps=50, guidance=(5.0, 5.0), resolution=(832, 480),
               vace_layers=tuple(range(0, 40, 5)), vace_in_dim=96, aliases=("vace-fun-A14B",), **_A14B),
    WanVariant(name="vace-14B", model_type="vace", in_dim=16, resolution=(1280, 720), flow_shift=16.0,
               vace_layers=tuple(range(0, 40, 5)), vace_in_dim=96, **_14B_21),
    WanVariant(name="vace-1.3B", version="2.1", model_type="vace", dim=1536, ffn_dim=8960, num_heads=12,
               num_layers=30, in_dim=16, out_dim=16, vae="2.1", flow_shift=16.0,
               vace_layers=tuple(range(0, 30, 2)), vace_in_dim=96),
    # Tiny variants for tests and the CPU demo (head dim 16 keeps the 3D RoPE split non-trivial).
    WanVariant(name="t2v-tiny", version="2.2", model_type="t2v", dim=32, ffn_dim=64, num_heads=2,
               num_layers=2, in_dim=16, out_dim=16, vae="2.1", text_dim=64, freq_dim=32,
               boundary=0.875, two_experts=True, flow_shift=12.0, sample_steps=8, guidance=(3.0, 4.0),
               num_frames=9, resolution=(64, 64)),
    WanVariant(name="i2v-tiny", version="2.2", model_type="i2v", dim=32, ffn_dim=64, num_heads=2,
               num_layers=2, in_dim=36, out_dim=16, vae="2.1", text_dim=64, freq_dim=32,
               boundary=0.9, two_experts=True, sample_steps=8, guidance=(3.5, 3.5),
               num_frames=9, resolution=(64, 64)),
    WanVariant(name="ti2v-tiny", version="2.2", model_type="ti2v", dim=32, ffn_dim=64, num_heads=2,
               num_layers=2, in_dim=48, out_dim=48, vae="2.2", text_dim=64, freq_dim=32,
               sample_steps=8, fps=24, num_frames=9, resolution=(64, 64)),
    WanVariant(name="i2v-tiny-2.1", version="2.1", model_type="i2v", dim=32, ffn_dim=64, num_heads=2,
               num_layers=2, in_dim=36, out_dim=16, vae="2.1", image_embedding=True, text_dim=64,
               freq_dim=32, clip_dim=40, sample_steps=8, num_frames=9, resolution=(64, 64)),
    WanVariant(name="t2i-tiny", version="2.1", model_type="t2v", dim=32, ffn_dim=64, num_heads=2, num_layers=2,
               in_dim=16, out_dim=16, vae="2.1", images_only=True, text_dim=64, freq_dim=32, sample_steps=8,
               num_frames=1, resolution=(64, 64)),
    WanVariant(name="flf2v-tiny", version="2.1", model_type="i2v", dim=32, ffn_dim=64, num_heads=2,
               num_layers=2, in_dim=36, out_dim=16, vae="2.1", image_embedding=True, end_frame=True, text_dim=64,
               freq_dim=32, clip_dim=40, flow_shift=16.0, sample_steps=8, num_frames=9, resolution=(64, 64)),
    WanVariant(name="vace-tiny", version="2.1", model_type="vace", dim=32, ffn_dim=64, num_heads=2,
               num_layers=4, in_dim=16, out_dim=16, vae="2.1", text_dim=64, freq_dim=32, sample_steps=8,
               num_frames=9, resolution=(64, 64), vace_layers=(0, 2), vace_in_dim=96),
):
    _register(_v)

# Fun-InP / Fun-Control (alibaba-pai VideoX-Fun; task names of the Fun-Control models as musubi-tuner's):
# the shapes and conditioning are listed with their sources in docs/variants.md.
_13B = dict(dim=1536, ffn_dim=8960, num_heads=12, num_layers=30, out_dim=16, vae="2.1", version="2.1")
_FUN22 = dict(two_experts=True, boundary=0.900, flow_shift=5.0, sample_steps=50, guidance=(6.0, 6.0), **_A14B)
for _v in (
    WanVariant(name="t2v-1.3B-FC", model_type="t2v", in_dim=48, image_embedding=True, control=True, **_13B),
    WanVariant(name="t2v-14B-FC", model_type="t2v", in_dim=48, image_embedding=True, control=True,
               resolution=(1280, 720), **_14B_21),
    WanVariant(name="i2v-14B-FC", model_type="i2v", in_dim=48, image_embedding=True, control=True,
               sample_steps=40, **_14B_21),
    WanVariant(name="i2v-1.3B-InP", model_type="i2v", in_dim=36, image_embedding=True, inpaint=True, **_13B),
    WanVariant(name="i2v-14B-InP", model_type="i2v", in_dim=36, image_embedding=True, inpaint=True, sample_steps=40,
               **_14B_21),
    WanVariant(name="i2v-A14B-InP", version="2.2", model_type="i2v", in_dim=36, inpaint=True, **_FUN22),
    WanVariant(name="t2v-A14B-FC", version="2.2", model_type="t2v", in_dim=52, control=True, **_FUN22),
    WanVariant(name="i2v-A14B-FC", version="2.2", model_type="i2v", in_dim=52, control=True, **_FUN22),
    # tiny Fun variants for the tests (width 48: the LoRAs of the other tiny variants do not fit them)
    WanVariant(name="t2v-tiny-fc", version="2.1", model_type="t2v", dim=48, ffn_dim=96, num_heads=3,
               num_layers=2, in_dim=48, out_dim=16, vae="2.1", image_embedding=True, control=True, text_dim=64,
               freq_dim=32, clip_dim=40, sample_steps=8, num_frames=9, resolution=(64, 64)),
    WanVariant(name="i2v-tiny-fc-2.2", version="2.2", model_type="i2v", dim=48, ffn_dim=96, num_heads=3,
               num_layers=2, in_dim=52, out_dim=16, vae="2.1", control=True, text_dim=64, freq_dim=32,
               two_experts=True, boundary=0.9, sample_steps=8, guidance=(6.0, 6.0), num_frames=9,
               resolution=(64, 64)),
):
    _register(_v)


class UnknownTaskError(UserError, ValueError):
    """A task name that names no variant; the message lists the valid ones."""


def get_variant(name: str) -> WanVariant:
    """Look a variant up by task name (case-insensitive); unknown names list the valid ones."""
    try:
        return VARIANTS[name.lower()]
    except KeyError:
        valid = ", ".join(sorted({v.name for v in VARIANTS.values()}))
        raise UnknownTaskError(f"unknown WAN task {name!r}; valid tasks: {valid}") from None


def variants_matching(signature: tuple) -> list[WanVariant]:
    """Every distinct variant whose shapes match (2.2 T2V-A14B and 2.1 T2V-14B share shapes)."""
    seen: list[WanVariant] = []
    for variant in VARIANTS.values():
        if variant.shape_signature() == signature and variant not in seen:
            seen.append(variant)
    return seen

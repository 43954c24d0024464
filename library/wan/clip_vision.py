"""The CLIP ViT-H/14 vision tower that WAN 2.1 I2V conditions on, loaded from a local file.

WAN 2.1 I2V feeds its DiT `clip_fea` [B, 257, 1280]: the hidden states of the open-clip XLM-RoBERTa-large
ViT-H/14 image tower after 31 of its 32 blocks (`use_31_block=True`: before the last block and before
`post_norm`). The image (in [-1, 1]) is resized to 224x224 bicubic (no antialias, no crop), mapped to
[0, 1] and normalised with the CLIP mean / std.

Three file layouts are read and mapped onto transformers' `CLIPVisionModel` names:
  official WAN  `models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth`: `visual.patch_embedding`,
                `visual.cls_embedding`, `visual.pos_embedding`, `visual.pre_norm`,
                `visual.transformer.N.{norm1, attn.to_qkv, attn.proj, norm2, mlp.0, mlp.2}`
  open_clip     `visual.conv1`, `visual.class_embedding`, `visual.positional_embedding`, `visual.ln_pre`,
                `visual.transformer.resblocks.N.{ln_1, attn.in_proj_*, attn.out_proj, ln_2, mlp.c_fc, mlp.c_proj}`
  HF / ComfyUI  `clip_vision_h.safetensors` or an HF folder: `vision_model.*`
The text tower, projection heads and the last block are never loaded. All ViT-H/14 towers use exact
GELU (the official WAN code builds it with `activation='gelu'`); an HF folder's config.json may say
otherwise and is then followed.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from .checkpoint_files import Checkpoint, CheckpointError, open_checkpoint
from .finite import check_finite
from .staged_load import staged_loader

logger = logging.getLogger(__name__)

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
# Attention heads by width (not visible in tensor shapes): ViT-H/14, ViT-L/14, ViT-B, and the tiny test
# tower of `library.wan.tiny`. An HF folder's config.json, or `num_heads`, overrides this table.
HEADS_BY_WIDTH = {1280: 16, 1024: 16, 768: 12, 40: 4}

# (pattern of a key without its prefix, replacement in transformers' CLIPVisionModel names)
_WAN_RULES = [
    (r"patch_embedding\.weight", "embeddings.patch_embedding.weight"),
    (r"cls_embedding", "embeddings.class_embedding"),
    (r"pos_embedding", "embeddings.position_embedding.weight"),
    (r"pre_norm\.(weight|bias)", r"pre_layrnorm.\1"),
    (r"post_norm\.(weight|bias)", r"post_layernorm.\1"),
    (r"transformer\.(\d+)\.norm1\.", r"encoder.layers.\1.layer_norm1."),
    (r"transformer\.(\d+)\.norm2\.", r"encoder.layers.\1.layer_norm2."),
    (r"transformer\.(\d+)\.attn\.to_qkv\.(weight|bias)", r"encoder.layers.\1.self_attn.{qkv}_proj.\2"),
    (r"transformer\.(\d+)\.attn\.proj\.", r"encoder.layers.\1.self_attn.out_proj."),
    (r"transformer\.(\d+)\.mlp\.0\.", r"encoder.layers.\1.mlp.fc1."),
    (r"transformer\.(\d+)\.mlp\.2\.", r"encoder.layers.\1.mlp.fc2."),
]
_OPEN_CLIP_RULES = [
    (r"conv1\.weight", "embeddings.patch_embedding.weight"),
    (r"class_embedding", "embeddings.class_embedding"),
    (r"positional_embedding", "embeddings.position_embedding.weight"),
    (r"ln_pre\.(weight|bias)", r"pre_layrnorm.\1"),
    (r"ln_post\.(weight|bias)", r"post_layernorm.\1"),
    (r"transformer\.resblocks\.(\d+)\.ln_1\.", r"encoder.layers.\1.layer_norm1."),
    (r"transformer\.resblocks\.(\d+)\.ln_2\.", r"encoder.layers.\1.layer_norm2."),
    (r"transformer\.resblocks\.(\d+)\.attn\.in_proj_(weight|bias)", r"encoder.layers.\1.self_attn.{qkv}_proj.\2"),
    (r"transformer\.resblocks\.(\d+)\.attn\.out_proj\.", r"encoder.layers.\1.self_attn.out_proj."),
    (r"transformer\.resblocks\.(\d+)\.mlp\.c_fc\.", r"encoder.layers.\1.mlp.fc1."),
    (r"transformer\.resblocks\.(\d+)\.mlp\.c_proj\.", r"encoder.layers.\1.mlp.fc2."),
]
# layout name, marker key (prefix captured), rules or None for names that are already transformers'
_LAYOUTS = [
    ("official WAN", re.compile(r"^(.*?visual\.)transformer\.0\.attn\.to_qkv\.weight$"), _WAN_RULES),
    ("open_clip", re.compile(r"^(.*?visual\.)transformer\.resblocks\.0\.attn\.in_proj_weight$"), _OPEN_CLIP_RULES),
    ("transformers", re.compile(r"^(.*?vision_model\.)encoder\.layers\.0\.self_attn\.q_proj\.weight$"), None),
    ("transformers", re.compile(r"^()encoder\.layers\.0\.self_attn\.q_proj\.weight$"), None),  # bare CLIPVisionModel
]


@dataclass(frozen=True)
class Source:
    """Where one transformers tensor comes from: a file key, and for fused q/k/v which third of it."""

    key: str
    part: int | None = None  # 0, 1, 2: q, k, v rows of a fused in-projection


def clip_key_map(keys: list[str]) -> tuple[str, dict[str, Source]]:
    """(layout name, {transformers CLIPVisionModel name: Source}) for the vision tower in `keys`; other
    towers (text, projections) are left out. Raises CheckpointError when no vision tower is found."""
    for layout, marker, rules in _LAYOUTS:
        prefix = next((m.group(1) for k in keys if (m := marker.match(k))), None)
        if prefix is None:
            continue
        compiled = [(re.compile(f"^{pattern}"), repl) for pattern, repl in rules or []]
        names: dict[str, Source] = {}
        for key in keys:
            if not key.startswith(prefix):
                continue
            inner = key[len(prefix):]
            if rules is None:
                if not inner.endswith("position_ids"):
                    names[inner] = Source(key)
                continue
            for pattern, repl in compiled:
                if pattern.match(inner):
                    name = pattern.sub(repl, inner, count=1)
                    if "{qkv}" in name:
                        names.update({name.format(qkv=p): Source(key, i) for i, p in enumerate("qkv")})
                    else:
                        names[name] = Source(key)
                    break
        return layout, names
    raise CheckpointError("no CLIP vision tower found (expected official WAN `visual.transformer.N.attn.to_qkv`, "
                          "open_clip `visual.transformer.resblocks.N`, or transformers `vision_model.` keys)")


def _shape(ckpt: Checkpoint, source: Source) -> tuple[int, ...]:
    shape = ckpt.shape(source.key)
    return (shape[0] // 3, *shape[1:]) if source.part is not None else shape


def _read_config_json(ckpt: Checkpoint) -> dict:
    path = Path(ckpt.source)
    cfg_path = (path if path.is_dir() else path.parent) / "config.json"
    if not cfg_path.is_file():
        return {}
    try:
        cfg = json.loads(cfg_path.read_text())
    except json.JSONDecodeError:
        return {}
    cfg = cfg.get("vision_config", cfg)
    return cfg if "hidden_size" in cfg or "num_attention_heads" in cfg else {}


def infer_clip_config(ckpt: Checkpoint, names: dict[str, Source], num_heads: int | None = None):
    """The full tower's `CLIPVisionConfig` from tensor shapes (heads and activation from config.json, the
    width table, or `num_heads`)."""
    from transformers import CLIPVisionConfig

    try:
        hidden, _, patch, _ = _shape(ckpt, names["embeddings.patch_embedding.weight"])
        positions = _shape(ckpt, names["embeddings.position_embedding.weight"])[-2]
        intermediate = _shape(ckpt, names["encoder.layers.0.mlp.fc1.weight"])[0]
    except KeyError as exc:
        raise CheckpointError(f"{ckpt.source}: CLIP vision key {exc} is missing; the file is incomplete") from None
    layers = len({int(m.group(1)) for k in names if (m := re.match(r"^encoder\.layers\.(\d+)\.", k))})
    grid = round((positions - 1) ** 0.5)
    if grid * grid != positions - 1:
        raise CheckpointError(f"{ckpt.source}: {positions} position embeddings is not a square grid plus a class token")
    cfg_json = _read_config_json(ckpt)
    heads = num_heads or cfg_json.get("num_attention_heads") or HEADS_BY_WIDTH.get(hidden)
    if not heads:
        raise CheckpointError(
            f"{ckpt.source}: cannot tell the attention head count of a CLIP vision tower of width {hidden}; "
            "put the model's config.json (num_attention_heads) beside it")
    config = CLIPVisionConfig(
        hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers, num_attention_heads=int(heads),
        image_size=grid * patch, patch_size=patch, hidden_act=cfg_json.get("hidden_act", "gelu"),
        layer_norm_eps=cfg_json.get("layer_norm_eps", 1e-5))
    config._attn_implementation = "sdpa"
    return config


class WanClipVision(torch.nn.Module):
    """CLIP vision tower truncated after its penultimate block: `encode(images)` -> [B, tokens, width]."""

    def __init__(self, config, blocks: int):
        from transformers import CLIPVisionModel

        super().__init__()
        self.blocks = blocks  # blocks of the full tower; the model here holds blocks - 1 of them
        self.model = CLIPVisionModel(config)
        self.register_buffer("mean", torch.tensor(CLIP_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(CLIP_STD).view(1, 3, 1, 1), persistent=False)

    @property
    def image_size(self) -> int:
        return self.model.config.image_size

    @property
    def width(self) -> int:
        return self.model.config.hidden_size

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """[B, 3, H, W] in [-1, 1] -> normalised [B, 3, S, S] float32, as WAN's `CLIPModel.visual` does."""
        size = (self.image_size, self.image_size)
        x = F.interpolate(images.float(), size=size, mode="bicubic", align_corners=False)
        return (x.mul(0.5).add(0.5) - self.mean.to(x.device)) / self.std.to(x.device)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Normalised pixels [B, 3, S, S] -> hidden states after blocks - 1 blocks [B, 1 + (S/p)^2, width]."""
        dtype = self.model.embeddings.patch_embedding.weight.dtype
        return self.model(pixel_values=pixel_values.to(dtype)).last_hidden_state  # no post_layernorm

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """images [B, 3, H, W] in [-1, 1] (any size) -> clip_fea [B, 257, width] float32."""
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"CLIP images must be [B, 3, H, W], got {list(images.shape)}")
        device = self.model.embeddings.patch_embedding.weight.device
        return self(self.preprocess(images.to(device))).float()


def load_clip_vision(path: str | os.PathLike, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float16,
                     num_heads: int | None = None) -> WanClipVision:
    """Load the WAN 2.1 I2V image encoder from the official `.pth`, an open_clip file, ComfyUI's
    `clip_vision_h.safetensors` or an HF folder. Returns a frozen `WanClipVision` in eval mode."""
    ckpt = open_checkpoint(Path(path).expanduser())
    try:
        layout, names = clip_key_map(ckpt.keys())
    except CheckpointError as exc:
        from .dit_formats import describe_checkpoint

        what = describe_checkpoint(ckpt.keys())
        detail = f" ({exc})" if what in ("a CLIP model", "an unknown model") else ""
        raise CheckpointError(
            f"{ckpt.source}: this is {what}, not a CLIP vision model{detail}; pass the CLIP vision file "
            "(models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth or clip_vision_h.safetensors) as `clip`"
        ) from None
    config = infer_clip_config(ckpt, names, num_heads)
    blocks = config.num_hidden_layers
    if blocks < 2:
        raise CheckpointError(f"{ckpt.source}: a CLIP tower with {blocks} block(s) has no penultimate block")
    config.num_hidden_layers = blocks - 1  # WAN's use_31_block: the last block is never run
    with torch.device("meta"):
        model = WanClipVision(config, blocks)
    state = _read_state(ckpt, names, model.model.state_dict(), torch.device(device), dtype)
    model.model.load_state_dict(state, strict=True, assign=True)
    embeddings = model.model.embeddings
    embeddings.position_ids = torch.arange(embeddings.num_positions, device=device).expand(1, -1)
    model.mean, model.std = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1), torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    logger.info("loaded CLIP vision (%s names, width %d, %d of %d blocks) from %s", layout, config.hidden_size,
                blocks - 1, blocks, ckpt.source)
    return model.to(device).requires_grad_(False).eval()


def _read_state(ckpt: Checkpoint, names: dict[str, Source], expected: dict, device, dtype) -> dict:
    """Every tensor the truncated model holds, cast and reshaped, with clear errors for what is missing."""
    missing = [k for k in expected if k not in names and not k.endswith("position_ids")]
    if missing:
        raise CheckpointError(f"{ckpt.source}: CLIP vision tower is incomplete: {len(missing)} tensors missing "
                              f"(e.g. {', '.join(missing[:3])})")
    state = {}
    sizes = (ref.numel() * dtype.itemsize for ref in expected.values())
    screen = functools.partial(check_finite, ckpt)  # (key, tensor): NaN / infinity refused naming both
    with staged_loader(device, screen, sizes) as stager:  # onto a GPU: page-locked staging, screened at the end
        for name, ref in expected.items():
            if name.endswith("position_ids"):
                continue
            source = names[name]
            tensor = ckpt.read(source.key)
            if source.part is not None:
                tensor = tensor.chunk(3, dim=0)[source.part]
            if tensor.numel() != ref.numel():
                raise CheckpointError(f"{ckpt.file_of(source.key)}: tensor {source.key!r} has shape "
                                      f"{list(ckpt.shape(source.key))}, which does not fit {name} {list(ref.shape)}")
            tensor = tensor.reshape(ref.shape)
            if stager is None:
                state[name] = tensor.to(device=device, dtype=dtype)
                check_finite(ckpt, source.key, state[name])
            else:
                state[name] = stager.load(source.key, tensor, dtype)
    return state

"""The WAN 2.1 I2V CLIP vision tower: parity with transformers' CLIPVisionModel and with a hand-written
open_clip / WAN forward pass, the three file layouts, WAN's preprocessing, and clear errors.

One set of random weights is written in all three namings (official WAN `.pth`, open_clip `.pth`, and
transformers / ComfyUI `vision_model.*` safetensors) by converters written here, independently of the
loader's own mapping tables.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from library.wan.checkpoint_files import CheckpointError
from library.wan.dit_formats import describe_checkpoint
from library.wan.loading import load_clip_vision, load_dit, load_text_encoder, load_vae

HIDDEN, LAYERS, HEADS, MLP, PATCH, IMAGE = 40, 3, 4, 160, 14, 224
TOL = 1e-5  # max |ours - reference| / max |reference|
MEAN = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(1, 3, 1, 1)
STD = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(1, 3, 1, 1)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


@pytest.fixture(scope="module")
def twin():
    """A random transformers CLIPVisionModel (exact GELU, as ViT-H/14) with non-trivial norms."""
    from transformers import CLIPVisionConfig, CLIPVisionModel

    torch.manual_seed(0)
    config = CLIPVisionConfig(hidden_size=HIDDEN, intermediate_size=MLP, num_hidden_layers=LAYERS,
                              num_attention_heads=HEADS, image_size=IMAGE, patch_size=PATCH, hidden_act="gelu",
                              layer_norm_eps=1e-5)
    model = CLIPVisionModel(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_((1.0 if name.endswith("weight") else 0.0) + 0.1 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.normal_(0, 0.05)
            elif "embedding" in name:
                p.normal_(0, 0.5)
    return model


def _hf_state(model) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items() if "position_ids" not in k}


def to_wan(hf: dict) -> dict[str, torch.Tensor]:
    """transformers names -> the official WAN `visual.*` names (fused q/k/v, [1, 1, D] class token)."""
    sd = {"visual.patch_embedding.weight": hf["embeddings.patch_embedding.weight"],
          "visual.cls_embedding": hf["embeddings.class_embedding"].view(1, 1, -1),
          "visual.pos_embedding": hf["embeddings.position_embedding.weight"][None],
          "visual.head": torch.randn(HIDDEN, 24), "textual.token_embedding.weight": torch.randn(10, 8),
          "log_scale": torch.tensor(4.6)}
    for side in ("weight", "bias"):
        sd[f"visual.pre_norm.{side}"] = hf[f"pre_layrnorm.{side}"]
        sd[f"visual.post_norm.{side}"] = hf[f"post_layernorm.{side}"]
    for i in range(LAYERS):
        src, dst = f"encoder.layers.{i}.", f"visual.transformer.{i}."
        for side in ("weight", "bias"):
            sd[dst + f"attn.to_qkv.{side}"] = torch.cat([hf[src + f"self_attn.{p}_proj.{side}"] for p in "qkv"])
            for a, b in (("layer_norm1", "norm1"), ("layer_norm2", "norm2"), ("self_attn.out_proj", "attn.proj"),
                         ("mlp.fc1", "mlp.0"), ("mlp.fc2", "mlp.2")):
                sd[dst + f"{b}.{side}"] = hf[src + f"{a}.{side}"]
    return sd


def to_open_clip(wan: dict) -> dict[str, torch.Tensor]:
    """official WAN names -> open_clip names, with an open_clip text tower at the top level (no prefix)."""
    renames = {"patch_embedding.weight": "conv1.weight", "cls_embedding": "class_embedding",
               "pos_embedding": "positional_embedding", "pre_norm": "ln_pre", "post_norm": "ln_post", "head": "proj",
               "norm1": "ln_1", "norm2": "ln_2", "attn.to_qkv.weight": "attn.in_proj_weight",
               "attn.to_qkv.bias": "attn.in_proj_bias", "attn.proj": "attn.out_proj", "mlp.0": "mlp.c_fc",
               "mlp.2": "mlp.c_proj"}
    sd = {"transformer.resblocks.0.attn.in_proj_weight": torch.randn(24, 8), "text_projection": torch.randn(8, 8)}
    for key, value in wan.items():
        if not key.startswith("visual."):
            continue
        name = key.removeprefix("visual.").replace("transformer.", "transformer.resblocks.")
        for a, b in renames.items():
            name = name.replace(a, b)
        if name == "class_embedding":
            value = value.view(-1)
        elif name == "positional_embedding":
            value = value[0]
        sd["visual." + name] = value
    return sd


def reference_forward(wan: dict, pixels: torch.Tensor, blocks: int) -> torch.Tensor:
    """The open_clip / WAN pre-LN ViT in float64, written out: class token + positions, ln_pre, then blocks
    of x + attn(ln_1(x)) and x + mlp(ln_2(x)) with exact (erf) GELU; output before ln_post."""
    sd = {k: v.double() for k, v in wan.items()}
    x = pixels.double()
    w = sd["visual.patch_embedding.weight"]
    x = F.conv2d(x, w, stride=w.shape[-1]).flatten(2).transpose(1, 2)  # [B, 256, D]
    b, _, d = x.shape
    x = torch.cat([sd["visual.cls_embedding"].expand(b, -1, -1), x], dim=1) + sd["visual.pos_embedding"]
    ln = lambda t, name: F.layer_norm(t, (d,), sd[name + ".weight"], sd[name + ".bias"], 1e-5)  # noqa: E731
    x = ln(x, "visual.pre_norm")
    head_dim = d // HEADS
    for i in range(blocks):
        p = f"visual.transformer.{i}."
        qkv = F.linear(ln(x, p + "norm1"), sd[p + "attn.to_qkv.weight"], sd[p + "attn.to_qkv.bias"])
        q, k, v = qkv.view(b, -1, 3, HEADS, head_dim).unbind(2)  # each [B, L, H, hd]
        scores = torch.einsum("blhd,bmhd->bhlm", q, k) / math.sqrt(head_dim)
        attn = torch.einsum("bhlm,bmhd->blhd", scores.softmax(-1), v).reshape(b, -1, d)
        x = x + F.linear(attn, sd[p + "attn.proj.weight"], sd[p + "attn.proj.bias"])
        h = F.linear(ln(x, p + "norm2"), sd[p + "mlp.0.weight"], sd[p + "mlp.0.bias"])
        h = 0.5 * h * (1.0 + torch.erf(h / math.sqrt(2.0)))
        x = x + F.linear(h, sd[p + "mlp.2.weight"], sd[p + "mlp.2.bias"])
    return x


@pytest.fixture(scope="module")
def files(twin, tmp_path_factory):
    """The same weights as an official WAN .pth, an open_clip .pth, a ComfyUI-style safetensors and an HF folder."""
    from safetensors.torch import save_file

    root = tmp_path_factory.mktemp("clip")
    hf = _hf_state(twin)
    wan = to_wan(hf)
    torch.save(wan, root / "models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth")
    torch.save(to_open_clip(wan), root / "open_clip_vit_h.pth")
    comfy = {f"vision_model.{k}": v.contiguous() for k, v in hf.items()}
    comfy["visual_projection.weight"] = torch.randn(24, HIDDEN)
    save_file(comfy, str(root / "clip_vision_h.safetensors"))
    twin.save_pretrained(str(root / "hf_folder"))
    return {"wan": root / "models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth",
            "open_clip": root / "open_clip_vit_h.pth", "comfy": root / "clip_vision_h.safetensors",
            "hf": root / "hf_folder", "state": wan}


@pytest.fixture(scope="module")
def pixels():
    return torch.randn(2, 3, IMAGE, IMAGE, generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def expected(files, twin, pixels):
    """transformers' hidden_states[-2] (after LAYERS - 1 blocks), the float64 reference after LAYERS - 1
    blocks, and after all blocks (what WAN does not use)."""
    with torch.no_grad():
        hf = twin(pixel_values=pixels, output_hidden_states=True).hidden_states[-2]
    return hf, reference_forward(files["state"], pixels, LAYERS - 1), reference_forward(files["state"], pixels, LAYERS)


@pytest.mark.parametrize("layout", ["wan", "open_clip", "comfy", "hf"])
def test_penultimate_block_matches_transformers_and_reference(files, expected, pixels, layout):
    ours = load_clip_vision(files[layout], dtype=torch.float32)
    assert ours.blocks == LAYERS and len(ours.model.encoder.layers) == LAYERS - 1  # the last block is never run
    hf, reference, last = expected
    with torch.no_grad():
        got = ours(pixels)
    assert got.shape == (2, 257, HIDDEN)
    err_hf, err_ref = _rel(got, hf), _rel(got, reference)
    print(f"clip {layout}: rel max error vs transformers {err_hf:.2e}, vs hand-written float64 {err_ref:.2e}")
    assert err_hf <= TOL and err_ref <= TOL
    assert _rel(got, last) > 1e-2  # the final block's output differs: the test can tell the two apart


def test_encode_preprocesses_like_wan(files, twin):
    """[-1, 1] input of any size: bicubic to 224 (align_corners=False, no antialias), to [0, 1], CLIP mean/std."""
    ours = load_clip_vision(files["wan"], dtype=torch.float32)
    images = torch.rand(2, 3, 40, 56, generator=torch.Generator().manual_seed(2)) * 2 - 1
    expected_pixels = (F.interpolate(images, size=(IMAGE, IMAGE), mode="bicubic", align_corners=False) * 0.5 + 0.5
                       - MEAN) / STD
    with torch.no_grad():
        expected = twin(pixel_values=expected_pixels, output_hidden_states=True).hidden_states[-2]
    got = ours.encode(images)
    assert got.dtype == torch.float32 and got.shape == (2, 257, HIDDEN)
    assert _rel(got, expected) <= TOL
    with pytest.raises(ValueError, match=r"CLIP images must be \[B, 3, H, W\]"):
        ours.encode(images[:, :, None])


def test_half_precision_load_is_close(files, pixels):
    full = load_clip_vision(files["wan"], dtype=torch.float32)
    half = load_clip_vision(files["wan"], dtype=torch.bfloat16)
    assert half.model.encoder.layers[0].mlp.fc1.weight.dtype == torch.bfloat16
    with torch.no_grad():
        assert _rel(half(pixels).float(), full(pixels)) < 5e-2


def test_every_layout_is_named_a_clip_model_and_refused_elsewhere(files):
    from library.wan.checkpoint_files import open_checkpoint

    for layout in ("wan", "open_clip", "comfy", "hf"):
        assert describe_checkpoint(open_checkpoint(files[layout]).keys()) == "a CLIP model", layout
    path = files["wan"]
    with pytest.raises(CheckpointError, match=r"vit-huge-14.pth: this is a CLIP model, not a WAN DiT"):
        load_dit(path)
    with pytest.raises(CheckpointError, match=r"this is a CLIP model, not a WAN VAE"):
        load_vae(path)
    with pytest.raises(CheckpointError, match=r"this is a CLIP model, not a umT5 text encoder"):
        load_text_encoder(path, tokenizer_path=path.parent)


def test_bad_clip_files_are_clear_errors(files, tmp_path):
    from library.wan.tiny import tiny_clip_state_dict, tiny_dit_state_dict

    dit = tmp_path / "dit.pth"
    torch.save(tiny_dit_state_dict("t2v-tiny"), dit)
    with pytest.raises(CheckpointError, match=r"dit.pth: this is a WAN DiT, not a CLIP vision model; pass the CLIP"):
        load_clip_vision(dit)
    odd = tmp_path / "odd_width.pth"
    torch.save(tiny_clip_state_dict(hidden=36, layers=2), odd)
    with pytest.raises(CheckpointError, match=r"odd_width.pth: cannot tell the attention head count of a CLIP "
                                              r"vision tower of width 36; put the model's config.json"):
        load_clip_vision(odd)
    assert load_clip_vision(odd, num_heads=3, dtype=torch.float32).model.config.num_attention_heads == 3
    broken = tmp_path / "broken.pth"
    state = dict(files["state"])
    del state["visual.transformer.1.mlp.0.weight"]
    torch.save(state, broken)
    with pytest.raises(CheckpointError, match=r"broken.pth: CLIP vision tower is incomplete: 1 tensors missing "
                                              r"\(e.g. encoder.layers.1.mlp.fc1.weight\)"):
        load_clip_vision(broken)


def test_tiny_model_set_has_a_clip_matching_the_variant(tmp_path):
    from library.wan.tiny import write_tiny_model_set
    from library.wan.variants import get_variant

    models = write_tiny_model_set(tmp_path, "i2v-tiny-2.1")
    variant = get_variant("i2v-tiny-2.1")
    clip = load_clip_vision(models.clip, dtype=torch.float32)
    fea = clip.encode(torch.zeros(1, 3, 32, 32))
    assert fea.shape == (1, variant.clip_tokens, variant.clip_dim)
    assert write_tiny_model_set(tmp_path / "t2v", "t2v-tiny").clip is None


class _ShapesOnly:
    """A checkpoint stand-in that knows shapes only (the real 632M-parameter tower is too big for a test)."""

    def __init__(self, shapes: dict, source):
        self.shapes, self.source = shapes, source

    def keys(self):
        return list(self.shapes)

    def shape(self, key):
        return self.shapes[key]


def test_real_vit_h_config_is_inferred_from_the_official_shapes(tmp_path):
    """The official WAN file: width 1280, 32 blocks, 16 heads (head dim 80), MLP 5120, patch 14, 224 px."""
    from library.wan.clip_vision import clip_key_map, infer_clip_config

    d = 1280
    shapes = {"visual.patch_embedding.weight": (d, 3, 14, 14), "visual.cls_embedding": (1, 1, d),
              "visual.pos_embedding": (1, 257, d), "visual.pre_norm.weight": (d,), "visual.head": (d, 1024),
              "textual.token_embedding.weight": (250002, 1024), "log_scale": ()}
    for i in range(32):
        shapes |= {f"visual.transformer.{i}.attn.to_qkv.weight": (3 * d, d),
                   f"visual.transformer.{i}.mlp.0.weight": (5120, d)}
    ckpt = _ShapesOnly(shapes, tmp_path / "models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth")
    layout, names = clip_key_map(ckpt.keys())
    config = infer_clip_config(ckpt, names)
    assert layout == "official WAN" and not any(n.startswith("text") for n in names)
    assert (config.hidden_size, config.num_hidden_layers, config.num_attention_heads, config.intermediate_size,
            config.patch_size, config.image_size, config.hidden_act) == (1280, 32, 16, 5120, 14, 224, "gelu")
    assert describe_checkpoint(ckpt.keys()) == "a CLIP model"

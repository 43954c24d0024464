"""Tests for library/wan/text_encoder.py: umT5 formats, config inference, tokenizer loading, encoding.

A tiny umT5 (2 layers, d_model 32, 4 heads, d_ff 64) with random weights in the official naming, and
the tiny sentencepiece tokenizer from conftest. The key mapping is checked against an independent
re-statement of the official T5 encoder maths written here, not only against a strict load.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoTokenizer, UMT5EncoderModel

from tests.helpers import reference_file

from library.wan.checkpoint_files import CheckpointError
from library.wan.text_encoder import (
    WanTextEncoder,
    build_text_encoder,
    clean_prompt,
    detect_t5_format,
    load_tokenizer,
    t5_state_dict_from_official,
    umt5_config_from_state_dict,
)

VOCAB, DIM, HEADS, FFN, LAYERS, BUCKETS = 160, 32, 4, 64, 2, 32
PROMPTS = [
    "a red cat runs over the field at sunset",
    "camera pans slowly",
    "  the woman walks\n\n in the rain,   close shot of a golden river with a blue boat and a dark forest  ",
]

# The facts table (wan_facts.md section 5), restated independently of the module under test.
BLOCK_NAMES = {
    "norm1": "layer.0.layer_norm",
    "attn.q": "layer.0.SelfAttention.q",
    "attn.k": "layer.0.SelfAttention.k",
    "attn.v": "layer.0.SelfAttention.v",
    "attn.o": "layer.0.SelfAttention.o",
    "pos_embedding.embedding": "layer.0.SelfAttention.relative_attention_bias",
    "norm2": "layer.1.layer_norm",
    "ffn.gate.0": "layer.1.DenseReluDense.wi_0",
    "ffn.fc1": "layer.1.DenseReluDense.wi_1",
    "ffn.fc2": "layer.1.DenseReluDense.wo",
}


def official_state_dict(seed: int = 0) -> dict[str, torch.Tensor]:
    """Random weights with the official umT5 names and (tiny) shapes of keys/wan_keys_t5.txt."""
    g = torch.Generator().manual_seed(seed)
    shapes = {"token_embedding.weight": (VOCAB, DIM), "norm.weight": (DIM,)}
    for i in range(LAYERS):
        shapes |= {
            f"blocks.{i}.norm1.weight": (DIM,),
            **{f"blocks.{i}.attn.{p}.weight": (DIM, DIM) for p in "qkvo"},
            f"blocks.{i}.norm2.weight": (DIM,),
            f"blocks.{i}.ffn.gate.0.weight": (FFN, DIM),
            f"blocks.{i}.ffn.fc1.weight": (FFN, DIM),
            f"blocks.{i}.ffn.fc2.weight": (DIM, FFN),
            f"blocks.{i}.pos_embedding.embedding.weight": (BUCKETS, HEADS),
        }
    sd = {}
    for key, shape in shapes.items():
        scale = 1.0 if len(shape) == 1 or "embedding" in key else shape[-1] ** -0.5
        sd[key] = torch.randn(shape, generator=g) * scale
        if "norm" in key:
            sd[key] = 1.0 + 0.1 * sd[key]
    return sd


def hf_name(official: str) -> str:
    if official == "norm.weight":
        return "encoder.final_layer_norm.weight"
    _, i, rest = official.split(".", 2)
    return f"encoder.block.{i}.{BLOCK_NAMES[rest.removesuffix('.weight')]}.weight"


# ---------------------------------------------------------------------------------------------------
# An independent statement of the official encoder maths (wan_facts.md section 5)
# ---------------------------------------------------------------------------------------------------


def _bucket(rel_pos: torch.Tensor, num_buckets: int = BUCKETS, max_dist: int = 128) -> torch.Tensor:
    num_buckets //= 2  # bidirectional: half the buckets for keys after the query
    buckets = (rel_pos > 0).long() * num_buckets
    rel_pos = rel_pos.abs()
    max_exact = num_buckets // 2
    large = max_exact + (
        torch.log(rel_pos.float() / max_exact) / math.log(max_dist / max_exact) * (num_buckets - max_exact)
    ).long()
    large = large.clamp(max=num_buckets - 1)
    return buckets + torch.where(rel_pos < max_exact, rel_pos, large)


def _rms(x, w, eps=1e-6):
    return w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


def reference_encode(sd: dict, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Official umT5 encoder forward in fp32: ids/mask [B, L] -> [B, L, C]."""
    b, length = ids.shape
    x = sd["token_embedding.weight"][ids]  # [B, L, C]
    pos = torch.arange(length)
    rel = _bucket(pos[None, :] - pos[:, None])  # [Lq, Lk]: key position minus query position
    for i in range(LAYERS):
        p = f"blocks.{i}."
        h = _rms(x, sd[p + "norm1.weight"])
        q, k, v = (F.linear(h, sd[p + f"attn.{n}.weight"]).view(b, length, HEADS, -1) for n in "qkv")
        bias = sd[p + "pos_embedding.embedding.weight"][rel].permute(2, 0, 1)[None]  # [1, N, Lq, Lk]
        logits = torch.einsum("binc,bjnc->bnij", q, k) + bias  # no 1/sqrt(d) scaling
        logits = logits.masked_fill(mask[:, None, None, :] == 0, torch.finfo(x.dtype).min)
        attn = torch.einsum("bnij,bjnc->binc", logits.softmax(-1), v).reshape(b, length, -1)
        x = x + F.linear(attn, sd[p + "attn.o.weight"])
        h = _rms(x, sd[p + "norm2.weight"])
        gate = F.gelu(F.linear(h, sd[p + "ffn.gate.0.weight"]), approximate="tanh")
        x = x + F.linear(F.linear(h, sd[p + "ffn.fc1.weight"]) * gate, sd[p + "ffn.fc2.weight"])
    return _rms(x, sd["norm.weight"])


# ---------------------------------------------------------------------------------------------------
# Fixtures
# ---------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def official_sd():
    return official_state_dict()


@pytest.fixture(scope="module")
def encoder(official_sd, tiny_umt5_tokenizer_dir):
    return build_text_encoder(official_sd, tiny_umt5_tokenizer_dir, dtype=torch.float32)


# ---------------------------------------------------------------------------------------------------
# Prompt cleaning
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "clean"),
    [
        ("The Mona Lisa doesnÃ¢â‚¬â„¢t have eyebrows.", "The Mona Lisa doesn't have eyebrows."),
        ("schÃ¶n", "schön"),
        ("Tom &amp;amp; Jerry", "Tom & Jerry"),  # double-escaped HTML
        ("&lt;b&gt;bold&lt;/b&gt;", "<b>bold</b>"),
        ("  a cat\n\n runs\t\tfast \r\n", "a cat runs fast"),  # runs of whitespace and newlines
        ("", ""),
    ],
)
def test_clean_prompt(raw, clean):
    assert clean_prompt(raw) == clean


# ---------------------------------------------------------------------------------------------------
# Formats and config
# ---------------------------------------------------------------------------------------------------


def test_official_to_hf_loads_strictly_and_round_trips(official_sd):
    sd_hf = t5_state_dict_from_official(official_sd)
    assert sd_hf["shared.weight"] is official_sd["token_embedding.weight"]
    assert sd_hf["encoder.embed_tokens.weight"] is official_sd["token_embedding.weight"]

    model = UMT5EncoderModel(umt5_config_from_state_dict(sd_hf))
    result = model.load_state_dict(sd_hf, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    loaded = model.state_dict()
    assert set(loaded) == set(sd_hf)
    for key, tensor in official_sd.items():
        embedding = key == "token_embedding.weight"
        names = ["shared.weight", "encoder.embed_tokens.weight"] if embedding else [hf_name(key)]
        for name in names:
            torch.testing.assert_close(loaded[name], tensor, rtol=0, atol=0, msg=f"{key} -> {name}")


def test_real_umt5_xxl_keys_map_onto_transformers(official_sd):
    """The 242 official keys of models_t5_umt5-xxl-enc-bf16.pth (meta tensors) -> the XXL config."""
    lines = reference_file("keys", "wan_keys_t5.txt").read_text().splitlines()
    nkeys, nparams = (int(v) for v in lines[1].split())
    listed = {}
    for line in lines[2:]:
        key, shape = line.split(" ", 1)
        listed[key] = tuple(int(d) for d in shape.strip("[]").split(","))
    layers = 24  # the dump shows block 0 only
    official = {k: torch.empty(v, device="meta") for k, v in listed.items() if not k.startswith("blocks.")}
    for i in range(layers):
        official |= {k.replace("blocks.0.", f"blocks.{i}."): torch.empty(v, device="meta")
                     for k, v in listed.items() if k.startswith("blocks.0.")}
    assert len(official) == nkeys and sum(t.numel() for t in official.values()) == nparams

    sd_hf = t5_state_dict_from_official(official)
    config = umt5_config_from_state_dict(sd_hf)
    assert (config.vocab_size, config.d_model, config.num_layers) == (256384, 4096, 24)
    assert (config.num_heads, config.d_kv, config.d_ff) == (64, 64, 10240)
    with torch.device("meta"):
        model = UMT5EncoderModel(config)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert expected == {k: tuple(v.shape) for k, v in sd_hf.items()}


def test_config_inferred_from_shapes(official_sd):
    config = umt5_config_from_state_dict(t5_state_dict_from_official(official_sd))
    assert (config.vocab_size, config.d_model, config.num_layers) == (VOCAB, DIM, LAYERS)
    assert (config.num_heads, config.d_kv, config.d_ff) == (HEADS, DIM // HEADS, FFN)
    assert config.relative_attention_num_buckets == 32 and config.relative_attention_max_distance == 128
    assert config.is_gated_act and config.dense_act_fn == "gelu_new"
    assert config.layer_norm_epsilon == 1e-6


def test_detect_t5_format(official_sd):
    sd_hf = t5_state_dict_from_official(official_sd)
    assert detect_t5_format(official_sd) == "official"
    assert detect_t5_format(sd_hf) == "hf"
    assert detect_t5_format(k for k in sd_hf if k != "shared.weight") == "hf"  # ComfyUI-style
    with pytest.raises(ValueError, match="not a umT5 encoder checkpoint"):
        detect_t5_format(["blocks.0.self_attn.q.weight", "blocks.0.ffn.0.weight", "patch_embedding.weight"])


# ---------------------------------------------------------------------------------------------------
# Building and encoding
# ---------------------------------------------------------------------------------------------------


def test_encode_matches_official_maths(encoder, official_sd):
    tokens = encoder.tokenizer([clean_prompt(p) for p in PROMPTS], padding="max_length", max_length=512,
                               truncation=True, return_tensors="pt")
    expected = reference_encode(official_sd, tokens.input_ids, tokens.attention_mask)
    for out, ref, n in zip(encoder.encode(PROMPTS), expected, tokens.attention_mask.sum(1)):
        torch.testing.assert_close(out, ref[:n], rtol=1e-4, atol=1e-4)


def test_official_and_hf_names_give_identical_outputs(official_sd, encoder, tiny_umt5_tokenizer_dir):
    sd_hf = {k: v.clone() for k, v in t5_state_dict_from_official(official_sd).items()}
    from_hf = build_text_encoder(sd_hf, tiny_umt5_tokenizer_dir, dtype=torch.float32)
    for a, b in zip(from_hf.encode(PROMPTS), encoder.encode(PROMPTS)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)

    comfy = {k: v for k, v in sd_hf.items() if k != "shared.weight"}  # only encoder.embed_tokens
    comfy["spiece_model"] = torch.zeros(7, dtype=torch.uint8)  # non-weight extra, ignored
    comfy["decoder.final_layer_norm.weight"] = torch.ones(DIM)  # from a full encoder-decoder file, ignored
    bundled = {f"text_encoders.umt5xxl.transformer.{k}": v for k, v in sd_hf.items()}
    expected = encoder.model.state_dict()
    for variant in (comfy, bundled):  # same weights in the same places -> same outputs
        loaded = build_text_encoder(variant, tiny_umt5_tokenizer_dir, dtype=torch.float32).model.state_dict()
        assert loaded.keys() == expected.keys()
        for key in expected:
            torch.testing.assert_close(loaded[key], expected[key], rtol=0, atol=0, msg=key)


def test_scaled_fp8_weights_are_dequantised(official_sd, tiny_umt5_tokenizer_dir):
    sd_hf = t5_state_dict_from_official(official_sd)
    key = "encoder.block.0.layer.1.DenseReluDense.wi_1.weight"
    scale = sd_hf[key].abs().max() / 448.0
    stored = (sd_hf[key] / scale).to(torch.float8_e4m3fn)
    fp8 = dict(sd_hf, **{key: stored, key.replace(".weight", ".scale_weight"): scale.reshape(1),
                         "scaled_fp8": torch.empty(0, dtype=torch.float8_e4m3fn)})
    model = build_text_encoder(fp8, tiny_umt5_tokenizer_dir, dtype=torch.float32).model
    loaded = model.state_dict()[key]
    torch.testing.assert_close(loaded, stored.float() * scale, rtol=0, atol=0)
    torch.testing.assert_close(loaded, sd_hf[key], rtol=0.07, atol=1e-3)  # fp8 rounding only


def test_encode_lengths_trim_and_batch_independence(encoder):
    outputs = encoder.encode(PROMPTS)
    tokens = encoder.tokenizer([clean_prompt(p) for p in PROMPTS], padding="max_length", max_length=512,
                               truncation=True, return_tensors="pt")
    for prompt, out in zip(PROMPTS, outputs):
        ids = encoder.tokenizer(clean_prompt(prompt)).input_ids
        assert ids[-1] == encoder.tokenizer.eos_token_id == 1
        assert out.shape == (len(ids), DIM)  # true length: tokens + EOS
    assert len({o.shape[0] for o in outputs}) == len(PROMPTS)  # the prompts really differ in length

    full = encoder.model(input_ids=tokens.input_ids, attention_mask=tokens.attention_mask).last_hidden_state
    for out, rows in zip(outputs, full):
        torch.testing.assert_close(out, rows[: out.shape[0]], rtol=0, atol=0)

    for prompt, batched in zip(PROMPTS, outputs):
        (alone,) = encoder.encode([prompt])
        torch.testing.assert_close(alone, batched, rtol=1e-5, atol=1e-5)

    less_padding = WanTextEncoder(encoder.model, encoder.tokenizer, max_length=40)  # 512 -> 40 positions
    for a, b in zip(less_padding.encode(PROMPTS), outputs):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)  # the padding does not leak into tokens


def test_encode_truncates_to_max_length(official_sd, tiny_umt5_tokenizer_dir):
    model = build_text_encoder(official_sd, tiny_umt5_tokenizer_dir, dtype=torch.float32).model
    short = WanTextEncoder(model, load_tokenizer(tiny_umt5_tokenizer_dir), max_length=16)
    (out,) = short.encode(["a cat runs over the field " * 10])
    assert out.shape == (16, DIM)
    assert short.encode([]) == []


def test_build_defaults_bf16_frozen_and_tied(official_sd, tiny_umt5_tokenizer_dir):
    enc = build_text_encoder(official_sd, tiny_umt5_tokenizer_dir)
    model = enc.model
    assert enc.dtype == torch.bfloat16 and enc.device == torch.device("cpu")
    assert model.encoder.embed_tokens.weight is model.shared.weight
    assert not model.training
    params = list(model.parameters())
    assert all(p.dtype == torch.bfloat16 and not p.requires_grad and not p.is_meta for p in params)
    assert enc.encode(["a dog"])[0].dtype == torch.bfloat16

    fp16 = build_text_encoder(official_sd, tiny_umt5_tokenizer_dir, dtype=torch.float16).model
    wo = fp16.encoder.block[0].layer[1].DenseReluDense.wo.weight
    assert wo.dtype == torch.float32 and fp16.shared.weight.dtype == torch.float16


# ---------------------------------------------------------------------------------------------------
# Clear errors
# ---------------------------------------------------------------------------------------------------


def test_dit_state_dict_is_rejected(tiny_umt5_tokenizer_dir):
    dit = {
        "patch_embedding.weight": torch.zeros(8, 16, 1, 2, 2),
        "blocks.0.self_attn.q.weight": torch.zeros(8, 8),
        "blocks.0.cross_attn.k.weight": torch.zeros(8, 8),
        "blocks.0.ffn.0.weight": torch.zeros(16, 8),
        "head.head.weight": torch.zeros(4, 8),
    }
    with pytest.raises(CheckpointError, match="not a umT5 encoder checkpoint.*patch_embedding"):
        build_text_encoder(dit, tiny_umt5_tokenizer_dir)


def test_missing_and_unexpected_keys_are_named(official_sd, tiny_umt5_tokenizer_dir):
    missing = {k: v for k, v in official_sd.items() if k != "blocks.1.ffn.fc2.weight"}
    with pytest.raises(CheckpointError, match=r"not a umT5 encoder.*block\.1\.layer\.1\.DenseReluDense\.wo"):
        build_text_encoder(missing, tiny_umt5_tokenizer_dir)
    extra = dict(official_sd, **{"blocks.0.attn.rope.freqs": torch.zeros(4)})
    with pytest.raises(CheckpointError, match=r"not a umT5 encoder.*1 unexpected.*blocks\.0\.attn\.rope"):
        build_text_encoder(extra, tiny_umt5_tokenizer_dir)


def test_missing_tokenizer_folder_is_a_clear_error(tmp_path, official_sd):
    absent = tmp_path / "no_such_tokenizer"
    with pytest.raises(FileNotFoundError, match=rf"{absent} does not exist.*spiece\.model or tokenizer"):
        load_tokenizer(absent)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match=rf"{empty} has neither spiece\.model nor tokenizer\.json"):
        build_text_encoder(official_sd, empty)


def test_load_tokenizer_layouts(tiny_umt5_tokenizer_dir, tmp_path):
    full = load_tokenizer(tiny_umt5_tokenizer_dir)
    auto = AutoTokenizer.from_pretrained(str(tiny_umt5_tokenizer_dir), local_files_only=True)
    only_spm = tmp_path / "spm_only"
    only_spm.mkdir()
    (only_spm / "spiece.model").write_bytes((tiny_umt5_tokenizer_dir / "spiece.model").read_bytes())
    from_spm = load_tokenizer(only_spm / "spiece.model")  # a file path means its folder
    text = clean_prompt(PROMPTS[2])
    assert full(text).input_ids == auto(text).input_ids == from_spm(text).input_ids
    assert (full.pad_token_id, full.eos_token_id, full.unk_token_id) == (0, 1, 2)
    assert len(full) == len(from_spm) == 128  # no sentinel tokens appended past the pieces

"""fp8 umT5 (`fp8_t5`): fp8 block Linear layers, ComfyUI fp8 files used as stored, and the flag wired into
text caching (with its own cache fingerprint), generation and training samples.

The tiny umT5 of test_text_encoder.py (2 layers, d_model 32, 4 heads, d_ff 64, random weights). The
fp8 encoder is checked two ways: exactly against the independent re-statement of the official maths run
with the dequantised weights (so the fp8 path computes `x @ dequant(W)^T` and nothing else), and loosely
against the full-precision encoder (the quantisation error itself).
"""

from __future__ import annotations

import logging
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import save_file

from library.wan.fp8 import FP8Config, FP8Linear, dequantize_weight, quantize_weight
from library.wan.loading import load_text_encoder
from library.wan.text_encoder import build_text_encoder, clean_prompt, t5_state_dict_from_official
from tests.wan.test_text_encoder import PROMPTS, hf_name, official_state_dict, reference_encode

TARGETS = ("layer.0.SelfAttention.q", "layer.0.SelfAttention.k", "layer.0.SelfAttention.v",
           "layer.0.SelfAttention.o", "layer.1.DenseReluDense.wi_0", "layer.1.DenseReluDense.wi_1",
           "layer.1.DenseReluDense.wo")
MORE_PROMPTS = PROMPTS + ["a dog jumps over the river", "portrait of a smiling child in golden light",
                          "wide view of a city street at night, rain, the camera zooms in slowly"]
# Relative L2 error of the embeddings, fp8 vs full precision, on this random tiny model: measured 0.07-0.09
# (weight error 0.025 per layer, amplified by the unscaled attention logits of random q / k weights).
EMBEDDING_TOL = 0.12


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models run fastest on one thread (intra-op threads only add overhead); restored after each test."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def official_sd():
    return official_state_dict()


@pytest.fixture(scope="module")
def full(official_sd, tiny_umt5_tokenizer_dir):
    return build_text_encoder(official_sd, tiny_umt5_tokenizer_dir, dtype=torch.float32)


@pytest.fixture(scope="module")
def fp8(official_sd, tiny_umt5_tokenizer_dir):
    return build_text_encoder(official_sd, tiny_umt5_tokenizer_dir, dtype=torch.float32, fp8=True)


def _linears(model):
    return {f"encoder.block.{i}.{t}": model.get_submodule(f"encoder.block.{i}.{t}")
            for i in range(len(model.encoder.block)) for t in TARGETS}


def _relative_error(reference: list, got: list) -> float:
    num = sum(float((a - b.float()).norm() ** 2) for a, b in zip(reference, got))
    return (num / sum(float(a.norm() ** 2) for a in reference)) ** 0.5


def test_block_linears_are_fp8_everything_else_in_the_compute_dtype(official_sd, tiny_umt5_tokenizer_dir):
    enc = build_text_encoder(official_sd, tiny_umt5_tokenizer_dir, fp8=True)  # default compute dtype bf16
    model = enc.model
    linears = _linears(model)
    assert len(linears) == 14
    for name, layer in linears.items():
        assert isinstance(layer, FP8Linear), name
        assert layer.weight.dtype == torch.float8_e4m3fn and not layer.weight.requires_grad
        assert layer.scale_weight.dtype == torch.float32 and layer.scale_weight.shape == (layer.out_features,)
    fp8_params = {id(layer.weight) for layer in linears.values()}
    rest = [(n, p) for n, p in model.named_parameters() if id(p) not in fp8_params]
    assert {n.rsplit(".", 2)[-2] for n, _ in rest} >= {"shared", "relative_attention_bias", "layer_norm"}
    assert all(p.dtype == torch.bfloat16 and not p.is_meta for _, p in rest)
    assert model.encoder.embed_tokens.weight is model.shared.weight
    assert enc.dtype == torch.bfloat16 and enc.encode(["a dog"])[0].dtype == torch.bfloat16
    report = model.fp8_report
    assert report.layers == 14 and report.mode == "per-channel scaled"
    assert report.bytes_after < 0.6 * report.bytes_before  # 1 byte a weight (+ 4 a row) instead of 2
    assert 0.005 < report.mean_error < 0.04 and report.max_error < 0.05


def test_fp8_computes_exactly_with_the_dequantised_weights(official_sd, fp8):
    """The official maths (test_text_encoder.reference_encode) over dequant(W_fp8) gives the same output."""
    linears = _linears(fp8.model)
    dequantised = {}
    for key, value in official_sd.items():
        layer = linears.get(hf_name(key).removesuffix(".weight")) if key.startswith("blocks.") else None
        if layer is not None:
            value = dequantize_weight(layer.weight, layer.scale_weight, torch.float32)
        dequantised[key] = value
    assert sum(not torch.equal(dequantised[k], official_sd[k]) for k in official_sd) == 14
    tokens = fp8.tokenizer([clean_prompt(p) for p in PROMPTS], padding="max_length", max_length=512,
                           truncation=True, return_tensors="pt")
    expected = reference_encode(dequantised, tokens.input_ids, tokens.attention_mask)
    for out, ref, n in zip(fp8.encode(PROMPTS), expected, tokens.attention_mask.sum(1)):
        torch.testing.assert_close(out, ref[:n], rtol=1e-4, atol=1e-4)


def test_fp8_embeddings_close_to_full_precision(full, fp8, official_sd, tiny_umt5_tokenizer_dir, caplog):
    reference = full.encode(MORE_PROMPTS)
    error = _relative_error(reference, fp8.encode(MORE_PROMPTS))
    assert 0.005 < error < EMBEDDING_TOL, error
    with caplog.at_level(logging.INFO, logger="library.wan.text_encoder"):
        bf16 = build_text_encoder(official_sd, tiny_umt5_tokenizer_dir, dtype=torch.bfloat16, fp8=True)
    assert "fp8 (per-channel scaled): 14 Linear layers" in caplog.text and "relative weight error mean" in caplog.text
    assert _relative_error(reference, bf16.encode(MORE_PROMPTS)) < EMBEDDING_TOL
    fp16 = build_text_encoder(official_sd, tiny_umt5_tokenizer_dir, dtype=torch.float16, fp8=True)
    assert _relative_error(reference, fp16.encode(MORE_PROMPTS)) < EMBEDDING_TOL  # wo input upcast to fp32


@pytest.mark.parametrize("scaled", [True, False])
def test_comfy_fp8_file_is_used_as_stored(tmp_path, official_sd, tiny_umt5_tokenizer_dir, scaled):
    """A ComfyUI umt5_xxl_fp8_e4m3fn(_scaled) file: its fp8 bytes and scales go into FP8Linear unchanged."""
    sd = {k: v.to(torch.float16) for k, v in t5_state_dict_from_official(official_sd).items()}
    del sd["encoder.embed_tokens.weight"]  # ComfyUI files keep one copy of the tied embedding
    stored = {}
    for i in range(2):
        for target in TARGETS:
            key = f"encoder.block.{i}.{target}.weight"
            stored[key] = quantize_weight(sd[key], scaled=scaled)
            sd[key] = stored[key][0]
            if scaled:
                sd[key.replace(".weight", ".scale_weight")] = stored[key][1].reshape(1)
    if scaled:
        sd["scaled_fp8"] = torch.empty(0, dtype=torch.float8_e4m3fn)
    path = tmp_path / "umt5_xxl_fp8_e4m3fn_scaled.safetensors"
    save_file(sd, str(path))

    enc = load_text_encoder(path, tiny_umt5_tokenizer_dir, dtype=torch.float32, fp8=True)
    for name, layer in _linears(enc.model).items():
        weight, scale = stored[f"{name}.weight"]
        assert layer.weight.dtype == torch.float8_e4m3fn
        assert torch.equal(layer.weight.view(torch.uint8), weight.view(torch.uint8))  # the file's bytes
        if scaled:
            assert torch.equal(layer.scale_weight, scale.reshape(()))
        else:
            assert layer.scale_weight is None
    report = enc.model.fp8_report
    assert report.mode == f"from file, {'scaled' if scaled else 'unscaled'}" and not report.errors
    dequantised = load_text_encoder(path, tiny_umt5_tokenizer_dir, dtype=torch.float32)  # fp8 off: bf16 round trip
    for a, b in zip(dequantised.encode(PROMPTS), enc.encode(PROMPTS)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_quantised_while_loading_from_a_file(tmp_path, official_sd, full, tiny_umt5_tokenizer_dir):
    """A bf16 official .pth and an fp16 safetensors both load into fp8 (layer by layer) and encode alike."""
    pth = tmp_path / "models_t5_umt5-xxl-enc-bf16.pth"
    torch.save({k: v.bfloat16() for k, v in official_sd.items()}, pth)
    safetensors = tmp_path / "umt5_xxl_fp16.safetensors"
    save_file({k: v.half().contiguous() for k, v in t5_state_dict_from_official(official_sd).items()
               if k != "encoder.embed_tokens.weight"}, str(safetensors))
    reference = full.encode(PROMPTS)
    for path in (pth, safetensors):
        enc = load_text_encoder(path, tiny_umt5_tokenizer_dir, dtype=torch.float32, fp8=True)
        assert all(isinstance(m, FP8Linear) for m in _linears(enc.model).values())
        assert _relative_error(reference, enc.encode(PROMPTS)) < EMBEDDING_TOL
    per_tensor = load_text_encoder(pth, tiny_umt5_tokenizer_dir, dtype=torch.float32, fp8=FP8Config(per_channel=False))
    assert all(m.scale_weight.dim() == 0 for m in _linears(per_tensor.model).values())
    with pytest.raises(TypeError, match="fp8 must be a bool or an FP8Config"):
        load_text_encoder(pth, tiny_umt5_tokenizer_dir, fp8="yes")


# ---- wiring: caching, generation, training samples ------------------------------------------------------


def _dataset(root):
    from library.data.dataset_config import load_dataset_config
    from tests.data.conftest import write_caption, write_image, write_toml

    write_image(root / "imgs/a.png")
    write_caption(root / "imgs/a.txt", "a red cat")
    toml = write_toml(root / "d.toml", "[general]\nresolution = 32\ncaption_dropout_rate = 0.1\n"
                                       "[[datasets]]\nimage_directory = 'imgs'\ncache_directory = 'cache'\n")
    return toml, load_dataset_config(toml)


@pytest.fixture(scope="module")
def tiny_set(tmp_path_factory):
    from library.wan.tiny import write_tiny_model_set

    return write_tiny_model_set(tmp_path_factory.mktemp("tiny_fp8_t5"), "t2v-tiny")


def test_fp8_t5_caches_have_their_own_fingerprint(tmp_path, tiny_set):
    from library.data import cache
    from library.data.text_caching import cache_text_encoder_outputs, encoder_fingerprint
    from tests.data.test_tools import _tool

    toml, config = _dataset(tmp_path)
    common = ["--dataset_config", str(toml), "--t5", str(tiny_set.t5), "--tokenizer", str(tiny_set.tokenizer),
              "--device", "cpu", "--no_progress"]
    assert _tool("cache_text_encoder_outputs").main([*common, "--fp8_t5"]) == 0
    path = cache.text_cache_path(tmp_path / "cache", "a red cat")
    fp8_fp = encoder_fingerprint(tiny_set.t5, tiny_set.tokenizer, fp8_t5=True)
    assert fp8_fp != encoder_fingerprint(tiny_set.t5, tiny_set.tokenizer)
    assert cache.read_metadata(path)["encoder_fingerprint"] == fp8_fp
    fp8_embedding = cache.load_tensors(path)["t5"]

    run = dict(tokenizer=tiny_set.tokenizer, dtype=torch.float32, progress=False)
    assert cache_text_encoder_outputs(config, tiny_set.t5, fp8_t5=True, **run).reused == 2  # "a red cat" and ""
    switched = cache_text_encoder_outputs(config, tiny_set.t5, fp8_t5=False, **run)
    assert (switched.cached, switched.reused) == (2, 0)  # the other setting: rebuilt, not mixed
    full_embedding = cache.load_tensors(path)["t5"]
    assert cache.text_cache_problem(path, "a red cat", fp8_fp) == "encoded with a different text encoder or tokenizer"
    assert fp8_embedding.shape == full_embedding.shape and not torch.equal(fp8_embedding, full_embedding)
    assert _relative_error([full_embedding.float()], [fp8_embedding]) < EMBEDDING_TOL
    assert cache_text_encoder_outputs(config, tiny_set.t5, fp8_t5=False, **run).reused == 2
    assert cache_text_encoder_outputs(config, tiny_set.t5, fp8_t5=True, **run).cached == 2


def test_generation_cli_loads_the_text_encoder_in_fp8(tiny_set):
    from library.sampling import cli
    from library.sampling.commands import generate_parser

    argv = ["--task", "t2v-tiny", "--dit", str(tiny_set.dit), "--dit_high_noise", str(tiny_set.dit_high_noise),
            "--vae", str(tiny_set.vae), "--t5", str(tiny_set.t5), "--tokenizer", str(tiny_set.tokenizer),
            "--device", "cpu", "--prompt", "a cat"]
    assert generate_parser().parse_args(argv).fp8_t5 is False
    models, files = cli.load_models(generate_parser().parse_args([*argv, "--fp8_t5"]))
    assert files["t5_fp8"] is True
    assert all(isinstance(m, FP8Linear) for m in _linears(models.text_encoder.model).values())
    assert models.text_encoder.encode(["a cat"])[0].dtype == torch.float32  # CPU: computes in fp32


def test_training_samples_use_fp8_t5(tiny_set, tmp_path, monkeypatch):
    from library.config.loader import load_config
    from library.training import samples
    from library.wan import loading

    seen = []
    real = loading.load_text_encoder
    monkeypatch.setattr(loading, "load_text_encoder", lambda *a, **k: seen.append(k.get("fp8")) or real(*a, **k))
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a cat --d 1\n")
    cfg = load_config(["--task", "t2v-tiny", "--vae", str(tiny_set.vae), "--t5", str(tiny_set.t5),
                       "--t5_tokenizer", str(tiny_set.tokenizer), "--sample_prompts", str(prompts), "--fp8_t5", "true"])
    dit = loading.load_dit(tiny_set.dit, task="t2v-tiny")
    sampler = samples.TrainingSampler(cfg, [SimpleNamespace(name="dit", model=dit, network=None)], torch.device("cpu"))
    assert seen == [True] and len(sampler.requests) == 1  # the default (False) would reach the loader as False

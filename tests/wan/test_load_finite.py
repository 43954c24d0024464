"""The NaN / infinity screen of the VAE, umT5 and CLIP vision loads (`library/wan/finite.py`): a non-finite
weight is refused with a `NonFiniteWeights` (a CheckpointError) naming the file and the file's tensor key,
on the plain CPU path and through the staged path (CPU stand-in transport whose copies lag, as on a GPU);
umT5 in bf16 and fp8 (quantised while loading, and a ComfyUI fp8_scaled file used as stored, NaN in a
weight or in a scale); a clean file still loads bit for bit. The real CUDA path runs where a GPU is."""

from __future__ import annotations

import re

import pytest
import torch
from safetensors.torch import save_file

from library.wan.finite import NonFiniteWeights
from library.wan.fp8 import quantize_weight
from library.wan.loading import load_clip_vision, load_text_encoder, load_vae
from library.wan.text_encoder import t5_state_dict_from_official
from library.wan.text_encoder_fp8 import FP8_TARGET_RE
from library.wan.tiny import write_tiny_model_set
from tests.wan.test_staged_loaders import stage

LOADERS = {
    "vae": lambda m, path, **kw: load_vae(path, **kw),
    "t5": lambda m, path, **kw: load_text_encoder(path, m.tokenizer, **kw),
    "clip": lambda m, path, **kw: load_clip_vision(path, **kw),
}
# file key spoiled per case; CLIP's fused q/k/v weight is read a third at a time (element 0: the q third)
CASES = {"vae": "decoder.head.2.weight", "t5": "blocks.1.attn.q.weight", "t5 embedding": "token_embedding.weight",
         "clip": "visual.transformer.0.attn.to_qkv.weight"}


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return write_tiny_model_set(tmp_path_factory.mktemp("tiny"), "i2v-tiny-2.1")


def _spoiled(models, tmp_path, kind: str, key: str, value: float):
    source = {"vae": models.vae, "t5": models.t5, "clip": models.clip}[kind]
    state = torch.load(source, weights_only=True)
    state[key] = state[key].clone()
    state[key].view(-1)[0] = value
    path = tmp_path / f"bad_{source.name}"
    torch.save(state, path)
    return path


def _message(path, key: str, value: float) -> str:
    counts = "1 NaN and 0 infinite" if value != value else "0 NaN and 1 infinite"
    return re.escape(f"{path}: tensor {key!r} holds {counts} values (of ") + r"\d+\); the file is damaged .*use " \
        "another copy of the model"


@pytest.mark.parametrize("staged", [False, True], ids=["plain", "staged"])
@pytest.mark.parametrize("case,value", [("vae", float("nan")), ("t5", float("inf")), ("t5 embedding", float("nan")),
                                        ("clip", float("-inf"))])
def test_a_non_finite_weight_is_refused_naming_file_and_tensor(models, tmp_path, monkeypatch, case, value, staged):
    kind, key = case.split()[0], CASES[case]
    path = _spoiled(models, tmp_path, kind, key, value)
    made = stage(monkeypatch) if staged else []
    with pytest.raises(NonFiniteWeights, match=_message(path, key, value)):
        LOADERS[kind](models, path, dtype=torch.bfloat16)
    assert len(made) == int(staged)


def _comfy_fp8_file(models, tmp_path, spoil: str | None) -> tuple:
    """The tiny umT5 as a ComfyUI fp8_scaled safetensors file (HF names, per-tensor `scale_weight`), with the
    first element of `spoil` (a weight or scale key) set to NaN."""
    sd = {k: v.to(torch.float16) for k, v in t5_state_dict_from_official(torch.load(models.t5)).items()}
    del sd["encoder.embed_tokens.weight"]
    for key in [k for k in sd if FP8_TARGET_RE.match(k)]:
        sd[key], scale = quantize_weight(sd[key], scaled=True)
        sd[key.replace(".weight", ".scale_weight")] = scale.reshape(1)
    sd["scaled_fp8"] = torch.empty(0, dtype=torch.float8_e4m3fn)
    if spoil is not None:
        if sd[spoil].dtype == torch.float8_e4m3fn:
            sd[spoil].view(torch.uint8).view(-1)[0] = 0x7F  # e4m3fn NaN
        else:
            sd[spoil].view(-1)[0] = float("nan")
    path = tmp_path / "umt5_xxl_fp8_e4m3fn_scaled.safetensors"
    save_file(sd, str(path))
    return path


@pytest.mark.parametrize("staged", [False, True], ids=["plain", "staged"])
@pytest.mark.parametrize("fp8", [True, False], ids=["fp8_t5", "dequantised"])
@pytest.mark.parametrize("spoil", ["encoder.block.0.layer.1.DenseReluDense.wo.weight",
                                   "encoder.block.1.layer.0.SelfAttention.k.scale_weight"])
def test_an_fp8_scaled_umt5_file_with_nan_is_refused(models, tmp_path, monkeypatch, spoil, fp8, staged):
    path = _comfy_fp8_file(models, tmp_path, spoil)
    if staged:
        stage(monkeypatch)
    with pytest.raises(NonFiniteWeights, match=re.escape(f"{path}: tensor {spoil!r} holds 1 NaN")):
        load_text_encoder(path, models.tokenizer, dtype=torch.bfloat16, fp8=fp8)


@pytest.mark.parametrize("staged", [False, True], ids=["plain", "staged"])
def test_a_nan_in_a_weight_quantised_by_fp8_t5_is_refused(models, tmp_path, monkeypatch, staged):
    path = _spoiled(models, tmp_path, "t5", "blocks.0.ffn.fc2.weight", float("nan"))
    if staged:
        stage(monkeypatch)
    with pytest.raises(NonFiniteWeights, match=_message(path, "blocks.0.ffn.fc2.weight", float("nan"))):
        load_text_encoder(path, models.tokenizer, fp8=True)


def test_clean_files_still_load_bit_for_bit(models):
    vae = load_vae(models.vae, dtype=torch.float32).state_dict()
    for key, tensor in torch.load(models.vae, weights_only=True).items():
        assert torch.equal(vae[key], tensor), key
    t5 = load_text_encoder(models.t5, models.tokenizer, dtype=torch.float32).model.state_dict()
    for key, tensor in t5_state_dict_from_official(torch.load(models.t5, weights_only=True)).items():
        assert torch.equal(t5[key], tensor.float()), key
    clip = load_clip_vision(models.clip, dtype=torch.float32).state_dict()
    source = torch.load(models.clip, weights_only=True)
    assert torch.equal(clip["model.embeddings.patch_embedding.weight"], source["visual.patch_embedding.weight"])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("case", ["vae", "t5", "clip"])
def test_cuda_staged_loads_refuse_a_nan_weight(models, tmp_path, case):
    path = _spoiled(models, tmp_path, case, CASES[case], float("nan"))
    with pytest.raises(NonFiniteWeights, match=_message(path, CASES[case], float("nan"))):
        LOADERS[case](models, path, device="cuda", dtype=torch.bfloat16)
    if case == "t5":  # the fp8 layers' own staged load
        with pytest.raises(NonFiniteWeights, match=_message(path, CASES[case], float("nan"))):
            load_text_encoder(path, models.tokenizer, device="cuda", fp8=True)

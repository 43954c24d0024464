"""`load_dit` over every checkpoint format: the same tiny weights written each way load to the same model,
and broken or mismatched files give clear errors that name the file and the problem."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from library.wan.checkpoint_files import CheckpointError
from library.wan.loading import load_dit
from library.wan.model import WanModel
from library.wan.variants import get_variant
from tests.helpers import diffusers_transformer, random_official_dit_state

FP8_LINEARS = ("self_attn.q.", "self_attn.k.", "self_attn.v.", "self_attn.o.", "cross_attn.q.",
               "cross_attn.k.", "cross_attn.v.", "cross_attn.o.", "ffn.0.", "ffn.2.", "text_embedding",
               "time_embedding", "time_projection", "head.head.")


@pytest.fixture(scope="module")
def state():
    return random_official_dit_state(get_variant("t2v-tiny"))


def is_fp8_linear_weight(key: str) -> bool:
    return key.endswith(".weight") and any(s in key for s in FP8_LINEARS)


def to_fp8_scaled(sd: dict, spelling: str) -> dict:
    """ComfyUI-style fp8_scaled: e4m3fn Linear weights with an fp32 scalar scale, the rest fp16."""
    out = {"scaled_fp8": torch.empty(0, dtype=torch.float8_e4m3fn)} if spelling == "scale_weight" else {}
    for key, value in sd.items():
        if not is_fp8_linear_weight(key):
            out[key] = value.half()
            continue
        layer = key[: -len(".weight")]
        scale = value.abs().max().float() / 448.0
        out[key] = (value / scale).to(torch.float8_e4m3fn)
        if spelling == "scale_weight":
            out[f"{layer}.scale_weight"], out[f"{layer}.scale_input"] = scale, torch.tensor(1.0)
        else:
            out[f"{layer}.weight_scale"], out[f"{layer}.input_scale"] = scale, torch.tensor(1.0)
            out[f"{layer}.comfy_quant"] = torch.tensor(list(b'{"format":"float8_e4m3fn"}'), dtype=torch.uint8)
    return out


def to_diffusers_names(sd: dict, variant) -> dict:
    from library.wan.dit_formats import diffusers_to_official

    with torch.device("meta"):
        ref = diffusers_transformer(variant)
    return {k: sd[diffusers_to_official(k)] for k in ref.state_dict()}


def write(tmp_path, name, sd, metadata=None):
    path = tmp_path / name
    save_file({k: v.contiguous() for k, v in sd.items()}, str(path), metadata=metadata)
    return path


def assert_same_weights(model: WanModel, sd: dict, rtol: float):
    got = model.state_dict()
    assert set(got) == set(sd)
    for key, ref in sd.items():
        err = (got[key].float() - ref.float()).abs().max() / ref.float().abs().max().clamp_min(1e-8)
        assert err <= rtol, f"{key}: relative error {err:.2e}"


@pytest.mark.parametrize("fmt", ["official", "prefixed", "comfy_prefix", "fp16", "bf16", "diffusers", "pth"])
def test_lossless_formats_load_the_same_model(tmp_path, state, fmt):
    variant = get_variant("t2v-tiny")
    if fmt == "pth":
        path = tmp_path / "model.pth"
        torch.save(state, path)
    else:
        sd = {
            "official": lambda: state,
            "prefixed": lambda: {f"model.diffusion_model.{k}": v for k, v in state.items()},
            "comfy_prefix": lambda: {f"diffusion_model.{k}": v for k, v in state.items()},
            "fp16": lambda: {k: v.half() for k, v in state.items()},
            "bf16": lambda: {k: v.bfloat16() for k, v in state.items()},
            "diffusers": lambda: to_diffusers_names(state, variant),
        }[fmt]()
        path = write(tmp_path, f"{fmt}.safetensors", sd)
    model = load_dit(path, task="t2v-tiny")
    assert model.variant.name == "t2v-tiny"
    assert not any(p.requires_grad for p in model.parameters()) and not model.training
    assert_same_weights(model, state, rtol={"fp16": 1e-3, "bf16": 8e-3}.get(fmt, 0.0))


@pytest.mark.parametrize("fmt", ["fp8", "scale_weight", "weight_scale"])
def test_fp8_files_load_within_quantisation_error(tmp_path, state, fmt):
    if fmt == "fp8":  # plain e4m3fn, no scales: the weights must be in fp8 range already
        sd = {k: (v.to(torch.float8_e4m3fn) if is_fp8_linear_weight(k) else v.half()) for k, v in state.items()}
    else:
        sd = to_fp8_scaled(state, fmt)
    model = load_dit(write(tmp_path, f"{fmt}.safetensors", sd), dtype=torch.bfloat16)
    assert model.blocks[0].self_attn.q.weight.dtype == torch.bfloat16
    assert model.blocks[0].modulation.dtype == torch.float32  # kept in fp32
    assert_same_weights(model, state, rtol=0.07)  # e4m3: 3 mantissa bits -> <= 1/16 relative step
    # the dequantised model computes what the original does, within the quantisation error
    ref = WanModel(get_variant("t2v-tiny"))
    ref.load_state_dict(state)
    x, t, ctx = torch.randn(1, 16, 2, 4, 4), torch.tensor([400.0]), [torch.randn(5, 64)]
    with torch.no_grad():
        a, b = ref(x, t, ctx), model(x, t, ctx)
    assert (a - b).abs().max() / a.abs().max() < 0.1


def test_sharded_official_folder(tmp_path, state):
    folder = tmp_path / "low_noise_model"
    folder.mkdir()
    keys = sorted(state)
    halves = {"diffusion_pytorch_model-00001-of-00002.safetensors": keys[: len(keys) // 2],
              "diffusion_pytorch_model-00002-of-00002.safetensors": keys[len(keys) // 2:]}
    weight_map = {}
    for shard, shard_keys in halves.items():
        write(folder, shard, {k: state[k] for k in shard_keys})
        weight_map.update({k: shard for k in shard_keys})
    (folder / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    (folder / "config.json").write_text(json.dumps({"_class_name": "WanModel", "num_heads": 2}))
    assert_same_weights(load_dit(folder), state, 0.0)

    # a folder holding both experts asks for one of them
    (tmp_path / "high_noise_model").mkdir()
    with pytest.raises(CheckpointError, match="two experts; pass .*low_noise_model as `dit`"):
        load_dit(tmp_path)

    # a missing shard is named
    (folder / "diffusion_pytorch_model-00002-of-00002.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"00002-of-00002.safetensors listed in .*index.json are missing"):
        load_dit(folder)


def test_truncated_file_is_a_clear_error(tmp_path, state):
    path = write(tmp_path, "model.safetensors", state)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 100])
    with pytest.raises(CheckpointError, match=r"model\.safetensors: truncated.*fetch the file again"):
        load_dit(path)
    path.write_bytes(data[:5])
    with pytest.raises(CheckpointError, match="too short to be a safetensors file"):
        load_dit(path)


def test_vae_passed_as_dit_is_a_clear_error(tmp_path):
    vae_like = {"encoder.conv1.weight": torch.zeros(4, 3, 3, 3, 3),
                "decoder.middle.0.residual.0.gamma": torch.ones(4, 1, 1, 1),
                "conv1.weight": torch.zeros(32, 32, 1, 1, 1)}
    path = write(tmp_path, "wan_2.1_vae.safetensors", vae_like)
    with pytest.raises(CheckpointError, match=r"wan_2\.1_vae\.safetensors: this is a WAN VAE, not a WAN DiT"):
        load_dit(path)


def test_i2v_checkpoint_under_t2v_task_names_both(tmp_path):
    path = write(tmp_path, "i2v.safetensors", random_official_dit_state(get_variant("i2v-tiny")))
    with pytest.raises(CheckpointError, match=r"i2v\.safetensors: checkpoint is i2v-tiny .*36 input channels.*"
                                              r"configured task is t2v-tiny .*16 input channels"):
        load_dit(path, task="t2v-tiny")
    assert load_dit(path).variant.name == "i2v-tiny"  # detected from shapes without a task


def test_wrong_shape_and_missing_keys_are_named(tmp_path, state):
    broken = dict(state)
    del broken["blocks.1.ffn.2.bias"]
    with pytest.raises(CheckpointError, match=r"1 missing \(e\.g\. blocks\.1\.ffn\.2\.bias\)"):
        load_dit(write(tmp_path, "missing.safetensors", broken))
    bad = dict(state)
    bad["blocks.0.self_attn.q.weight"] = torch.zeros(32, 31)
    with pytest.raises(CheckpointError, match=r"'blocks\.0\.self_attn\.q\.weight' has shape \[32, 31\]"):
        load_dit(write(tmp_path, "bad.safetensors", bad))


def test_unknown_task_lists_valid_ones(tmp_path, state):
    with pytest.raises(ValueError, match="unknown WAN task 't2v-A15B'.*t2v-A14B"):
        load_dit(write(tmp_path, "m.safetensors", state), task="t2v-A15B")


def test_write_safetensors_streams_and_is_atomic(tmp_path):
    """Tensors and lazily made tensors are written in order, readable by safetensors; a tensor that comes out
    unlike its announced shape fails the write and leaves the earlier file and no temp file behind."""
    from safetensors import safe_open

    from library.wan.checkpoint_files import LazyTensor, write_safetensors

    path = tmp_path / "m.safetensors"
    made = []
    lazy = LazyTensor((2, 3), torch.bfloat16, lambda: made.append(1) or torch.ones(2, 3, dtype=torch.bfloat16))
    write_safetensors(path, {"a": torch.arange(4.0), "b": lazy, "c": torch.zeros(0)}, {"k": "v"})
    with safe_open(str(path), "pt") as f:
        assert list(f.keys()) == ["a", "b", "c"] and f.metadata() == {"k": "v"}
        assert torch.equal(f.get_tensor("b"), torch.ones(2, 3, dtype=torch.bfloat16)) and made == [1]
    before = path.read_bytes()
    wrong = LazyTensor((5,), torch.float32, lambda: torch.zeros(4))
    with pytest.raises(CheckpointError, match="came out as"):
        write_safetensors(path, {"x": wrong})
    assert path.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == ["m.safetensors"]

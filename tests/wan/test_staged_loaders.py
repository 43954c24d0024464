"""The other loads through the page-locked staging buffers (issue 17, `library/wan/staged_load.py`), on the CPU
stand-in transport whose copies lag behind the casts: `load_dit_fp8` (quantised from an fp32 and a bf16
file, per-tensor and per-channel scales, and an fp8_scaled file used as stored) gives the fp8 bytes, scales,
errors and every other tensor of the per-tensor path bit for bit, and quantises only after its copies landed
(`join`); a NaN in a Linear weight (file dtype or fp8) is refused naming the file and tensor; the VAE, the
umT5 encoder (bf16 and fp16 with its fp32 FFN outputs) and the CLIP vision encoder equal their plain loads.
The real CUDA path runs where a GPU is."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from library.wan import staged_load
from library.wan.checkpoint_files import CheckpointError
from library.wan.fp8 import FP8Config
from library.wan.loading import load_clip_vision, load_dit_fp8, load_text_encoder, load_vae
from library.wan.tiny import write_tiny_model_set
from library.wan.variants import get_variant
from tests.helpers import random_official_dit_state
from tests.wan.staged_standins import LaggingTransport
from tests.wan.test_loading import to_fp8_scaled

CONFIGS = {"per_tensor": FP8Config(), "per_channel": FP8Config(per_channel=True)}


def stage(monkeypatch) -> list:
    """From now on every load onto a device goes through a fresh `LaggingTransport` (listed in the result)."""
    made = []

    def transport(device):
        made.append(LaggingTransport())
        return made[-1]

    monkeypatch.setattr(staged_load, "transport_for", transport)
    monkeypatch.setattr(staged_load, "BUFFER_BYTES", 4096)  # several buffers' worth even for tiny models
    return made


@pytest.fixture(scope="module")
def dit_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("dit")
    state = random_official_dit_state(get_variant("t2v-tiny"), 5)
    files = {"fp32": {k: v.float() for k, v in state.items()}, "bf16": {k: v.bfloat16() for k, v in state.items()},
             "fp8_scaled": to_fp8_scaled(state, "scale_weight")}
    for name, sd in files.items():
        save_file({k: v.contiguous() for k, v in sd.items()}, str(root / f"{name}.safetensors"))
    return {name: root / f"{name}.safetensors" for name in files}


@pytest.fixture(scope="module")
def tiny_set(tmp_path_factory):
    return write_tiny_model_set(tmp_path_factory.mktemp("tiny"), "i2v-tiny-2.1")


def _assert_same_bits(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key, tensor in a.items():
        assert b[key].dtype == tensor.dtype and b[key].shape == tensor.shape, key
        assert torch.equal(b[key].reshape(-1).view(torch.uint8), tensor.reshape(-1).view(torch.uint8)), key


@pytest.mark.parametrize("config", CONFIGS)
@pytest.mark.parametrize("file", ["fp32", "bf16", "fp8_scaled"])
def test_fp8_load_staged_equals_the_per_tensor_path_bit_for_bit(dit_files, monkeypatch, file, config):
    plain = load_dit_fp8(dit_files[file], dtype=torch.bfloat16, config=CONFIGS[config])
    staged = stage(monkeypatch)
    model = load_dit_fp8(dit_files[file], dtype=torch.bfloat16, config=CONFIGS[config])
    _assert_same_bits(plain.state_dict(), model.state_dict())
    a, b = plain.fp8_report, model.fp8_report
    assert (b.mode, b.layers, b.bytes_before, b.bytes_after, b.errors) == (a.mode, a.layers, a.bytes_before,
                                                                          a.bytes_after, a.errors)
    assert b.layers == 20 and (b.mode.startswith("from file") == (file == "fp8_scaled"))
    assert len(staged) == 1 and staged[0].buffers == staged_load.DEPTH
    if file != "fp8_scaled":
        assert len(b.errors) == 20 and staged[0].joins >= 20  # each layer quantised after its own copies
    assert model.blocks[0].modulation.dtype == torch.float32


@pytest.mark.parametrize("file", ["fp32", "fp8_scaled"])
def test_fp8_load_refuses_a_nan_in_a_linear_weight_naming_file_and_tensor(tmp_path, monkeypatch, file):
    staged = stage(monkeypatch)
    state = random_official_dit_state(get_variant("t2v-tiny"), 6)
    if file == "fp8_scaled":
        state = to_fp8_scaled(state, "scale_weight")
        state["blocks.1.ffn.0.weight"].view(torch.uint8)[2, 3] = 0x7F  # e4m3fn NaN
    else:
        state["blocks.1.ffn.0.weight"][2, 3] = float("nan")
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp_path / "bad.safetensors"))
    with pytest.raises(CheckpointError, match=r"bad\.safetensors: tensor 'blocks\.1\.ffn\.0\.weight' holds 1 NaN "
                                              r"and 0 infinite values"):
        load_dit_fp8(tmp_path / "bad.safetensors", dtype=torch.bfloat16)
    assert len(staged) == 1


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_vae_text_encoder_and_clip_staged_equal_their_plain_loads(tiny_set, monkeypatch, dtype):
    def loads():
        return {"vae": load_vae(tiny_set.vae, dtype=dtype).state_dict(),
                "t5": load_text_encoder(tiny_set.t5, tiny_set.tokenizer, dtype=dtype).model.state_dict(),
                "clip": load_clip_vision(tiny_set.clip, dtype=dtype).state_dict()}

    plain = loads()
    made = stage(monkeypatch)
    staged = loads()
    for kind in plain:
        _assert_same_bits(plain[kind], staged[kind])
    assert len(made) == 3 and all(t.copies > 0 and t.buffers == staged_load.DEPTH for t in made)
    if dtype == torch.float16:  # umT5's FFN output projections stay fp32 in fp16, staged as well
        assert staged["t5"]["encoder.block.0.layer.1.DenseReluDense.wo.weight"].dtype == torch.float32


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_fp8_vae_t5_and_clip_loads_equal_the_per_tensor_path(dit_files, tiny_set, monkeypatch):
    monkeypatch.setattr(staged_load, "BUFFER_BYTES", 4096)

    def loads():
        out = {f"dit_{file}_{config}": load_dit_fp8(dit_files[file], device="cuda", config=CONFIGS[config])
               for file in dit_files for config in CONFIGS}
        reports = {k: (m.fp8_report.errors, m.fp8_report.mode) for k, m in out.items()}
        out = {k: m.state_dict() for k, m in out.items()}
        out["vae"] = load_vae(tiny_set.vae, device="cuda", dtype=torch.bfloat16).state_dict()
        out["t5"] = load_text_encoder(tiny_set.t5, tiny_set.tokenizer, device="cuda").model.state_dict()
        t5_fp8 = load_text_encoder(tiny_set.t5, tiny_set.tokenizer, device="cuda", fp8=True).model
        out["t5_fp8"], reports["t5_fp8"] = t5_fp8.state_dict(), t5_fp8.fp8_report.errors
        out["clip"] = load_clip_vision(tiny_set.clip, device="cuda").state_dict()
        return out, reports

    staged, staged_reports = loads()
    monkeypatch.setattr(staged_load, "ENABLED", False)
    plain, plain_reports = loads()
    assert staged_reports == plain_reports
    for kind in plain:
        assert all(t.device == plain[kind][k].device for k, t in staged[kind].items()), kind
        assert not kind.startswith("dit") or all(t.is_cuda for t in staged[kind].values()), kind
        _assert_same_bits({k: v.cpu() for k, v in plain[kind].items()}, {k: v.cpu() for k, v in staged[kind].items()})
    monkeypatch.setattr(staged_load, "ENABLED", True)
    state = random_official_dit_state(get_variant("t2v-tiny"), 6)
    state["blocks.0.self_attn.o.weight"][0, 1] = float("inf")
    save_file(state, str(dit_files["fp32"].parent / "inf.safetensors"))
    with pytest.raises(CheckpointError, match=r"tensor 'blocks\.0\.self_attn\.o\.weight' holds 0 NaN and 1 infinite"):
        load_dit_fp8(dit_files["fp32"].parent / "inf.safetensors", device="cuda")


@pytest.mark.parametrize("fp8", [True, FP8Config()], ids=["per_channel", "per_tensor"])
def test_text_encoder_fp8_layers_staged_equal_the_per_tensor_path(tiny_set, monkeypatch, fp8):
    plain = load_text_encoder(tiny_set.t5, tiny_set.tokenizer, fp8=fp8).model
    made = stage(monkeypatch)
    staged = load_text_encoder(tiny_set.t5, tiny_set.tokenizer, fp8=fp8).model
    _assert_same_bits(plain.state_dict(), staged.state_dict())
    assert staged.fp8_report.errors == plain.fp8_report.errors and len(staged.fp8_report.errors) > 0
    assert len(made) == 2 and made[0].joins > 0  # the fp8 layers' stager (each quantised after its copies), the rest's


def test_loading_benchmark_times_the_fp8_load(tmp_path, monkeypatch):
    from library.errors import UserError
    from tools.benchmark_loading import child_load, main, write_checkpoint

    monkeypatch.setattr(staged_load, "ENABLED", staged_load.ENABLED)  # child_load sets it
    write_checkpoint("t2v-tiny", "fp32", tmp_path / "tiny.safetensors")
    result = child_load(str(tmp_path / "tiny.safetensors"), "bf16", fp8=True)  # the fp8 mode's load, on the CPU
    assert result["seconds"] > 0 and result["params"] > 0
    with pytest.raises(UserError, match="--fp8 times the fp8 load onto the GPU: pass --device cuda"):
        main(["--fp8", "--dir", str(tmp_path)])

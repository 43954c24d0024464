"""LoRA format conversion keeps every module's effective delta (up @ down * alpha / rank)."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_file

from networks.convert import convert_lora, diffusers_name, official_name, read_modules
from networks.lora_wan import create_network
from library.wan.model import WanModel
from library.wan.variants import get_variant
from tests.helpers import REPO


def deltas(path) -> dict[str, torch.Tensor]:
    modules, _ = read_modules(path)
    out = {}
    for name, parts in modules.items():
        rank = parts["down"].shape[0]
        alpha = float(parts["alpha"]) if "alpha" in parts else rank
        out[name] = parts["up"].float() @ parts["down"].float() * (alpha / rank)
    return out


@pytest.fixture()
def kohya_file(tmp_path):
    torch.manual_seed(0)
    net = create_network(1.0, 4, 2.0, None, None, WanModel(get_variant("i2v-tiny-2.1")))  # with k_img / v_img
    for lora in net.loras:
        torch.nn.init.normal_(lora.lora_up.weight, std=0.1)
    path = tmp_path / "style.safetensors"
    net.save_weights(path, metadata={"ss_network_dim": "4", "modelspec.architecture": "wan2.1-i2v-tiny-2.1/lora"})
    return path


def test_names_round_trip():
    for name in ("blocks.12.self_attn.q", "blocks.0.cross_attn.k_img", "blocks.3.ffn.2", "head.head",
                 "time_projection.1", "img_emb.proj.3"):
        assert official_name("lora_unet_" + name.replace(".", "_")) == name
    assert diffusers_name("blocks.0.self_attn.o") == "blocks.0.attn1.to_out.0"
    assert diffusers_name("blocks.0.cross_attn.v_img") == "blocks.0.attn2.add_v_proj"
    with pytest.raises(ValueError, match="not a WAN DiT Linear layer"):
        official_name("lora_unet_down_blocks_0_attentions_0_proj_in")


def test_every_format_keeps_the_deltas(kohya_file, tmp_path):
    reference = deltas(kohya_file)
    current = kohya_file
    for fmt in ("comfyui", "diffusers", "kohya"):  # a full circle
        current = convert_lora(current, tmp_path / f"{fmt}.safetensors", fmt)
        got = deltas(current)
        assert set(got) == set(reference)
        for name in reference:
            torch.testing.assert_close(got[name], reference[name], rtol=1e-5, atol=1e-7)
    _, meta = read_modules(current)
    assert meta["modelspec.architecture"] == "wan2.1-i2v-tiny-2.1/lora" and meta["ss_lora_format"] == "kohya"


def test_diffusers_output_loads_into_our_network_with_every_key(kohya_file, tmp_path):
    out = convert_lora(kohya_file, tmp_path / "d.safetensors", "diffusers")
    net = create_network(1.0, 4, 4.0, None, None, WanModel(get_variant("i2v-tiny-2.1")))
    report = net.load_weights(out, strict=True)
    assert report.loaded == len(net.loras) and not report.unknown_keys


def test_cli_and_bad_files(kohya_file, tmp_path):
    run = subprocess.run([sys.executable, str(REPO / "tools" / "convert_lora.py"), str(kohya_file),
                          str(tmp_path / "c.safetensors"), "--format", "comfyui", "--dtype", "bf16"],
                         capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert next(iter(deltas(tmp_path / "c.safetensors").values())).shape[0] > 0
    bad = tmp_path / "sd.safetensors"
    save_file({"lora_unet_down_blocks_0_proj_in.lora_down.weight": torch.zeros(4, 8),
               "lora_unet_down_blocks_0_proj_in.lora_up.weight": torch.zeros(8, 4)}, str(bad))
    run = subprocess.run([sys.executable, str(REPO / "tools" / "convert_lora.py"), str(bad),
                          str(tmp_path / "x.safetensors"), "--format", "kohya"], capture_output=True, text=True)
    assert run.returncode == 2 and "not a WAN DiT Linear layer" in run.stderr

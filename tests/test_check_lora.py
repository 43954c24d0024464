"""The LoRA doctor (library/diagnostics/, tools/check_lora.py): each reason a LoRA "has no effect" or is
"not loaded" by ComfyUI, made on purpose in a tiny file, is named; a healthy file is OK."""

from __future__ import annotations

import dataclasses
import importlib.util
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from library.diagnostics import diagnose, format_diagnosis, gram_norm, open_dit
from library.wan.model import WanModel
from library.wan.tiny import tiny_dit_state_dict
from library.wan.variants import get_variant
from networks import lora_wan
from networks.convert import convert_lora
from tests.helpers import REPO


def _tool():
    spec = importlib.util.spec_from_file_location("tool_check_lora", REPO / "tools" / "check_lora.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def write_lora(path, variant="t2v-tiny", up_std=0.1, expert=None, alpha=4, seed=0, model=None, **meta):
    """A LoRA over a tiny model (random up = trained-looking, up_std 0 = untrained) with WAN metadata."""
    v = get_variant(variant)
    torch.manual_seed(seed)
    network = lora_wan.create_network(1.0, 4, alpha, None, None, model or WanModel(v))
    with torch.no_grad():
        for lora in network.loras:
            lora.lora_up.weight.normal_(0, up_std) if up_std else lora.lora_up.weight.zero_()
    meta = lora_wan.build_lora_metadata(v.name, v.version, expert=expert, network_dim=4, network_alpha=alpha,
                                        **{"steps": 1000, "learning_rate": 1e-4, **meta})
    return network.save_weights(path, metadata=meta)


def levels(report, level):
    return [f.message for f in report.findings if f.level == level]


def test_gram_norm_equals_the_dense_norm():
    g = torch.Generator().manual_seed(0)
    for out_f, rank, in_f in ((40, 4, 24), (7, 16, 3), (64, 1, 64)):
        up, down = torch.randn(out_f, rank, generator=g), torch.randn(rank, in_f, generator=g)
        torch.testing.assert_close(torch.tensor(gram_norm(up, down), dtype=torch.float64),
                                   torch.linalg.norm((up.double() @ down.double())))
    assert gram_norm(torch.zeros(8, 2), torch.randn(2, 8)) == 0.0
    up, down = torch.randn(32, 4).bfloat16(), torch.randn(4, 32).bfloat16()  # file dtypes work too
    torch.testing.assert_close(torch.tensor(gram_norm(up, down)), torch.linalg.norm(up.float() @ down.float()),
                               rtol=1e-4, atol=1e-4)


def test_a_trained_file_is_ok_with_its_facts(tmp_path):
    path = write_lora(tmp_path / "style.safetensors", alpha=2)
    report = diagnose(path)
    assert report.verdict == "OK", report.findings
    assert report.key_format == "kohya" and report.comfyui == "loads natively" and report.modules == 20
    assert report.rank == [4] and report.alpha_scale == [0.5] and report.dtypes == ["float32"]
    assert report.fits == ["t2v-tiny", "i2v-tiny", "ti2v-tiny", "i2v-tiny-2.1", "t2i-tiny", "flf2v-tiny",
                           "vace-tiny"]  # VACE: T2V + blocks
    assert report.shapes == {"dim": 32, "ffn_dim": 64, "blocks": 2, "last_block": 1, "k_img": False}
    assert report.metadata_variant == "t2v-tiny" and report.training["steps"] == 1000
    assert any("applies to both experts" in m for m in levels(report, "note"))  # a 2.2 two-expert variant
    sd = load_file(str(path))  # the reported max delta norm is the dense one, times alpha / rank
    name = report.effect["delta_norm"]["max_module"]
    kohya = "lora_unet_" + name.replace(".", "_")
    dense = torch.linalg.norm(sd[f"{kohya}.lora_up.weight"] @ sd[f"{kohya}.lora_down.weight"]) * 0.5
    torch.testing.assert_close(torch.tensor(report.effect["delta_norm"]["max"], dtype=torch.float64), dense.double(),
                               rtol=1e-5, atol=0)
    assert "style.safetensors: OK" in format_diagnosis(report)


def test_an_untrained_file_has_no_effect(tmp_path):
    report = diagnose(write_lora(tmp_path / "step0.safetensors", up_std=0, steps=0))
    assert report.verdict == "ERROR"
    assert report.reason.startswith("this LoRA has no effect: its up-projections are zero (saved before training")
    assert report.effect["zero_up_modules"] == 20
    assert any("trained for only 0 steps" in m for m in levels(report, "warning"))


def test_diffusers_names_are_flagged_for_comfyui(tmp_path):
    out = convert_lora(write_lora(tmp_path / "a.safetensors"), tmp_path / "d.safetensors", "diffusers")
    report = diagnose(out)
    assert report.verdict == "WARN" and report.key_format == "diffusers"
    assert "ComfyUI will report 'lora key not loaded'" in report.reason
    assert "tools/convert_lora.py --format comfyui" in report.reason
    comfy = diagnose(convert_lora(out, tmp_path / "c.safetensors", "comfyui"))
    assert comfy.verdict == "OK" and comfy.key_format == "comfyui"


def test_nan_is_an_error(tmp_path):
    path = write_lora(tmp_path / "a.safetensors")
    sd = load_file(str(path))
    sd["lora_unet_blocks_1_ffn_0.lora_up.weight"][0, 0] = float("nan")
    save_file(sd, str(tmp_path / "nan.safetensors"))
    report = diagnose(tmp_path / "nan.safetensors")
    assert report.verdict == "ERROR" and "NaN or Inf" in report.reason
    assert "lora_unet_blocks_1_ffn_0.lora_up.weight" in report.reason


def test_broken_files_get_clear_errors(tmp_path):
    data = write_lora(tmp_path / "a.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) // 2])
    report = diagnose(tmp_path / "cut.safetensors")
    assert report.verdict == "ERROR" and not report.readable
    assert f"truncated: the header promises {len(data)} bytes but the file has {len(data) // 2}" in report.reason
    torch.save({"x": torch.zeros(2)}, tmp_path / "pickle.safetensors")
    assert "a PyTorch zip checkpoint" in diagnose(tmp_path / "pickle.safetensors").reason
    (tmp_path / "empty.safetensors").write_bytes(b"")
    assert "too short to be a safetensors file" in diagnose(tmp_path / "empty.safetensors").reason
    assert "no such file" in diagnose(tmp_path / "missing.safetensors").reason


def test_loras_for_other_models_are_named(tmp_path):
    sdxl = {"lora_unet_input_blocks_4_1_proj_in.lora_down.weight": torch.randn(4, 640),
            "lora_unet_input_blocks_4_1_proj_in.lora_up.weight": torch.randn(640, 4),
            "lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": torch.randn(4, 768),
            "lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_up.weight": torch.randn(3072, 4)}
    save_file(sdxl, str(tmp_path / "sdxl.safetensors"))
    report = diagnose(tmp_path / "sdxl.safetensors")
    assert report.verdict == "ERROR" and report.family == "SDXL"
    assert report.reason.startswith("not a WAN LoRA: it looks like a SDXL LoRA")
    flux = {f"lora_unet_double_blocks_{i}_img_attn_qkv.{p}.weight": torch.zeros(2, 2)
            for i in range(19) for p in ("lora_down", "lora_up")}
    save_file(flux, str(tmp_path / "flux.safetensors"))
    assert diagnose(tmp_path / "flux.safetensors").family == "Flux.1"
    mixed = {**load_file(str(write_lora(tmp_path / "w.safetensors"))), **sdxl}  # WAN modules + strays
    save_file(mixed, str(tmp_path / "mixed.safetensors"))
    report = diagnose(tmp_path / "mixed.safetensors")
    assert report.verdict == "WARN" and report.modules == 20 and len(report.foreign_modules) == 2
    assert "are not WAN DiT layers" in report.reason


def test_expert_pair_with_and_without_partner(tmp_path):
    high = write_lora(tmp_path / "char_high_noise-step00000500.safetensors", expert="high_noise")
    low = write_lora(tmp_path / "char_low_noise-step00000500.safetensors", expert="low_noise", seed=1)
    report = diagnose(high)
    assert report.verdict == "OK" and report.expert["expert"] == "high_noise"
    assert report.expert["partner"] == low.name and report.expert["partner_exists"]
    low.unlink()
    report = diagnose(high)
    assert report.verdict == "WARN" and not report.expert["partner_exists"]
    assert f"without its partner {low.name}" in report.reason
    renamed = high.rename(tmp_path / "char_low_noise.safetensors")  # name and metadata disagree
    assert "the file name says low_noise but ss_expert says high_noise" in diagnose(renamed).reason


def test_metadata_that_disagrees_with_the_shapes(tmp_path):
    path = write_lora(tmp_path / "i2v21.safetensors", variant="i2v-tiny-2.1")  # has cross_attn.k_img / v_img
    assert diagnose(path).fits == ["i2v-tiny-2.1", "flf2v-tiny"] and diagnose(path).verdict == "OK"
    sd = load_file(str(path))
    save_file(sd, str(tmp_path / "lie.safetensors"), metadata={"modelspec.architecture": "wan2.2-t2v-tiny/lora"})
    report = diagnose(tmp_path / "lie.safetensors")
    assert report.verdict == "WARN" and report.shapes["k_img"]
    assert report.reason.startswith("metadata says 'wan2.2-t2v-tiny' (t2v-tiny) but the shapes")
    assert "fit i2v-tiny-2.1" in report.reason
    report = diagnose(path, task="t2v-tiny")  # k_img / v_img are not in a 2.2 model: skipped, a warning
    assert report.verdict == "WARN" and "4 of 24 modules are not layers of t2v-tiny" in report.reason


def test_task_mismatch_names_the_module_shapes(tmp_path):
    wide = dataclasses.replace(get_variant("t2v-tiny"), name="wide", dim=48, num_heads=3)
    path = write_lora(tmp_path / "wide.safetensors", model=WanModel(wide))
    report = diagnose(path, task="t2v-tiny")
    assert report.verdict == "ERROR" and report.fits == []
    assert report.reason.startswith("does not fit t2v-tiny: 20 of 20 modules have other shapes:")
    assert "(LoRA 48 -> 48, model 32 -> 32)" in report.reason
    assert any("fit no known WAN variant" in m for m in levels(report, "warning"))


def test_real_variants_from_shapes_alone(tmp_path):
    def fits(dim, ffn, k_img=False):
        names = ["blocks.0.self_attn.q", "blocks.0.ffn.0"] + (["blocks.0.cross_attn.k_img"] if k_img else [])
        shapes = {"blocks.0.self_attn.q": (dim, dim), "blocks.0.ffn.0": (dim, ffn),
                  "blocks.0.cross_attn.k_img": (dim, dim)}
        sd = {}
        for name in names:
            stem = "diffusion_model." + name
            sd |= {f"{stem}.lora_A.weight": torch.ones(1, shapes[name][0]),
                   f"{stem}.lora_B.weight": torch.ones(shapes[name][1], 1), f"{stem}.alpha": torch.tensor(1.0)}
        save_file(sd, str(tmp_path / "x.safetensors"))
        return diagnose(tmp_path / "x.safetensors").fits

    assert fits(5120, 13824) == ["t2v-A14B", "i2v-A14B", "t2v-14B", "i2v-14B", "flf2v-14B", "t2i-14B",
                                 "vace-A14B", "vace-14B", "t2v-14B-FC", "i2v-14B-FC", "i2v-14B-InP", "i2v-A14B-InP",
                                 "t2v-A14B-FC", "i2v-A14B-FC"]
    assert fits(5120, 13824, k_img=True) == ["i2v-14B", "flf2v-14B", "t2v-14B-FC", "i2v-14B-FC", "i2v-14B-InP"]
    assert fits(3072, 14336) == ["ti2v-5B"]
    assert fits(1536, 8960) == ["t2v-1.3B", "vace-1.3B", "t2v-1.3B-FC", "i2v-1.3B-InP"]  # shared Linears


def test_dit_gives_relative_norms(tmp_path):
    dit_path = tmp_path / "dit.safetensors"
    dit_sd = tiny_dit_state_dict("t2v-tiny")
    save_file(dit_sd, str(dit_path))
    path = write_lora(tmp_path / "a.safetensors")
    dit = open_dit(dit_path, "t2v-tiny")
    report = diagnose(path, dit=dit)
    assert report.verdict == "OK"
    assert any("every module fits the DiT dit.safetensors (t2v-tiny)" in m for m in levels(report, "note"))
    rel = report.effect["relative_norm"]
    sd = load_file(str(path))
    name = rel["max_module"]
    kohya = "lora_unet_" + name.replace(".", "_")
    dense = torch.linalg.norm(sd[f"{kohya}.lora_up.weight"] @ sd[f"{kohya}.lora_down.weight"])
    expected = dense / torch.linalg.norm(dit_sd[name + ".weight"])  # ||delta|| / ||W||, alpha / rank = 1
    torch.testing.assert_close(torch.tensor(rel["max"], dtype=torch.float64), expected.double(), rtol=1e-5, atol=0)
    assert 0 < rel["median"] <= rel["max"]


def test_training_metadata_warnings(tmp_path):
    report = diagnose(write_lora(tmp_path / "a.safetensors", alpha=0.1, steps=120, learning_rate=1e-5))
    warnings = levels(report, "warning")
    assert report.verdict == "WARN" and len(warnings) == 3
    assert "effect scaled down by alpha/rank = 0.025 (alpha 0.1, rank 4)" in warnings[0]
    assert "trained for only 120 steps" in warnings[1] and "learning rate 1e-05 is below 2e-05" in warnings[2]


def test_cli_exit_codes_and_json(tmp_path, capsys):
    from library.errors import run_cli

    tool = _tool()
    good = write_lora(tmp_path / "good.safetensors")
    zero = write_lora(tmp_path / "zero.safetensors", up_std=0)
    out = tmp_path / "r.json"
    assert tool.main([str(good), "--task", "t2v-tiny", "--json", str(out)]) == 0
    assert tool.main([str(good), str(zero), "--json", str(out)]) == 1
    data = json.loads(out.read_text())
    assert [r["verdict"] for r in data] == ["OK", "ERROR"] and data[1]["reason"].startswith("this LoRA has no effect")
    assert "zero.safetensors: ERROR: this LoRA has no effect" in capsys.readouterr().out
    assert run_cli(tool.main, [str(good), "--task", "t2v-huge"]) == 2  # as `python tools/check_lora.py` runs it
    assert "unknown WAN task 't2v-huge'" in capsys.readouterr().err
    assert run_cli(tool.main, [str(good), "--dit", str(good)]) == 2  # a LoRA is not a DiT
    with pytest.raises(SystemExit) as exc:
        tool.main([])
    assert exc.value.code == 2

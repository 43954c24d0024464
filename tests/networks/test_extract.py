"""Extracting a LoRA from (base, tuned) DiTs: a known low-rank difference is recovered, the extracted LoRA
reproduces the tuned model, unchanged layers are skipped, files and metadata are what ComfyUI and our
loader expect, and bad pairs give clear errors."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

from library.lora_tools.extract import extract_lora
from library.wan.variants import get_variant
from networks.convert import read_modules
from networks.extract import expert_path, is_lora_target
from tests.helpers import random_official_dit_state
from tests.networks.test_merge import (TASK, attached, lora_deltas, model_from_state, rel_err, run, wan_inputs,
                                       write_dit)


def target_weights(sd) -> list[str]:
    return [k for k in sd if k.endswith(".weight") and sd[k].dim() == 2 and is_lora_target(k[: -len(".weight")])]


def known_deltas(sd, rank=3, seed=7, every=1, std=0.05) -> dict[str, torch.Tensor]:
    """Rank-`rank` differences for every `every`-th target weight, keyed by module name."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for key in target_weights(sd)[::every]:
        rows, cols = sd[key].shape
        low_rank = (torch.randn(rows, rank, generator=g) * std) @ torch.randn(rank, cols, generator=g)
        out[key[: -len(".weight")]] = low_rank
    return out


def write_pair(tmp_path, deltas, tuned_prefix="", extra=None):
    base = write_dit(tmp_path / "base.safetensors")

    def tune(sd):
        sd = {k: v.clone() for k, v in sd.items()}
        for module, delta in deltas.items():
            sd[module + ".weight"] += delta
        for key in extra or ():
            sd[key] += 0.1
        return sd

    tuned = write_dit(tmp_path / "tuned.safetensors", prefix=tuned_prefix, transform=tune)
    return base, tune(tuned)


def test_known_low_rank_difference_is_recovered_and_reproduces_the_tuned_model(tmp_path):
    base_sd = random_official_dit_state(get_variant(TASK))
    deltas = known_deltas(base_sd)
    base, tuned = write_pair(tmp_path, deltas, tuned_prefix="model.diffusion_model.", extra=["blocks.0.norm3.weight"])
    report = extract_lora(tmp_path / "base.safetensors", tmp_path / "tuned.safetensors", tmp_path / "x.safetensors",
                          dim=4, clamp_quantile=1.0)
    got = lora_deltas(tmp_path / "x.safetensors")
    assert set(got) == set(deltas) and len(got) == 20
    for module, delta in deltas.items():
        assert rel_err(got[module], delta) < 1e-4
    assert all(r.new_rank == 4 and r.fro_retained == pytest.approx(1.0, abs=1e-5) for r in report.ranks)
    assert report.other_changed == ["blocks.0.norm3.weight"] and not report.skipped

    inputs = wan_inputs()
    expected = run(model_from_state(tuned), inputs)
    model = model_from_state(base)
    assert rel_err(run(model, inputs), expected) > 1e-2
    tuned_no_norm = {k: v for k, v in tuned.items()}
    tuned_no_norm["blocks.0.norm3.weight"] = base["blocks.0.norm3.weight"]  # what a LoRA cannot carry
    attached(model, tmp_path / "x.safetensors")
    assert rel_err(run(model, inputs), run(model_from_state(tuned_no_norm), inputs)) < 1e-4

    clamped = extract_lora(tmp_path / "base.safetensors", tmp_path / "tuned.safetensors",
                           tmp_path / "c.safetensors", dim=4)  # the default 0.99 clamp: close, not exact
    errors = sorted(rel_err(d, deltas[m]) for m, d in lora_deltas(clamped.output).items())
    assert 1e-4 < errors[len(errors) // 2] < 0.2  # tiny layers: 2% of 256 entries clamped matters more than at 14B


def test_unchanged_layers_are_skipped_and_dynamic_rank_follows_the_spectrum(tmp_path):
    base_sd = random_official_dit_state(get_variant(TASK))
    deltas = known_deltas(base_sd, rank=2, every=2)  # half the targets change
    write_pair(tmp_path, deltas)
    report = extract_lora(tmp_path / "base.safetensors", tmp_path / "tuned.safetensors", tmp_path / "x.safetensors",
                          dim=8, dynamic_method="sv_ratio", dynamic_param=1e4, clamp_quantile=1.0)
    assert len(report.skipped) == 10 and set(report.skipped).isdisjoint(deltas)
    assert {r.name: r.new_rank for r in report.ranks} == {m: 2 for m in deltas}  # rank 2, not the ceiling 8
    modules, _ = read_modules(tmp_path / "x.safetensors")
    assert set(modules) == set(deltas)


def test_comfyui_format_expert_and_metadata(tmp_path):
    base_sd = random_official_dit_state(get_variant(TASK))
    write_pair(tmp_path, known_deltas(base_sd))
    out = expert_path(tmp_path / "style.safetensors", "high_noise")
    assert out.name == "style_high_noise.safetensors" and expert_path(out, "high_noise") == out
    extract_lora(tmp_path / "base.safetensors", tmp_path / "tuned.safetensors", out, dim=3, fmt="comfyui",
                 expert="high_noise", dtype=torch.bfloat16)
    with safe_open(str(out), framework="pt") as fh:
        keys, meta = list(fh.keys()), fh.metadata()
        up = fh.get_tensor("diffusion_model.blocks.0.self_attn.q.lora_B.weight")
    assert up.dtype == torch.bfloat16 and all(k.startswith("diffusion_model.blocks.") for k in keys)
    assert meta["modelspec.architecture"] == "wan2.2-t2v-tiny/lora" and meta["ss_expert"] == "high_noise"
    assert meta["ss_network_module"] == "networks.lora_wan" and meta["ss_network_dim"] == "3"
    assert meta["ss_network_alpha"] == "3" and meta["sshs_model_hash"]
    assert json.loads(meta["ss_extracted"])["tuned"] == "tuned.safetensors"


def test_bad_pairs_are_clear(tmp_path):
    write_dit(tmp_path / "base.safetensors")
    write_dit(tmp_path / "same.safetensors")
    write_dit(tmp_path / "ti2v.safetensors", task="ti2v-tiny")
    with pytest.raises(ValueError, match=r"base .* is t2v-tiny .* but the tuned model .* is ti2v-tiny"):
        extract_lora(tmp_path / "base.safetensors", tmp_path / "ti2v.safetensors", tmp_path / "x.safetensors")
    with pytest.raises(ValueError, match="does not differ from .* in any LoRA target layer"):
        extract_lora(tmp_path / "base.safetensors", tmp_path / "same.safetensors", tmp_path / "x.safetensors")
    with pytest.raises(ValueError, match="no such file or folder"):
        extract_lora(tmp_path / "base.safetensors", tmp_path / "nope", tmp_path / "x.safetensors")
    assert not (tmp_path / "x.safetensors").exists()


def test_cli(tmp_path, capsys):
    from tools.extract_lora import main

    base_sd = random_official_dit_state(get_variant(TASK))
    write_pair(tmp_path, known_deltas(base_sd, every=4))
    assert main(["--model_org", str(tmp_path / "base.safetensors"),
                 "--model_tuned", str(tmp_path / "tuned.safetensors"),
                 "--save_to", str(tmp_path / "x.safetensors"), "--dim", "3", "--expert", "low_noise"]) == 0
    out = capsys.readouterr().out
    assert "15 target layers unchanged (skipped)" in out and "x_low_noise.safetensors (t2v-tiny)" in out
    assert (tmp_path / "x_low_noise.safetensors").is_file()
    from library.errors import run_cli  # as `python tools/extract_lora.py` runs main

    assert run_cli(main, ["--model_org", str(tmp_path / "base.safetensors"), "--model_tuned",
                          str(tmp_path / "base.safetensors"), "--save_to", str(tmp_path / "y.safetensors")]) == 2
    assert "nothing to extract" in capsys.readouterr().err

"""Merging LoRAs into a DiT (every layout and precision) and into one LoRA: the merged model computes what
the base model with the LoRAs attached computes; bad inputs give clear errors."""

from __future__ import annotations

import json
import logging
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from library.lora_tools.merge import merge_into_dit
from library.wan.checkpoint_files import CheckpointError
from library.wan.fp8 import FP8Config, FP8Linear, quantize_weight
from library.wan.loading import load_dit
from library.wan.model import WanModel
from library.wan.variants import get_variant
from networks.convert import read_modules
from networks.lora_wan import build_lora_metadata, create_network, create_network_from_weights
from networks.merge import merge_lora_files
from tests.helpers import REPO, random_official_dit_state

TASK = "t2v-tiny"


# ---- helpers shared with test_resize / test_extract ---------------------------------------------------------


def write_dit(path, task=TASK, seed=0, prefix="", transform=None):
    """A tiny random DiT file (official names behind `prefix`); returns its fp32 official state dict."""
    sd = random_official_dit_state(get_variant(task), seed)
    tensors = transform(sd) if transform else sd
    save_file({prefix + k: v.contiguous() for k, v in tensors.items()}, str(path))
    return sd


def model_from_state(sd, task=TASK) -> WanModel:
    model = WanModel(get_variant(task)).eval()
    model.load_state_dict(sd)
    return model.requires_grad_(False)


def wan_inputs(task=TASK, seed=1):
    variant = get_variant(task)
    g = torch.Generator().manual_seed(seed)
    latent = torch.randn(1, variant.out_dim, 2, 4, 4, generator=g)  # [B, C, F, H, W]
    y = torch.randn(1, variant.in_dim - variant.out_dim, 2, 4, 4, generator=g) if variant.is_i2v else None
    return latent, torch.tensor([500.0]), [torch.randn(6, variant.text_dim, generator=g)], y


def run(model, inputs) -> torch.Tensor:
    latent, t, context, y = inputs
    with torch.no_grad():
        return model(latent, t, context, y=y).float()


def rel_err(a, b) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


def write_lora(path, task=TASK, rank=4, alpha=2.0, seed=3, fmt="kohya", expert=None, std=0.1):
    """A trained-looking WAN LoRA for the tiny model, saved by our network with WAN metadata."""
    variant = get_variant(task)
    torch.manual_seed(seed)
    net = create_network(1.0, rank, alpha, None, None, WanModel(variant))
    with torch.no_grad():
        for lora in net.loras:
            lora.lora_up.weight.normal_(0, std)
    meta = build_lora_metadata(variant.name, variant.version, expert=expert, network_dim=rank, network_alpha=alpha)
    net.save_weights(path, metadata=meta, fmt=fmt)
    return path


def attached(model, lora_path, strength=1.0):
    net, sd = create_network_from_weights(strength, lora_path, None, None, model, for_inference=True)
    net.load_weights(sd, strict=True)
    net.apply_to()
    return net


def lora_deltas(path) -> dict[str, torch.Tensor]:
    modules, _ = read_modules(path)
    return {n: p["up"].float() @ p["down"].float() * (float(p["alpha"]) / p["down"].shape[0])
            for n, p in modules.items()}


# ---- into a DiT ---------------------------------------------------------------------------------------------


def test_merged_dit_computes_what_the_attached_loras_compute(tmp_path):
    sd = write_dit(tmp_path / "base.safetensors")
    a = write_lora(tmp_path / "a.safetensors", rank=4, alpha=2.0, seed=3)
    b = write_lora(tmp_path / "b.safetensors", rank=2, alpha=1.0, seed=4, fmt="comfyui")
    out = tmp_path / "merged.safetensors"
    report = merge_into_dit(tmp_path / "base.safetensors", [(a, 1.0), (b, -0.5)], out, save_precision="fp32")
    assert report.merged_modules == 2 * 20 and not report.warnings

    inputs = wan_inputs()
    reference_model = model_from_state(sd)
    base_out = run(reference_model, inputs)
    attached(reference_model, a, 1.0), attached(reference_model, b, -0.5)
    expected = run(reference_model, inputs)
    got = run(load_dit(out, dtype=torch.float32), inputs)
    assert rel_err(expected, base_out) > 1e-2  # the LoRAs matter
    assert rel_err(got, expected) < 1e-5

    with safe_open(str(out), framework="pt") as fh:
        meta, keys = fh.metadata(), list(fh.keys())
    with safe_open(str(tmp_path / "base.safetensors"), framework="pt") as fh:
        assert keys == list(fh.keys())  # official names stay official, in the input's order
    records = json.loads(meta["ss_merged_loras"])
    assert [(r["file"], r["strength"]) for r in records] == [("a.safetensors", 1.0), ("b.safetensors", -0.5)]
    assert all(len(r["sha256"]) == 64 and r["sshs_model_hash"] for r in records)
    assert meta["ss_save_precision"] == "fp32" and meta["ss_merge_base"] == "base.safetensors"


def test_sharded_comfyui_layout_is_kept_and_fp8_scaled_output_loads(tmp_path):
    sd = write_dit(tmp_path / "single.safetensors")
    lora = write_lora(tmp_path / "a.safetensors")
    shards = tmp_path / "shards"  # ComfyUI-prefixed names in two shards with an index
    shards.mkdir()
    prefix, keys = "model.diffusion_model.", list(sd)
    half = {f"part-{i}.safetensors": dict(list(sd.items())[i::2]) for i in range(2)}
    for name, part in half.items():
        save_file({prefix + k: v for k, v in part.items()}, str(shards / name))
    weight_map = {prefix + k: n for n, part in half.items() for k in part}
    (shards / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))

    out = tmp_path / "merged_fp8.safetensors"
    merge_into_dit(shards, [(lora, 1.0)], out, save_precision="fp8_scaled")
    with safe_open(str(out), framework="pt") as fh:
        got_keys = set(fh.keys())
        q_weight = fh.get_tensor(prefix + "blocks.0.self_attn.q.weight")
        scale = fh.get_tensor(prefix + "blocks.0.self_attn.q.scale_weight")
        norm = fh.get_tensor(prefix + "blocks.0.norm3.weight")
    assert {prefix + k for k in keys} <= got_keys and prefix + "scaled_fp8" in got_keys
    assert q_weight.dtype == torch.float8_e4m3fn and scale.dtype == torch.float32 and scale.dim() == 0
    assert norm.dtype == torch.bfloat16

    reference = merge_into_dit(tmp_path / "single.safetensors", [(lora, 1.0)], tmp_path / "ref.safetensors",
                               save_precision="fp32").output
    inputs = wan_inputs()
    expected = run(load_dit(reference, dtype=torch.float32), inputs)
    assert rel_err(run(load_dit(out, dtype=torch.float32), inputs), expected) < 0.03  # fp8 rounding only (~1e-2)
    as_stored = load_dit(out, dtype=torch.float32, fp8=FP8Config())  # the fp8 weights used as stored
    assert isinstance(as_stored.blocks[1].ffn[2], FP8Linear)
    assert rel_err(run(as_stored, inputs), expected) < 0.03
    exact = merge_into_dit(shards, [(lora, 1.0)], tmp_path / "from_shards.safetensors", save_precision="fp32")
    assert rel_err(run(load_dit(exact.output, dtype=torch.float32), inputs), expected) < 1e-6


def test_fp8_scaled_base_is_dequantised_before_the_merge(tmp_path):
    scales = {}

    def to_fp8_scaled(sd):
        out = {}
        for k, v in sd.items():
            if k.startswith("blocks.") and v.dim() == 2 and "modulation" not in k:
                out[k], scales[k] = quantize_weight(v)
                out[k[: -len("weight")] + "weight_scale"] = scales[k]  # the other spelling, on input
            else:
                out[k] = v
        return out

    write_dit(tmp_path / "base_fp8.safetensors", prefix="diffusion_model.", transform=to_fp8_scaled)
    lora = write_lora(tmp_path / "a.safetensors")
    out = merge_into_dit(tmp_path / "base_fp8.safetensors", [(lora, 0.8)], tmp_path / "m.safetensors",
                         save_precision="fp32").output
    with safe_open(str(tmp_path / "base_fp8.safetensors"), framework="pt") as fh:
        base_q = fh.get_tensor("diffusion_model.blocks.1.ffn.2.weight")
    with safe_open(str(out), framework="pt") as fh:
        merged = fh.get_tensor("diffusion_model.blocks.1.ffn.2.weight")
        assert not any(k.endswith(("weight_scale", "scale_weight")) for k in fh.keys())
    expected = base_q.float() * scales["blocks.1.ffn.2.weight"] + 0.8 * lora_deltas(lora)["blocks.1.ffn.2"]
    torch.testing.assert_close(merged, expected, rtol=1e-6, atol=1e-6)


_TO_DIFFUSERS = [  # official -> diffusers names for the tiny T2V keys (checked against the loader's map below)
    (r"^(time|text)_embedding\.0\.", r"condition_embedder.\1_embedder.linear_1."),
    (r"^(time|text)_embedding\.2\.", r"condition_embedder.\1_embedder.linear_2."),
    (r"^time_projection\.1\.", "condition_embedder.time_proj."), (r"^head\.head\.", "proj_out."),
    (r"^head\.modulation$", "scale_shift_table"), (r"\.modulation$", ".scale_shift_table"),
    (r"\.norm3\.", ".norm2."), (r"\.ffn\.0\.", ".ffn.net.0.proj."), (r"\.ffn\.2\.", ".ffn.net.2."),
    (r"\.self_attn\.", ".attn1."), (r"\.cross_attn\.", ".attn2."), (r"\.q\.", ".to_q."), (r"\.k\.", ".to_k."),
    (r"\.v\.", ".to_v."), (r"\.o\.", ".to_out.0."),
]


def test_diffusers_layout_keeps_its_names(tmp_path):
    import re

    from library.wan.dit_formats import diffusers_to_official

    def to_diffusers(key):
        for pattern, repl in _TO_DIFFUSERS:
            key = re.sub(pattern, repl, key)
        return key

    sd = write_dit(tmp_path / "official.safetensors")
    names = {to_diffusers(k): k for k in sd}
    assert all(diffusers_to_official(d) == k for d, k in names.items()) and "proj_out.weight" in names
    save_file({d: sd[k] for d, k in names.items()}, str(tmp_path / "diffusers.safetensors"))
    lora = write_lora(tmp_path / "a.safetensors")
    out = merge_into_dit(tmp_path / "diffusers.safetensors", [(lora, 1.0)], tmp_path / "m.safetensors",
                         save_precision="fp32").output
    with safe_open(str(out), framework="pt") as fh:
        assert set(fh.keys()) == set(names)
    reference = merge_into_dit(tmp_path / "official.safetensors", [(lora, 1.0)], tmp_path / "r.safetensors",
                               save_precision="fp32").output
    inputs = wan_inputs()
    assert rel_err(run(load_dit(out), inputs), run(load_dit(reference), inputs)) < 1e-6


# ---- into one LoRA ------------------------------------------------------------------------------------------


def test_merge_into_one_lora_is_exact_and_reduces(tmp_path):
    a = write_lora(tmp_path / "a.safetensors", rank=4, alpha=2.0, seed=3, expert="high_noise")
    b = write_lora(tmp_path / "b_high_noise.safetensors", rank=3, alpha=6.0, seed=4, fmt="comfyui")
    out = tmp_path / "ab.safetensors"
    report = merge_lora_files([(a, 1.0), (b, -0.7)], out)
    da, db, got = lora_deltas(a), lora_deltas(b), lora_deltas(out)
    assert set(got) == set(da)
    for name in da:
        torch.testing.assert_close(got[name], da[name] - 0.7 * db[name], rtol=1e-5, atol=1e-7)
    with safe_open(str(out), framework="pt") as fh:
        meta = fh.metadata()
    assert meta["ss_network_dim"] == "7" and meta["ss_expert"] == "high_noise" and not report.warnings
    assert meta["modelspec.architecture"] == "wan2.2-t2v-tiny/lora"
    assert [r["strength"] for r in json.loads(meta["ss_merged_loras"])] == [1.0, -0.7]

    sd = random_official_dit_state(get_variant(TASK))
    inputs, model = wan_inputs(), model_from_state(sd)
    attached(model, a, 1.0), attached(model, b, -0.7)
    expected = run(model, inputs)
    merged_model = model_from_state(sd)
    attached(merged_model, out)
    assert rel_err(run(merged_model, inputs), expected) < 1e-5

    small = merge_lora_files([(a, 1.0), (b, -0.7)], tmp_path / "ab4.safetensors", new_rank=4)
    assert {r.new_rank for r in small.ranks} == {4} and all(0.5 < r.fro_retained < 1 for r in small.ranks)
    full = merge_lora_files([(a, 1.0), (b, -0.7)], tmp_path / "ab7.safetensors", new_rank=7)
    for name, delta in lora_deltas(full.output).items():
        torch.testing.assert_close(delta, got[name], rtol=1e-4, atol=1e-6)


# ---- clear errors --------------------------------------------------------------------------------------------


def _foreign_lora(path, modules):
    tensors = {}
    for name, (out_dim, in_dim) in modules.items():
        stem = "lora_unet_" + name.replace(".", "_")
        tensors |= {f"{stem}.lora_down.weight": torch.randn(4, in_dim),
                    f"{stem}.lora_up.weight": torch.randn(out_dim, 4),
                    f"{stem}.alpha": torch.tensor(4.0)}
    save_file(tensors, str(path), metadata={"modelspec.architecture": "wan2.1-t2v-14b/lora"})
    return path


def test_errors_name_the_module_the_shapes_and_the_cause(tmp_path):
    write_dit(tmp_path / "base.safetensors")
    big = _foreign_lora(tmp_path / "big.safetensors", {"blocks.0.self_attn.q": (48, 48)})
    with pytest.raises(ValueError, match=r"blocks\.0\.self_attn\.q is \[48, 48\] but the DiT weight "
                                         r"blocks\.0\.self_attn\.q\.weight is \[32, 32\]"
                                         r".*another model \(wan2\.1-t2v-14b"):
        merge_into_dit(tmp_path / "base.safetensors", [(big, 1.0)], tmp_path / "o.safetensors")
    deep = _foreign_lora(tmp_path / "deep.safetensors", {"blocks.7.ffn.0": (64, 32)})
    with pytest.raises(ValueError,
                       match=r"module blocks\.7\.ffn\.0 matches no weight of the DiT \(t2v-tiny, 2 blocks\)"):
        merge_into_dit(tmp_path / "base.safetensors", [(deep, 1.0)], tmp_path / "o.safetensors")
    with pytest.raises(FileNotFoundError, match="missing.safetensors: LoRA file not found"):
        merge_into_dit(tmp_path / "base.safetensors", [(tmp_path / "missing.safetensors", 1.0)],
                       tmp_path / "o.safetensors")
    lora = write_lora(tmp_path / "a.safetensors")
    with pytest.raises(CheckpointError, match="no such file or folder"):
        merge_into_dit(tmp_path / "nodit.safetensors", [(lora, 1.0)], tmp_path / "o.safetensors")
    with pytest.raises(ValueError, match="different shapes in the LoRAs"):
        merge_lora_files([(lora, 1.0), (_foreign_lora(tmp_path / "f.safetensors", {"blocks.0.ffn.0": (96, 48)}), 1.0)],
                         tmp_path / "o.safetensors")
    assert not (tmp_path / "o.safetensors").exists()


def test_lora_for_the_other_expert_warns(tmp_path, caplog):
    write_dit(tmp_path / "wan_low_noise.safetensors")
    high = write_lora(tmp_path / "style.safetensors", expert="high_noise")
    with caplog.at_level(logging.WARNING):
        report = merge_into_dit(tmp_path / "wan_low_noise.safetensors", [(high, 1.0)], tmp_path / "o.safetensors")
    assert "style.safetensors is a high_noise expert LoRA but the DiT wan_low_noise.safetensors is the low_noise" \
        in report.warnings[0]
    assert "high_noise expert LoRA" in caplog.text
    named = write_lora(tmp_path / "style_low_noise.safetensors")  # expert from the file name, no metadata
    report = merge_into_dit(tmp_path / "wan_low_noise.safetensors", [(named, 1.0)], tmp_path / "o2.safetensors",
                            expert="high_noise")
    assert len(report.warnings) == 1 and "low_noise expert LoRA" in report.warnings[0]


# ---- the CLI ------------------------------------------------------------------------------------------------


def test_cli_end_to_end(tmp_path, capsys):
    from tools.merge_lora import main

    write_dit(tmp_path / "base.safetensors")
    a, b = write_lora(tmp_path / "a.safetensors"), write_lora(tmp_path / "b.safetensors", seed=5)
    assert main(["--dit", str(tmp_path / "base.safetensors"), "--loras", str(a), str(b), "--strengths", "1", "0.5",
                 "--save_to", str(tmp_path / "m.safetensors")]) == 0
    with safe_open(str(tmp_path / "m.safetensors"), framework="pt") as fh:
        assert fh.get_tensor("blocks.0.ffn.0.weight").dtype == torch.bfloat16  # the default precision
    assert main(["--merge_into_lora", "--models", str(a), str(b), "--ratios", "1", "0.5", "--new_rank", "6",
                 "--save_to", str(tmp_path / "ab.safetensors"), "--format", "comfyui"]) == 0
    assert "mean rank 8.0 -> 6.0" in capsys.readouterr().out
    run_ = subprocess.run([sys.executable, str(REPO / "tools" / "merge_lora.py"),
                           "--dit", str(tmp_path / "base.safetensors"),
                           "--loras", str(tmp_path / "nope.safetensors"), "--save_to", str(tmp_path / "x.safetensors")],
                          capture_output=True, text=True)
    assert run_.returncode == 2 and "nope.safetensors: LoRA file not found" in run_.stderr


def test_the_base_is_never_overwritten(tmp_path):
    write_dit(tmp_path / "base.safetensors")
    before = (tmp_path / "base.safetensors").read_bytes()
    with pytest.raises(ValueError, match="is the base DiT itself"):
        merge_into_dit(tmp_path / "base.safetensors", [(write_lora(tmp_path / "a.safetensors"), 1.0)],
                       tmp_path / "base.safetensors")
    assert (tmp_path / "base.safetensors").read_bytes() == before

"""Resizing LoRAs by SVD: full rank is exact, lower ranks keep the dominant directions, the dynamic methods
choose the rank their definitions say, metadata and format follow."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from networks.convert import read_modules
from networks.resize import choose_rank, resize_lora
from tests.networks.test_merge import attached, lora_deltas, model_from_state, rel_err, run, wan_inputs, write_lora

SPECTRUM = [8.0, 4.0, 2.0, 1.0, 0.5, 0.25]


def orthonormal(rows, cols, seed):
    q, _ = torch.linalg.qr(torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed)))
    return q  # [rows, cols], orthonormal columns


def spectral_lora(path, spectra: dict, fmt="kohya", alpha=3.0, dims=(32, 64)):
    """A LoRA whose module deltas are U diag(S) V^T with known S (alpha folded in), saved in `fmt`."""
    tensors, truth = {}, {}
    for i, (name, S) in enumerate(spectra.items()):
        rank, S = len(S), torch.tensor(S)
        U, V = orthonormal(dims[0], rank, 2 * i), orthonormal(dims[1], rank, 2 * i + 1)
        scale = alpha / rank
        up, down = U * S / scale, V.T  # up @ down * scale = U S V^T
        truth[name] = (U, S, V)
        stem = ("lora_unet_" + name.replace(".", "_")) if fmt == "kohya" else f"diffusion_model.{name}"
        d, u = ("lora_down", "lora_up") if fmt == "kohya" else ("lora_A", "lora_B")
        tensors |= {f"{stem}.{d}.weight": down.contiguous(), f"{stem}.{u}.weight": up.contiguous(),
                    f"{stem}.alpha": torch.tensor(alpha)}
    save_file(tensors, str(path), metadata={"ss_network_dim": str(len(SPECTRUM)), "ss_network_alpha": str(alpha),
                                            "modelspec.architecture": "wan2.2-t2v-tiny/lora"})
    return truth


def test_full_rank_is_exact_and_lower_rank_keeps_the_dominant_directions(tmp_path):
    truth = spectral_lora(tmp_path / "in.safetensors",
                          {"blocks.0.ffn.0": SPECTRUM, "blocks.1.self_attn.q": SPECTRUM[:4]})
    original = lora_deltas(tmp_path / "in.safetensors")
    resize_lora(tmp_path / "in.safetensors", tmp_path / "full.safetensors", new_rank=6)
    for name, delta in lora_deltas(tmp_path / "full.safetensors").items():
        assert rel_err(delta, original[name]) < 1e-5
    report = resize_lora(tmp_path / "in.safetensors", tmp_path / "r2.safetensors", new_rank=2)
    got = lora_deltas(tmp_path / "r2.safetensors")
    for name, (U, S, V) in truth.items():
        dominant = U[:, :2] @ torch.diag(S[:2]) @ V[:, :2].T
        assert rel_err(got[name], dominant) < 1e-5
    kept = {r.name: r for r in report}
    assert kept["blocks.0.ffn.0"].old_rank == 6 and kept["blocks.0.ffn.0"].new_rank == 2
    assert kept["blocks.0.ffn.0"].fro_retained == pytest.approx(math.sqrt(80 / sum(s * s for s in SPECTRUM)), rel=1e-5)
    modules, _ = read_modules(tmp_path / "r2.safetensors")
    assert all(p["down"].shape[0] == 2 and float(p["alpha"]) == 2.0 for p in modules.values())  # alpha = rank
    resize_lora(tmp_path / "in.safetensors", tmp_path / "big.safetensors", new_rank=64)  # never above the old
    assert {p["down"].shape[0] for p in read_modules(tmp_path / "big.safetensors")[0].values()} == {6, 4}


def test_dynamic_methods_choose_the_rank_their_definition_says():
    S = torch.tensor(SPECTRUM)  # squares 64 16 4 1 .25 .0625: sqrt cumulative fractions .866 .968 .992 ...
    assert choose_rank(S, method="sv_ratio", param=4) == 3  # S >= 8 / 4 = 2
    assert choose_rank(S, method="sv_ratio", param=10) == 4  # S >= 0.8
    assert choose_rank(S, method="sv_ratio", param=1) == 1
    assert choose_rank(S, method="sv_fro", param=0.9) == 2  # sqrt(80 / 85.3) = 0.968 >= 0.9 > 0.866
    assert choose_rank(S, method="sv_fro", param=0.99) == 3  # 0.992
    assert choose_rank(S, method="sv_cumulative", param=0.9) == 4  # 15 / 15.75 = 0.952 >= 0.9 > 14 / 15.75
    assert choose_rank(S, method="sv_cumulative", param=0.5) == 1  # 8 / 15.75 = 0.508
    assert choose_rank(S, method="sv_cumulative", param=12 / 15.75) == 2  # a target met exactly
    assert choose_rank(S, max_rank=3, method="sv_cumulative", param=1.0) == 3  # the ceiling
    assert choose_rank(S, max_rank=4) == 4 and choose_rank(S, max_rank=100) == 6
    assert choose_rank(torch.zeros(4), method="sv_fro", param=0.5) == 1  # an all-zero delta


def test_dynamic_resize_of_a_file_keeps_the_format_and_updates_metadata(tmp_path):
    spectral_lora(tmp_path / "in.safetensors", {"blocks.0.ffn.0": SPECTRUM, "blocks.0.ffn.2": [5.0, 4.9, 4.8, 0.01]},
                  fmt="comfyui")
    report = resize_lora(tmp_path / "in.safetensors", tmp_path / "out.safetensors", dynamic_method="sv_ratio",
                         dynamic_param=3, new_alpha=1.0)
    assert {r.name: r.new_rank for r in report} == {"blocks.0.ffn.0": 2, "blocks.0.ffn.2": 3}
    with safe_open(str(tmp_path / "out.safetensors"), framework="pt") as fh:
        keys, meta = list(fh.keys()), fh.metadata()
    assert all(k.startswith("diffusion_model.") and ("lora_A" in k or "lora_B" in k or k.endswith(".alpha"))
               for k in keys)
    assert meta["ss_network_dim"] == "Dynamic" and meta["ss_network_alpha"] == "1"
    assert meta["modelspec.architecture"] == "wan2.2-t2v-tiny/lora" and meta["sshs_model_hash"]
    note = json.loads(meta["ss_resize"])
    assert note["dynamic_method"] == "sv_ratio" and note["mean_rank"] == 2.5
    assert meta["ss_training_comment"] == "rank resized from 4-6 to 2-3"
    modules, _ = read_modules(tmp_path / "out.safetensors")
    assert all(float(p["alpha"]) == 1.0 for p in modules.values())


def test_resized_trained_lora_loads_and_computes_close(tmp_path):
    from tests.helpers import random_official_dit_state
    from library.wan.variants import get_variant

    lora = write_lora(tmp_path / "a.safetensors", rank=8, alpha=4.0)
    resize_lora(lora, tmp_path / "a8.safetensors", new_rank=8, dtype=torch.bfloat16)
    sd, inputs = random_official_dit_state(get_variant("t2v-tiny")), wan_inputs()
    reference = model_from_state(sd)
    attached(reference, lora)
    resized = model_from_state(sd)
    attached(resized, tmp_path / "a8.safetensors")
    assert rel_err(run(resized, inputs), run(reference, inputs)) < 1e-2  # bf16 storage
    with safe_open(str(tmp_path / "a8.safetensors"), framework="pt") as fh:
        assert fh.get_tensor("lora_unet_blocks_0_ffn_0.lora_up.weight").dtype == torch.bfloat16


def test_bad_requests_are_clear(tmp_path):
    spectral_lora(tmp_path / "in.safetensors", {"blocks.0.ffn.0": SPECTRUM})
    with pytest.raises(ValueError, match="give a new rank"):
        resize_lora(tmp_path / "in.safetensors", tmp_path / "o.safetensors")
    with pytest.raises(ValueError, match="sv_ratio keeps singular values >= max / X: X must be >= 1"):
        resize_lora(tmp_path / "in.safetensors", tmp_path / "o.safetensors", dynamic_method="sv_ratio",
                    dynamic_param=0.5)
    with pytest.raises(ValueError, match="sv_fro needs --dynamic_param"):
        resize_lora(tmp_path / "in.safetensors", tmp_path / "o.safetensors", dynamic_method="sv_fro")
    with pytest.raises(FileNotFoundError, match="nope.safetensors: LoRA file not found"):
        resize_lora(tmp_path / "nope.safetensors", tmp_path / "o.safetensors", new_rank=2)
    assert not (tmp_path / "o.safetensors").exists()


def test_cli(tmp_path, capsys):
    from tools.resize_lora import main

    spectral_lora(tmp_path / "in.safetensors", {"blocks.0.ffn.0": SPECTRUM})
    assert main(["--model", str(tmp_path / "in.safetensors"), "--save_to", str(tmp_path / "o.safetensors"),
                 "--dynamic_method", "sv_fro", "--dynamic_param", "0.99", "--verbose"]) == 0
    out = capsys.readouterr().out
    assert "blocks.0.ffn.0: rank 6 -> 3" in out and "1 modules: mean rank 6.0 -> 3.0" in out
    from library.errors import run_cli  # as `python tools/resize_lora.py` runs main

    assert run_cli(main, ["--model", str(tmp_path / "in.safetensors"), "--save_to", str(tmp_path / "p.safetensors"),
                          "--dynamic_method", "sv_fro", "--dynamic_param", "2"]) == 2
    assert "must be in (0, 1]" in capsys.readouterr().err

"""Files ComfyUI reads: `merge_lora.py --save_precision fp8_scaled` DiTs checked through ComfyUI's own key and
dtype rules (`tests/networks/comfyui_rules.py`, written from ComfyUI v0.3.64, commit 6372219), and diffusers
LoRAs with the WAN 2.1 I2V image layers read back by our merge and generation."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

from library.lora_tools.merge import merge_into_dit
from library.wan.fp8 import quantize_weight
from library.wan.loading import load_dit
from library.wan.model import WanModel
from library.wan.variants import get_variant
from networks.convert import convert_lora, read_modules
from networks.lora_wan import create_network
from tests.helpers import random_official_dit_state
from tests.networks.comfyui_rules import load_like_comfyui
from tests.networks.test_merge import rel_err, wan_inputs, write_lora

COMFY_PREFIX = "model.diffusion_model."


def _base(path, task: str, prefix: str = "") -> dict:
    """A tiny DiT whose text embedding has the small weights of a real one (std 0.004: unscaled e4m3
    would flush many of them to zero)."""
    sd = random_official_dit_state(get_variant(task), seed=0)
    sd["text_embedding.0.weight"] = torch.randn_like(sd["text_embedding.0.weight"]) * 0.004
    save_file({prefix + k: v for k, v in sd.items()}, str(path))
    return sd


def _run(model, task: str) -> torch.Tensor:
    latent, t, context, y = wan_inputs(task)
    variant = get_variant(task)
    clip = torch.randn(1, 257, variant.clip_dim, generator=torch.Generator().manual_seed(2)) \
        if variant.image_embedding else None
    with torch.no_grad():
        return model(latent, t, context, y=y, clip_fea=clip).float()


def _model_keys(task: str) -> set[str]:
    return set(WanModel(get_variant(task)).state_dict())


def _flushed(reference: torch.Tensor, got: torch.Tensor) -> float:
    """Share of the non-zero weights that came out as exactly zero."""
    nonzero = reference != 0
    return float(((got == 0) & nonzero).sum() / nonzero.sum())


@pytest.mark.parametrize("task,prefix", [("t2v-tiny", ""), ("t2v-tiny", COMFY_PREFIX), ("i2v-tiny-2.1", "")])
def test_fp8_scaled_merge_loads_in_comfyui_with_every_scale(tmp_path, task, prefix):
    _base(tmp_path / "base.safetensors", task, prefix)
    lora = write_lora(tmp_path / "a.safetensors", task=task)
    exact = merge_into_dit(tmp_path / "base.safetensors", [(lora, 1.0)], tmp_path / "fp32.safetensors",
                           save_precision="fp32").output
    out = merge_into_dit(tmp_path / "base.safetensors", [(lora, 1.0)], tmp_path / "fp8.safetensors",
                         save_precision="fp8_scaled").output
    reference = {k.removeprefix(prefix): v for k, v in load_file(str(exact)).items()}
    state = load_file(str(out))
    comfy = load_like_comfyui(state, _model_keys(task))

    assert comfy.scaled_fp8 == torch.float8_e4m3fn and not comfy.fp8_optimizations  # no scale_input expected
    assert comfy.missing == [] and comfy.unexpected == []  # zero unloaded keys, every scale present
    expected_linears = 2 * (10 + (2 if task == "i2v-tiny-2.1" else 0)) + 6 + (2 if task == "i2v-tiny-2.1" else 0)
    assert len(comfy.linears) == expected_linears
    for name in comfy.linears:  # every Linear ComfyUI quantises has an e4m3 weight and a scalar fp32 scale
        assert state[f"{prefix}{name}.weight"].dtype == torch.float8_e4m3fn, name
        assert state[f"{prefix}{name}.scale_weight"].dtype == torch.float32, name
        assert state[f"{prefix}{name}.scale_weight"].dim() == 0, name
        want, got = reference[f"{name}.weight"], comfy.weights[f"{name}.weight"]
        # e4m3 keeps 3 mantissa bits: at most half a step (16 / 448 of the tensor's largest magnitude) off
        assert float((got - want).abs().max() / want.abs().max()) <= 16 / 448 + 1e-6, name
        assert rel_err(got, want) < 0.04, name
        assert _flushed(want, got) < 1e-3, name
    assert state[f"{prefix}blocks.0.norm3.weight"].dtype == torch.bfloat16  # not a Linear: bf16
    got, want = _run(load_dit(out, dtype=torch.float32), task), _run(load_dit(exact, dtype=torch.float32), task)
    assert rel_err(got, want) < 0.06  # fp8 rounding through every layer


def test_the_rules_catch_an_unscaled_embedding_and_an_empty_marker(tmp_path):
    """The file the issue reported (block Linears only, an empty marker) fails these checks."""
    sd = _base(tmp_path / "base.safetensors", "t2v-tiny")
    old = {}
    for k, v in sd.items():
        if k.startswith("blocks.") and k.endswith(".weight") and v.dim() == 2:
            old[k], scale = quantize_weight(v, scaled=True)
            old[k[: -len("weight")] + "scale_weight"] = scale
        else:
            old[k] = v.to(torch.bfloat16)
    old["scaled_fp8"] = torch.empty(0, dtype=torch.float8_e4m3fn)
    comfy = load_like_comfyui(old, _model_keys("t2v-tiny"))
    assert comfy.fp8_optimizations  # an empty marker: ComfyUI expects input scales
    assert "blocks.0.self_attn.q.scale_input" in comfy.missing
    for name in ("text_embedding.0", "text_embedding.2", "time_embedding.0", "time_embedding.2",
                 "time_projection.1", "head.head"):
        assert f"{name}.scale_weight" in comfy.missing
    flushed = _flushed(sd["text_embedding.0.weight"], comfy.weights["text_embedding.0.weight"])
    assert flushed > 0.1  # rounded to fp8 unscaled, many small weights become zero


def _i2v_lora_with_image_layers(path):
    """A WAN 2.1 I2V LoRA that also trains the image MLP (`img_emb.proj.1/3`, via include_patterns)."""
    torch.manual_seed(0)
    net = create_network(1.0, 4, 2.0, None, None, WanModel(get_variant("i2v-tiny-2.1")),
                         include_patterns=[r"img_emb\.proj\.(1|3)"])
    for lora in net.loras:
        torch.nn.init.normal_(lora.lora_up.weight, std=0.1)
    assert {"img_emb.proj.1", "img_emb.proj.3"} <= {lo.official_name for lo in net.loras}
    net.save_weights(path)
    return path


def test_diffusers_lora_with_image_layers_is_read_back(tmp_path):
    from library.sampling.loras import LoraSpec, attach_loras, detach_loras

    kohya = _i2v_lora_with_image_layers(tmp_path / "k.safetensors")
    diffusers = convert_lora(kohya, tmp_path / "d.safetensors", "diffusers")
    assert any("condition_embedder.image_embedder.ff.net.0.proj" in k for k in load_file(str(diffusers)))
    modules, _ = read_modules(diffusers)
    assert {"img_emb.proj.1", "img_emb.proj.3"} <= set(modules)
    back = convert_lora(diffusers, tmp_path / "k2.safetensors", "kohya")
    assert set(read_modules(back)[0]) == set(read_modules(kohya)[0])

    sd = random_official_dit_state(get_variant("i2v-tiny-2.1"))
    save_file(sd, str(tmp_path / "dit.safetensors"))
    for lora in (kohya, diffusers):
        report = merge_into_dit(tmp_path / "dit.safetensors", [(lora, 1.0)], tmp_path / f"m_{lora.stem}.safetensors",
                                save_precision="fp32")
        assert report.merged_modules == len(modules)
    merged = [load_file(str(tmp_path / f"m_{n}.safetensors")) for n in ("k", "d")]
    for key in ("img_emb.proj.1.weight", "blocks.0.cross_attn.k_img.weight"):
        assert not torch.equal(merged[0][key], sd[key])
        torch.testing.assert_close(merged[1][key], merged[0][key], rtol=1e-5, atol=1e-6)

    model = load_dit(tmp_path / "dit.safetensors", task="i2v-tiny-2.1")
    loaded = attach_loras([LoraSpec(diffusers)], {"dit": model}, model.variant)
    try:
        assert loaded[0].report.applied == len(modules) and not loaded[0].report.not_in_model
    finally:
        detach_loras(loaded)

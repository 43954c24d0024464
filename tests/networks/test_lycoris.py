"""LyCORIS LoHa / LoKr files (synthetic, in LyCORIS's key format; LyCORIS itself is not needed) work wherever
our LoRAs work: generation hooks, merging into a DiT and into one LoRA, conversion to the keys ComfyUI loads,
check_lora. Every weight change is checked against ComfyUI's rules (`comfyui_lycoris_rules.py`)."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

from library.wan.model import WanModel
from library.wan.variants import get_variant
from networks.convert import convert_lora, read_modules
from networks.resize import module_scale
from tests.helpers import random_official_dit_state
from tests.networks.comfyui_lycoris_rules import apply_like_comfyui

VARIANT = "i2v-tiny-2.1"  # one DiT, every Linear kind (k_img / v_img too)
TARGETS = ("self_attn.q", "self_attn.o", "cross_attn.k", "cross_attn.k_img", "ffn.0", "ffn.2")


def _factors(n: int) -> tuple[int, int]:
    return 4, n // 4


def lycoris_state(weights: dict, kind: str, seed: int = 0, fmt: str = "kohya") -> dict[str, torch.Tensor]:
    """LyCORIS tensors for the TARGETS of every block: `loha`, `lokr` (full w1, decomposed w2, as LyCORIS's
    defaults), `lokr_w1ab` (decomposed w1, full w2) or `lokr_full` (both full)."""
    g = torch.Generator().manual_seed(seed)
    rnd = lambda *shape: torch.randn(*shape, generator=g) * 0.3  # noqa: E731
    sd = {}
    for name, w in weights.items():
        module = name[: -len(".weight")]
        if not name.endswith(".weight") or not module.endswith(TARGETS) or not module.startswith("blocks."):
            continue
        stem = "lora_unet_" + module.replace(".", "_") if fmt == "kohya" else "diffusion_model." + module
        out, inp = w.shape
        (ao, bo), (ai, bi) = _factors(out), _factors(inp)
        if kind == "loha":
            sd |= {f"{stem}.hada_w1_a": rnd(out, 2), f"{stem}.hada_w1_b": rnd(2, inp), f"{stem}.hada_w2_a": rnd(out, 2),
                   f"{stem}.hada_w2_b": rnd(2, inp), f"{stem}.alpha": torch.tensor(1.5)}
        elif kind == "lokr":
            sd |= {f"{stem}.lokr_w1": rnd(ao, ai), f"{stem}.lokr_w2_a": rnd(bo, 3), f"{stem}.lokr_w2_b": rnd(3, bi),
                   f"{stem}.alpha": torch.tensor(2.0)}
        elif kind == "lokr_w1ab":
            sd |= {f"{stem}.lokr_w1_a": rnd(ao, 2), f"{stem}.lokr_w1_b": rnd(2, ai), f"{stem}.lokr_w2": rnd(bo, bi),
                   f"{stem}.alpha": torch.tensor(3.0)}
        else:  # both factors full: ComfyUI ignores alpha
            sd |= {f"{stem}.lokr_w1": rnd(ao, ai), f"{stem}.lokr_w2": rnd(bo, bi), f"{stem}.alpha": torch.tensor(7.0)}
    return sd


KINDS = ("loha", "lokr", "lokr_w1ab", "lokr_full")


@pytest.fixture(scope="module")
def base():
    return random_official_dit_state(get_variant(VARIANT))


@pytest.mark.parametrize("fmt", ["kohya", "comfyui"])
@pytest.mark.parametrize("kind", KINDS)
def test_exact_lora_equivalent_matches_comfyui(base, tmp_path, kind, fmt):
    sd = lycoris_state(base, kind, fmt=fmt)
    save_file(sd, str(tmp_path / "x.safetensors"))
    patched, not_loaded = apply_like_comfyui(sd, base)
    assert not_loaded == [] and len(patched) == 2 * len(TARGETS)
    modules, _ = read_modules(tmp_path / "x.safetensors")
    assert set(modules) == {n[: -len(".weight")] for n in patched}
    for name, parts in modules.items():
        delta = parts["up"] @ parts["down"] * module_scale(parts)
        torch.testing.assert_close(base[name + ".weight"] + delta, patched[name + ".weight"], rtol=1e-5, atol=1e-6)


def test_generation_applies_them_like_comfyui(base, tmp_path):
    from library.sampling.loras import LoraSpec, attach_loras, detach_loras, scale_strengths

    variant = get_variant(VARIANT)
    model = WanModel(variant).eval()
    model.load_state_dict(base)
    files = {}
    for i, kind in enumerate(("loha", "lokr")):
        files[kind] = lycoris_state(base, kind, seed=i)
        save_file(files[kind], str(tmp_path / f"{kind}.safetensors"))
    patched = dict(base)
    for kind, strength in (("loha", 0.7), ("lokr", -0.4)):
        patched |= apply_like_comfyui(files[kind], {k: patched[k] for k in base}, strength)[0]
    reference = WanModel(variant).eval()
    reference.load_state_dict(patched)
    torch.manual_seed(0)
    x, y = torch.randn(1, 16, 2, 4, 4), torch.randn(1, 20, 2, 4, 4)
    args = (x, torch.tensor([500.0]), [torch.randn(5, variant.text_dim)])
    kw = dict(y=y, clip_fea=torch.randn(1, 257, variant.clip_dim))
    loaded = attach_loras([LoraSpec(tmp_path / "loha.safetensors", 0.7), LoraSpec(tmp_path / "lokr.safetensors", -0.4)],
                          {"dit": model}, variant)
    try:
        assert [lo.report.applied for lo in loaded] == [2 * len(TARGETS)] * 2
        with torch.no_grad():
            got, expected = model(*args, **kw), reference(*args, **kw)
            torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
            scale_strengths(loaded, 0.0)
            base_out = model(*args, **kw)
        assert (base_out - got).abs().max() > 1e-3
    finally:
        detach_loras(loaded)


def test_merging_into_a_dit_and_into_one_lora(base, tmp_path):
    from library.lora_tools.merge import merge_into_dit
    from networks.merge import merge_lora_files

    save_file(base, str(tmp_path / "dit.safetensors"))
    save_file(lycoris_state(base, "loha"), str(tmp_path / "loha.safetensors"))
    save_file(lycoris_state(base, "lokr", seed=1), str(tmp_path / "lokr.safetensors"))
    loras = [(tmp_path / "loha.safetensors", 0.5), (tmp_path / "lokr.safetensors", 1.0)]
    merge_into_dit(tmp_path / "dit.safetensors", loras, tmp_path / "merged.safetensors", save_precision="fp32",
                   task=VARIANT)
    merged = load_file(str(tmp_path / "merged.safetensors"))
    expected = apply_like_comfyui(load_file(str(tmp_path / "loha.safetensors")), base, 0.5)[0]
    expected = apply_like_comfyui(load_file(str(tmp_path / "lokr.safetensors")), {**base, **expected}, 1.0)[0]
    for name, weight in expected.items():
        torch.testing.assert_close(merged[name], weight, rtol=1e-5, atol=1e-5)
    merge_lora_files([(tmp_path / "loha.safetensors", 0.5), (tmp_path / "lokr.safetensors", 1.0)],
                     tmp_path / "one.safetensors")
    one, _ = read_modules(tmp_path / "one.safetensors")
    for name, parts in one.items():
        torch.testing.assert_close(base[name + ".weight"] + parts["up"] @ parts["down"] * module_scale(parts),
                                   expected[name + ".weight"], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", ["loha", "lokr"])
def test_conversion_keeps_the_keys_comfyui_loads(base, tmp_path, kind):
    sd = lycoris_state(base, kind)
    save_file(sd, str(tmp_path / "k.safetensors"), metadata={"ss_network_module": "lycoris.kohya"})
    comfy = load_file(str(convert_lora(tmp_path / "k.safetensors", tmp_path / "c.safetensors", "comfyui")))
    assert "diffusion_model.blocks.0.self_attn.q.alpha" in comfy
    assert all(k.startswith("diffusion_model.blocks.") for k in comfy)
    expected, _ = apply_like_comfyui(sd, base)
    got, not_loaded = apply_like_comfyui(comfy, base)
    assert not_loaded == [] and set(got) == set(expected)
    for name in got:
        torch.testing.assert_close(got[name], expected[name])
    back = load_file(str(convert_lora(tmp_path / "c.safetensors", tmp_path / "k2.safetensors", "kohya")))
    assert set(back) == set(sd) and all(torch.equal(back[k], sd[k]) for k in sd)
    diffusers = convert_lora(tmp_path / "k.safetensors", tmp_path / "d.safetensors", "diffusers")  # exact LoRA
    assert any(".attn1.to_q.lora_A.weight" in k for k in load_file(str(diffusers)))
    modules, _ = read_modules(diffusers)
    for name, parts in modules.items():
        torch.testing.assert_close(base[name + ".weight"] + parts["up"] @ parts["down"] * module_scale(parts),
                                   expected[name + ".weight"], rtol=1e-5, atol=1e-5)


def test_check_lora_reads_them_and_names_what_it_cannot(base, tmp_path):
    from library.diagnostics.checks import diagnose

    save_file(lycoris_state(base, "lokr"), str(tmp_path / "lokr.safetensors"))
    report = diagnose(tmp_path / "lokr.safetensors", task=VARIANT)
    assert report.verdict in ("OK", "WARN") and not [f for f in report.findings if f.level == "error"]
    assert any("LyCORIS LoKr network" in f.message for f in report.findings) and report.modules == 2 * len(TARGETS)
    sd = lycoris_state(base, "loha")
    sd["lora_unet_blocks_0_ffn_0.hada_t1"] = torch.zeros(2, 2, 3, 3)
    save_file(sd, str(tmp_path / "tucker.safetensors"))
    report = diagnose(tmp_path / "tucker.safetensors")
    assert report.verdict == "ERROR" and any("Tucker factors" in f.message for f in report.findings)

"""LoRA stacking, per-expert pairing, other-variant and corrupt files; Kohya prompt lines and files."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from library.sampling.generate import generate
from library.sampling.loras import (LoraError, LoraSpec, assign_experts, attach_loras, detach_loras,
                                    parse_lora_spec, partner_of, scale_strengths)
from library.sampling.prompts import PromptError, SampleRequest, parse_prompt_line, read_prompt_file
from tests.sampling.conftest import load_models, write_lora

FAST = dict(steps=2, frames=1, width=32, height=32, seed=5)


@pytest.fixture(scope="module")
def t2v(tiny_sets):
    return load_models(tiny_sets["t2v-tiny"])


def test_lora_spec_parsing():
    assert parse_lora_spec("a/b.safetensors:0.7") == LoraSpec(parse_lora_spec("a/b.safetensors").path, 0.7)
    assert parse_lora_spec("C:\\loras\\x.safetensors").strength == 1.0  # a drive letter is not a strength
    assert str(parse_lora_spec("C:\\loras\\x.safetensors:0.5").path) == "C:\\loras\\x.safetensors"
    assert partner_of(parse_lora_spec("r_high_noise-step00000010.safetensors").path).name == \
        "r_low_noise-step00000010.safetensors"


def test_strengths_stack_and_zero_is_the_base(t2v, tmp_path):
    low, high = t2v.experts["low_noise"], t2v.experts["high_noise"]
    files = [write_lora(m, tmp_path / f"s{i}_{e}.safetensors", t2v.variant, e, seed=i)
             for i in (1, 2) for e, m in (("high_noise", high), ("low_noise", low))]
    base = generate(t2v, SampleRequest("a cat", **FAST), decode=False).latents
    loaded = attach_loras([LoraSpec(files[0], 0.8), LoraSpec(files[2], 0.6)], t2v.experts, t2v.variant)
    try:
        assert sorted((lo.spec.path.name, lo.expert, lo.spec.strength) for lo in loaded) == [
            ("s1_high_noise.safetensors", "high_noise", 0.8), ("s1_low_noise.safetensors", "low_noise", 0.8),
            ("s2_high_noise.safetensors", "high_noise", 0.6), ("s2_low_noise.safetensors", "low_noise", 0.6)]
        both = generate(t2v, SampleRequest("a cat", **FAST), decode=False).latents
        scale_strengths(loaded, 0.0)
        torch.testing.assert_close(generate(t2v, SampleRequest("a cat", **FAST), decode=False).latents, base)
        scale_strengths(loaded[:2], 1.0)  # only the first LoRA pair
        one = generate(t2v, SampleRequest("a cat", **FAST), decode=False).latents
        assert not torch.allclose(both, base) and not torch.allclose(one, both)
    finally:
        detach_loras(loaded)
    torch.testing.assert_close(generate(t2v, SampleRequest("a cat", **FAST), decode=False).latents, base)


def test_pairing_by_name_and_metadata(t2v, tmp_path):
    experts = ["high_noise", "low_noise"]
    high = write_lora(t2v.experts["high_noise"], tmp_path / "p_high_noise.safetensors", t2v.variant, "high_noise")
    write_lora(t2v.experts["low_noise"], tmp_path / "p_low_noise.safetensors", t2v.variant, "low_noise")
    pairs = assign_experts([LoraSpec(high, 0.9), LoraSpec(tmp_path / "p_low_noise.safetensors", 0.9)], experts)
    assert [(s.path.name, e) for s, e in pairs] == [("p_high_noise.safetensors", "high_noise"),
                                                    ("p_low_noise.safetensors", "low_noise")]
    shared = write_lora(t2v.experts["low_noise"], tmp_path / "shared.safetensors", t2v.variant)
    assert [e for _, e in assign_experts([LoraSpec(shared)], experts)] == experts  # no expert: both
    tagged = write_lora(t2v.experts["low_noise"], tmp_path / "tagged.safetensors", t2v.variant, "low_noise")
    assert [e for _, e in assign_experts([LoraSpec(tagged)], experts)] == ["low_noise"]  # ss_expert metadata
    assert [e for _, e in assign_experts([LoraSpec(high)], ["low_noise"])] == ["low_noise"]  # high not loaded


def test_lora_for_another_variant_names_the_keys(t2v, tmp_path):
    from library.wan.model import WanModel
    from library.wan.variants import get_variant

    wide = dataclasses.replace(get_variant("t2v-tiny"), name="t2v-wide", dim=48, ffn_dim=96, num_heads=3)
    path = write_lora(WanModel(wide), tmp_path / "wide.safetensors", wide)
    with pytest.raises(LoraError) as info:
        attach_loras([LoraSpec(path)], t2v.experts, t2v.variant)
    msg = str(info.value)
    assert "made for another model than t2v-tiny (wan2.2-t2v-tiny/lora)" in msg
    assert "20 of 20 LoRA modules do not fit" in msg
    assert "lora_unet_blocks_0_cross_attn_k (LoRA 48 -> 48, model 32 -> 32)" in msg
    assert "its metadata says 'wan2.2-t2v-wide/lora'" in msg
    assert not any(m._forward_hooks for model in t2v.experts.values() for m in model.modules())  # nothing left


def test_keys_that_do_not_apply_are_counted(t2v, tmp_path, caplog):
    from safetensors.torch import load_file, save_file

    path = write_lora(t2v.experts["low_noise"], tmp_path / "x.safetensors", t2v.variant)
    sd = load_file(str(path))
    sd["lora_unet_blocks_7_self_attn_q.lora_down.weight"] = torch.zeros(4, 32)  # a block this model lacks
    sd["lora_unet_blocks_7_self_attn_q.lora_up.weight"] = torch.zeros(32, 4)
    sd["diffusion_model.blocks.0.norm3.diff"] = torch.zeros(32)  # not a LoRA tensor
    save_file(sd, str(tmp_path / "extra.safetensors"))
    loaded = attach_loras([LoraSpec(tmp_path / "extra.safetensors")], {"dit": t2v.experts["low_noise"]}, t2v.variant)
    try:
        report = loaded[0].report
        assert report.applied == 20 and len(report.not_in_model) == 2 and len(report.not_lora) == 1
        assert "3 keys do not apply to t2v-tiny" in caplog.text
        assert "2 modules not in this model, 1 keys that are not LoRA tensors" in report.summary()
    finally:
        detach_loras(loaded)


def test_corrupt_and_missing_lora_files(t2v, tmp_path):
    bad = tmp_path / "broken.safetensors"
    bad.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    with pytest.raises(LoraError, match=r"broken.safetensors: not a readable .safetensors LoRA file"):
        attach_loras([LoraSpec(bad)], t2v.experts, t2v.variant)
    with pytest.raises(LoraError, match="does not exist"):
        attach_loras([LoraSpec(tmp_path / "none.safetensors")], t2v.experts, t2v.variant)


def test_prompt_line_options():
    r = parse_prompt_line("a cat, walking --w 832 --h 480 --f 81 --d 42 --s 20 --fs 5.0 --l 4.0 "
                          "--n blurry, low quality --i img.png")
    assert (r.prompt, r.width, r.height, r.frames, r.seed, r.steps) == ("a cat, walking", 832, 480, 81, 42, 20)
    assert (r.flow_shift, r.guidance, r.negative_prompt, r.image) == (5.0, 4.0, "blurry, low quality", "img.png")
    assert parse_prompt_line("well--known cat").prompt == "well--known cat"
    with pytest.raises(PromptError, match=r"p line 3: --s needs an integer, got 'many'"):
        parse_prompt_line("x --s many", "p line 3")


def test_prompt_file_bad_line_does_not_lose_the_others(tmp_path, caplog):
    (tmp_path / "img.png").write_bytes(b"")
    path = tmp_path / "prompts.txt"
    path.write_text("# comment line --zz 1\na cat --d 1 --i img.png\n\n"
                    "bad one --q 3 --w 64\na dog --wd 64\nlast --f 9\nwide --w -64\n")
    with caplog.at_level("WARNING"):
        requests, errors = read_prompt_file(path)
    assert [r.prompt for r in requests] == ["a cat", "bad one", "a dog", "last"]  # unknown options: the line stays
    assert requests[0].image == str(tmp_path / "img.png")  # found beside the prompt file
    assert requests[1].width == 64 and requests[2].width is None
    assert [str(e) for e in errors] == ["prompts.txt line 7: --w must be a positive number of pixels, got -64"]
    assert "prompts.txt: unknown option --q is ignored" in caplog.text and "(prompts.txt line 4)" in caplog.text
    assert "unknown option --wd is ignored (did you mean --w?" in caplog.text


def test_structured_prompt_files(tmp_path, caplog):
    (tmp_path / "p.json").write_text(json.dumps([{"prompt": "a", "width": 64, "sample_steps": 3},
                                                 {"prompt": "b", "widht": 3}, {"prompt": "c", "seed": -2}]))
    with caplog.at_level("WARNING"):
        requests, errors = read_prompt_file(tmp_path / "p.json")
    assert [(r.prompt, r.width, r.steps) for r in requests] == [("a", 64, 3), ("b", None, None)]
    assert "unknown key 'widht' is ignored (did you mean 'width'?) (p.json entry 2)" in caplog.text
    assert str(errors[0]) == "p.json entry 3: seed must be between 0 and 2**64 - 1, got -2"
    (tmp_path / "p.toml").write_text('[[prompt]]\nprompt = "c"\nseed = 4\nguidance_scale = 2.5\n')
    requests, errors = read_prompt_file(tmp_path / "p.toml")
    assert (requests[0].prompt, requests[0].seed, requests[0].guidance, errors) == ("c", 4, 2.5, [])


def test_a_lycoris_file_is_named_not_applied_silently(t2v, tmp_path):
    from safetensors.torch import save_file

    stem = "lora_unet_blocks_0_self_attn_q"
    save_file({f"{stem}.oft_blocks": torch.zeros(4, 8, 8), f"{stem}.alpha": torch.tensor(1.0)},
              str(tmp_path / "oft.safetensors"))  # LoHa / LoKr apply (tests/networks/test_lycoris.py); OFT does not
    with pytest.raises(LoraError, match=r"oft.safetensors: no LoRA up / down tensors .*this is a LyCORIS network of "
                                        r"another kind than LoHa / LoKr"):
        attach_loras([LoraSpec(tmp_path / "oft.safetensors")], t2v.experts, t2v.variant)
    assert not any(m._forward_hooks for model in t2v.experts.values() for m in model.modules())

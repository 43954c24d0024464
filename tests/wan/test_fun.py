"""Fun-InP / Fun-Control: the DiT against diffusers' WanTransformer3DModel at the Fun input widths, the
`ref_conv` reference frame, the conditioning formulas of docs/variants.md, and detection from the file."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from safetensors.torch import save_file

from library.wan.checkpoint_files import CheckpointError
from library.wan.conditioning import i2v_condition
from library.wan.fun import control_tail_channels, fun_control_condition, inpaint_condition, zero_clip_features
from library.wan.loading import load_dit
from library.wan.model import WanModel
from library.wan.variants import get_variant
from tests.helpers import random_official_dit_state
from tests.wan.test_model import assert_close, diffusers_twin, text_inputs

pytest.importorskip("diffusers")


@pytest.mark.parametrize("name", ["t2v-tiny-fc", "i2v-tiny-fc-2.2"])
def test_fun_control_forward_matches_diffusers(name):
    """The Fun DiT is the WAN DiT with a wider patch embedding: same output as diffusers with in_channels =
    in_dim, given [noisy | control | tail] as its input (<= 1e-4 relative, fp32)."""
    variant = get_variant(name)
    ref, ours = diffusers_twin(variant)
    torch.manual_seed(1)
    latent, control, image = (torch.randn(2, 16, 3, 4, 6) for _ in range(3))
    y = fun_control_condition(variant, control, image if variant.is_i2v else None)
    assert y.shape[1] == variant.in_dim - 16
    clip = zero_clip_features(variant, 2) if variant.image_embedding else None
    t = torch.tensor([999.0, 250.0])
    prompts, padded = text_inputs(variant)
    with torch.no_grad():
        expected = ref(torch.cat([latent, y], 1), t, padded, encoder_hidden_states_image=clip, return_dict=False)[0]
        got = ours(latent, t, prompts, y=y, clip_fea=clip)
    assert_close(got, expected)


def test_ref_conv_frame_matches_diffusers_on_one_more_frame():
    """A reference frame through `ref_conv` is frame 0 of an F + 1 token grid (RoPE included) and is cut from
    the output: with ref_conv tied to the patch embedding's first channels, diffusers run on
    [reference padded with zeros, video] gives the same frames 1.. as ours with `full_ref`."""
    variant = replace(get_variant("i2v-tiny-fc-2.2"), ref_conv=True)
    ref, base = diffusers_twin(get_variant("i2v-tiny-fc-2.2"))
    ours = WanModel(variant).eval()
    state = base.state_dict()
    w, b = state["patch_embedding.weight"], state["patch_embedding.bias"]  # [C, in, 1, 2, 2]
    state["ref_conv.weight"], state["ref_conv.bias"] = w[:, :16, 0].clone(), b.clone()
    ours.load_state_dict(state, strict=True)
    torch.manual_seed(2)
    latent, reference = torch.randn(1, 16, 3, 4, 6), torch.randn(1, 16, 4, 6)
    y = torch.randn(1, variant.in_dim - 16, 3, 4, 6)
    first = torch.zeros(1, variant.in_dim, 1, 4, 6)
    first[:, :16, 0] = reference
    prompts, padded = text_inputs(variant, lengths=(6,))
    t = torch.tensor([600.0])
    with torch.no_grad():
        expected = ref(torch.cat([first, torch.cat([latent, y], 1)], 2), t, padded, return_dict=False)[0][:, :, 1:]
        got = ours(latent, t, prompts, y=y, full_ref=reference)
        zero_ref = ours(latent, t, prompts, y=y)  # no reference image: a zero reference frame
        assert torch.equal(zero_ref, ours(latent, t, prompts, y=y, full_ref=torch.zeros_like(reference)))
    assert_close(got, expected)


def test_control_condition_layouts():
    """WAN 2.1: [control | start latent in frame 0, zeros after]; WAN 2.2: [control | mask | image latents];
    without a start image the tail is zeros."""
    control, image = torch.randn(1, 16, 3, 2, 2), torch.randn(1, 16, 3, 2, 2)
    v21, v22 = get_variant("i2v-14B-FC"), get_variant("i2v-A14B-FC")
    assert (control_tail_channels(v21), control_tail_channels(v22)) == (16, 20)
    y = fun_control_condition(v21, control, image)
    assert torch.equal(y[:, :16], control) and torch.equal(y[:, 16:, :1], image[:, :, :1])
    assert not y[:, 16:, 1:].any()
    y = fun_control_condition(v22, control, image)
    assert torch.equal(y[:, 16:], i2v_condition(image)) and y[:, 16:20, 0].eq(1).all() and not y[:, 16:20, 1:].any()
    assert not fun_control_condition(get_variant("t2v-14B-FC"), control)[:, 16:].any()
    assert fun_control_condition(get_variant("t2v-A14B-FC"), control).shape[1] == 36


def test_inpaint_mask_is_the_folded_pixel_mask():
    """Fun-InP keeps pixel frames 0 and F-1: VideoX-Fun repeats frame 0's mask 4 times, folds 4 pixel frames per
    latent frame into the 4 mask channels; the last pixel frame lands in channel 3 of the last latent frame."""
    for frames in (5, 9, 81):
        pixel = torch.zeros(frames)
        pixel[0] = pixel[-1] = 1.0
        folded = torch.cat([pixel[:1].repeat(4), pixel[1:]]).view(-1, 4).T  # [4, T]
        latents = torch.randn(1, 16, folded.shape[1], 2, 2)
        y = inpaint_condition(latents, end_frame=True)
        assert torch.equal(y[0, :4, :, 0, 1], folded) and torch.equal(y[:, 4:], latents)
        assert torch.equal(inpaint_condition(latents, end_frame=False), i2v_condition(latents))


def test_fun_variants_shapes():
    """Channels and CLIP of each released Fun model (docs/variants.md lists the sources)."""
    expected = {"t2v-1.3B-FC": (48, True, 1536), "t2v-14B-FC": (48, True, 5120), "i2v-14B-FC": (48, True, 5120),
                "i2v-1.3B-InP": (36, True, 1536), "i2v-14B-InP": (36, True, 5120),
                "i2v-A14B-InP": (36, False, 5120), "t2v-A14B-FC": (52, False, 5120),
                "i2v-A14B-FC": (52, False, 5120)}
    for name, (in_dim, clip, dim) in expected.items():
        v = get_variant(name)
        assert (v.in_dim, v.image_embedding, v.dim) == (in_dim, clip, dim), name
        assert v.two_experts == (v.version == "2.2")


def _write(path, variant, extra=None):
    sd = random_official_dit_state(variant)
    save_file({**sd, **(extra or {})}, str(path))
    return path


def test_detection_from_the_file(tmp_path):
    fc = _write(tmp_path / "fun_control.safetensors", get_variant("t2v-tiny-fc"))
    assert load_dit(fc).variant.name == "t2v-tiny-fc"
    with pytest.raises(CheckpointError, match=r"fun_control\.safetensors: checkpoint is t2v-tiny-fc .*Fun-Control, "
                                              r"48 input channels.*configured task is i2v-tiny-2\.1"):
        load_dit(fc, task="i2v-tiny-2.1")
    ref = {"ref_conv.weight": torch.randn(48, 16, 2, 2), "ref_conv.bias": torch.zeros(48)}
    v11 = _write(tmp_path / "fun_v11.safetensors", get_variant("t2v-tiny-fc"), ref)
    model = load_dit(v11, task="t2v-tiny-fc")
    assert model.variant.ref_conv and torch.equal(model.ref_conv.weight, ref["ref_conv.weight"])
    odd = _write(tmp_path / "odd.safetensors", get_variant("i2v-tiny-2.1"), ref)
    with pytest.raises(CheckpointError, match=r"odd\.safetensors: the checkpoint has `ref_conv` weights"):
        load_dit(odd, task="i2v-tiny-2.1")

"""The DiT against diffusers' independent WanTransformer3DModel, plus its shapes against the official key dumps."""

from __future__ import annotations

import pytest
import torch

from library.wan.dit_formats import diffusers_to_official
from library.wan.model import WanModel, rope_axis_dims
from library.wan.variants import VARIANTS, get_variant
from tests.helpers import diffusers_transformer, parse_key_sections, reference_file

diffusers = pytest.importorskip("diffusers")

TOL = 1e-4  # max abs error relative to the reference output's max abs value


def diffusers_twin(variant, seed=0):
    """A diffusers WanTransformer3DModel with random weights, and our model holding the same weights."""
    torch.manual_seed(seed)
    ref = diffusers_transformer(variant).eval()
    with torch.no_grad():  # make norms and the output head non-trivial so every path is tested
        for name, p in ref.named_parameters():
            if p.dim() == 1 and "norm" in name:
                p.copy_(1 + 0.1 * torch.randn_like(p))
            elif name.startswith("proj_out"):
                p.normal_(0, 0.2)
    ours = WanModel(variant).eval()
    ours.load_state_dict({diffusers_to_official(k): v for k, v in ref.state_dict().items()}, strict=True)
    return ref, ours


def text_inputs(variant, lengths=(7, 5)):
    """Unpadded prompts for us, zero-padded [B, 512, text_dim] for diffusers (as its pipeline does)."""
    prompts = [torch.randn(n, variant.text_dim) for n in lengths]
    padded = torch.zeros(len(lengths), variant.text_len, variant.text_dim)
    for i, p in enumerate(prompts):
        padded[i, : p.shape[0]] = p
    return prompts, padded


def assert_close(ours, ref):
    assert ours.shape == ref.shape and ours.dtype == torch.float32
    err = (ours - ref).abs().max().item() / ref.abs().max().item()
    assert err <= TOL, f"relative max error {err:.2e} > {TOL}"
    return err


@pytest.mark.parametrize("name", ["t2v-tiny", "i2v-tiny", "i2v-tiny-2.1"])
def test_forward_matches_diffusers(name):
    variant = get_variant(name)
    ref, ours = diffusers_twin(variant)
    torch.manual_seed(1)
    latent = torch.randn(2, variant.out_dim, 3, 4, 6)  # [B, C, F, H, W]
    y = torch.randn(2, variant.in_dim - variant.out_dim, 3, 4, 6) if variant.is_i2v else None
    clip = torch.randn(2, variant.clip_tokens, variant.clip_dim) if variant.image_embedding else None
    t = torch.tensor([999.0, 431.5])
    prompts, padded = text_inputs(variant)
    with torch.no_grad():
        expected = ref(torch.cat([latent, y], 1) if y is not None else latent, t, padded,
                       encoder_hidden_states_image=clip, return_dict=False)[0]
        got = ours(latent, t, prompts, y=y, clip_fea=clip)
    assert_close(got, expected)


@pytest.mark.parametrize("per_frame", [True, False])
def test_ti2v_per_token_timesteps_match_diffusers(per_frame):
    """TI2V image-to-video: first-frame tokens at t=0 (per-frame groups), and fully per-token t."""
    variant = get_variant("ti2v-tiny")
    ref, ours = diffusers_twin(variant)
    torch.manual_seed(2)
    latent = torch.randn(2, 48, 3, 4, 4)
    tokens_per_frame, seq_len = 2 * 2, 3 * 2 * 2
    if per_frame:
        t = torch.tensor([[0.0] * tokens_per_frame + [700.0] * (seq_len - tokens_per_frame),
                          [0.0] * tokens_per_frame + [125.0] * (seq_len - tokens_per_frame)])
    else:
        t = torch.rand(2, seq_len) * 1000
    prompts, padded = text_inputs(variant)
    with torch.no_grad():
        expected = ref(latent, t, padded, return_dict=False)[0]
        got = ours(latent, t, prompts)
    assert_close(got, expected)
    # constant per-token t is the same as one t per sample
    with torch.no_grad():
        flat = ours(latent, torch.full((2, seq_len), 500.0), prompts)
        scalar = ours(latent, torch.tensor([500.0, 500.0]), prompts)
    torch.testing.assert_close(flat, scalar)


def test_bf16_forward_stays_close_to_fp32():
    variant = get_variant("t2v-tiny")
    _, ours = diffusers_twin(variant)
    latent, t = torch.randn(1, 16, 2, 4, 4), torch.tensor([500.0])
    prompts, _ = text_inputs(variant, (6,))
    with torch.no_grad():
        full = ours(latent, t, prompts)
        ours.to(torch.bfloat16)
        half = ours(latent, t, prompts)
    assert half.dtype == torch.float32
    assert (half - full).abs().max() / full.abs().max() < 0.05


def test_gradient_checkpointing_same_loss_and_grads():
    variant = get_variant("t2v-tiny")
    _, model = diffusers_twin(variant)
    model.train()
    latent, t = torch.randn(1, 16, 2, 4, 4), torch.tensor([300.0])
    prompts, _ = text_inputs(variant, (4,))

    def run():
        model.zero_grad()
        loss = model(latent, t, prompts).pow(2).mean()
        loss.backward()
        return loss.detach(), model.blocks[0].self_attn.q.weight.grad.clone()

    loss_a, grad_a = run()
    model.enable_gradient_checkpointing()
    loss_b, grad_b = run()
    torch.testing.assert_close(loss_a, loss_b)
    torch.testing.assert_close(grad_a, grad_b)


def test_bad_inputs_are_clear_errors():
    variant = get_variant("i2v-tiny")
    model = WanModel(variant)
    prompts, _ = text_inputs(variant, (3,))
    with pytest.raises(ValueError, match="I2V models need `y`"):
        model(torch.randn(1, 16, 1, 2, 2), torch.tensor([1.0]), prompts)
    with pytest.raises(ValueError, match="at most 512"):
        model(torch.randn(1, 36, 1, 2, 2), torch.tensor([1.0]), torch.randn(1, 600, variant.text_dim))
    if _missing("sageattention"):
        with pytest.raises(RuntimeError, match="sage_attn.*not installed.*install `sageattention`"):
            model.set_attention_backend("sage_attn")
    with pytest.raises(ValueError, match="unknown attention backend"):
        model.set_attention_backend("flashy")


def _missing(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is None


def test_rope_split_matches_official_formula():
    assert rope_axis_dims(128) == (44, 42, 42)
    assert rope_axis_dims(16) == (8, 4, 4)


OFFICIAL_SECTIONS = {
    "wan22_t2v_A14B": "t2v-A14B", "wan22_i2v_A14B": "i2v-A14B", "wan22_ti2v_5B": "ti2v-5B",
    "wan21_t2v_1.3B": "t2v-1.3B", "wan21_t2v_14B": "t2v-14B", "wan21_i2v_14B": "i2v-14B",
}


@pytest.mark.parametrize("section,task", sorted(OFFICIAL_SECTIONS.items()))
def test_full_size_keys_and_shapes_match_official(section, task):
    """Built on meta: every official key (block 0 listed in the dump) with its shape, the key count, the
    parameter count."""
    ref = parse_key_sections(reference_file("keys", "wan_keys_dit.txt"))[section]
    with torch.device("meta"):
        model = WanModel(get_variant(task))
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    listed = {k: s for k, s in ref["shapes"].items() if k != "freqs"}
    assert {k: ours[k] for k in listed} == listed
    if any(not k.startswith("blocks.") for k in listed):  # some dumps list block 0 only
        assert not [k for k in ours if not k.startswith("blocks.") and k not in listed]
    assert not [k for k in ours if k.startswith("blocks.0.") and k not in listed]
    assert len(ours) == ref["nkeys"]
    assert sum(p.numel() for p in model.parameters()) == ref["params"]


def test_every_variant_builds_on_meta():
    for variant in set(VARIANTS.values()):
        with torch.device("meta"):
            model = WanModel(variant)
        assert model.head.head.out_features == 4 * variant.out_dim

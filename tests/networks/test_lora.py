"""LoRA modules and network: attach / detach, exact math, selection, LoRA+, file formats and metadata,
fp32 training over a bf16 base, and parity with diffusers' own WAN LoRA loading."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn as nn
from safetensors import safe_open

from library.wan.dit_formats import diffusers_to_official
from library.wan.model import WanModel
from library.wan.variants import get_variant
from networks import lora_wan
from networks.lora import LoRAModule, LoRANetwork, split_lora_key
from tests.helpers import diffusers_transformer, random_official_dit_state

TOL = 1e-4  # max abs error relative to the reference output's max abs value


class TwoLinear(nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList(nn.ModuleDict({"q": nn.Linear(8, 6), "ffn": nn.Linear(6, 8)}) for _ in range(2))
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        for block in self.blocks:
            x = block["ffn"](torch.tanh(block["q"](x)))
        return self.head(x)


def tiny_wan(name="t2v-tiny", dtype=torch.float32):
    variant = get_variant(name)
    model = WanModel(variant).eval()
    model.load_state_dict(random_official_dit_state(variant))
    return variant, model.to(dtype).requires_grad_(False)


def randomise(network, seed=3, std=0.1):
    torch.manual_seed(seed)
    with torch.no_grad():
        for lora in network.loras:
            lora.lora_up.weight.normal_(0, std)


def wan_inputs(variant, seed=1):
    torch.manual_seed(seed)
    latent = torch.randn(1, variant.out_dim, 2, 4, 4)  # [B, C, F, H, W]
    y = torch.randn(1, variant.in_dim - variant.out_dim, 2, 4, 4) if variant.is_i2v else None
    clip = torch.randn(1, variant.clip_tokens, variant.clip_dim) if variant.image_embedding else None
    return latent, torch.tensor([500.0]), [torch.randn(6, variant.text_dim)], y, clip


def run_ours(model, variant, inputs):
    latent, t, prompts, y, clip = inputs
    with torch.no_grad():
        return model(latent, t, prompts, y=y, clip_fea=clip)


# ---- the module ------------------------------------------------------------------------------------


def test_attach_detach_restores_exact_outputs_and_zero_init_is_identity():
    torch.manual_seed(0)
    model, x = TwoLinear(), torch.randn(5, 8)
    before = model(x)
    net = LoRANetwork(model, ["q", "ffn"], dim=2, alpha=1.0)
    net.apply_to()
    assert torch.equal(model(x), before)  # up is zero-initialised
    randomise(net)
    assert not torch.allclose(model(x), before)
    net.remove()
    assert torch.equal(model(x), before)
    assert not any(m._forward_hooks for m in model.modules())
    assert "forward" not in vars(model.blocks[0]["q"])  # never monkeypatched


def test_delta_is_exactly_the_lora_product():
    torch.manual_seed(0)
    base = nn.Linear(8, 6)
    lora = LoRAModule("lora_unet_x", base, "x", multiplier=0.7, lora_dim=3, alpha=6.0)
    with torch.no_grad():
        lora.lora_up.weight.normal_()
    lora.apply_to()
    x = torch.randn(4, 8)
    expected = (x @ base.weight.T + base.bias) + x @ lora.lora_down.weight.T @ lora.lora_up.weight.T * 2.0 * 0.7
    torch.testing.assert_close(base(x), expected, rtol=1e-6, atol=1e-6)
    assert lora.scale == 2.0 and float(lora.alpha) == 6.0


def test_alpha_zero_means_rank_and_multiplier_zero_is_off():
    base = nn.Linear(4, 4)
    assert LoRAModule("a", base, "a", lora_dim=4, alpha=0).scale == 1.0
    lora = LoRAModule("a", base, "a", lora_dim=2, multiplier=0.0)
    with torch.no_grad():
        lora.lora_up.weight.fill_(1.0)
    x = torch.randn(2, 4)
    before = base(x)
    lora.apply_to()
    assert torch.equal(base(x), before)


def test_merge_and_unmerge():
    torch.manual_seed(0)
    model, x = TwoLinear(), torch.randn(5, 8)
    before = model(x)
    net = LoRANetwork(model, ["q", "ffn"], dim=2, alpha=2.0, multiplier=0.5)
    randomise(net)
    net.apply_to()
    hooked = model(x)
    net.merge_to()
    assert not any(m._forward_hooks for m in model.modules())
    torch.testing.assert_close(model(x), hooked, rtol=1e-5, atol=1e-6)
    net.unmerge()
    torch.testing.assert_close(model(x), hooked, rtol=1e-5, atol=1e-6)  # hooks back
    net.remove()
    torch.testing.assert_close(model(x), before, rtol=1e-5, atol=1e-6)


def test_dropouts_only_in_training():
    torch.manual_seed(0)
    base = nn.Linear(8, 8)
    lora = LoRAModule("a", base, "a", lora_dim=4, dropout=0.5, rank_dropout=0.5, module_dropout=0.5)
    with torch.no_grad():
        lora.lora_up.weight.normal_()
    x = torch.randn(3, 5, 8)
    lora.eval()
    torch.testing.assert_close(lora(x), lora(x))
    lora.train()
    assert not torch.equal(lora(x), lora(x))


def test_max_norm_regularization_scales_only_large_modules():
    torch.manual_seed(0)
    net = LoRANetwork(TwoLinear(), ["q", "ffn"], dim=2, alpha=2.0)
    randomise(net, std=1.0)
    norms = [((lo.lora_up.weight @ lo.lora_down.weight) * lo.scale).norm().item() for lo in net.loras]
    limit = sorted(norms)[1] + 1e-3  # two modules at or below the limit, two above
    scaled, _, largest = net.apply_max_norm_regularization(limit)
    assert scaled == 2 and largest == pytest.approx(limit, rel=1e-4)
    after = [((lo.lora_up.weight @ lo.lora_down.weight) * lo.scale).norm().item() for lo in net.loras]
    for b, a in zip(norms, after):
        assert a == pytest.approx(min(b, limit), rel=1e-4)


# ---- selection, LoRA+ ------------------------------------------------------------------------------


def test_wan_targets_and_default_excludes():
    variant, model = tiny_wan("i2v-tiny-2.1")
    net = lora_wan.create_network(1.0, 4, 1.0, None, None, model)
    names = {lo.official_name for lo in net.loras}
    per_block = {n.split(".", 2)[2] for n in names}
    assert per_block == set(lora_wan.WAN_TARGETS)  # includes k_img / v_img on WAN 2.1 I2V
    assert len(names) == variant.num_layers * len(lora_wan.WAN_TARGETS)
    assert not any(("embedding" in n or "head" in n or "img_emb" in n) for n in names)


def test_include_and_exclude_patterns():
    _, model = tiny_wan()
    net = lora_wan.create_network(1.0, 4, 1.0, None, None, model, exclude_patterns='[".*ffn.*", ".*cross_attn.*"]',
                                  include_patterns=[r"blocks\.1\.ffn\.2", "head.head"])
    names = sorted(lo.official_name for lo in net.loras)
    assert names == sorted([f"blocks.{i}.self_attn.{p}" for i in range(2) for p in "qkvo"]
                           + ["blocks.1.ffn.2", "head.head"])
    with pytest.raises(ValueError, match="unknown key 'exclude_pattern'; did you mean 'exclude_patterns'"):
        lora_wan.create_network(1.0, 4, 1.0, None, None, model, exclude_pattern=[".*"])
    with pytest.raises(ValueError, match="nothing to train"):
        lora_wan.create_network(1.0, 4, 1.0, None, None, model, exclude_patterns=[".*"])


def test_loraplus_param_groups():
    _, model = tiny_wan()
    plain = lora_wan.create_network(1.0, 4, 1.0, None, None, model)
    groups = plain.prepare_optimizer_params(1e-4)
    assert len(groups) == 1 and groups[0]["lr"] == 1e-4 and len(groups[0]["params"]) == 2 * len(plain.loras)
    plus = lora_wan.create_network(1.0, 4, 1.0, None, None, model, loraplus_lr_ratio="16")
    down, up = plus.prepare_optimizer_params(1e-4)
    assert down["lr"] == 1e-4 and up["lr"] == pytest.approx(1.6e-3)
    assert {id(p) for p in up["params"]} == {id(lo.lora_up.weight) for lo in plus.loras}
    assert {id(p) for p in down["params"]} == {id(lo.lora_down.weight) for lo in plus.loras}
    torch.optim.AdamW(plus.prepare_optimizer_params(1e-4))  # valid param groups


def test_key_forms_map_to_one_module_name():
    expected = ("lora_unet_blocks_3_cross_attn_k_img", "down")
    for key in ("lora_unet_blocks_3_cross_attn_k_img.lora_down.weight",
                "lora_unet__blocks_3_cross_attn_k_img.lora_down.weight",
                "diffusion_model.blocks.3.cross_attn.k_img.lora_A.weight",
                "transformer.blocks.3.attn2.add_k_proj.lora_A.weight"):
        assert split_lora_key(key, lora_wan.diffusers_module_to_official) == expected
    assert split_lora_key("diffusion_model.blocks.0.self_attn.q.diff_b") is None


def test_diffusers_module_map_agrees_with_the_checkpoint_map():
    ref = diffusers_transformer(get_variant("i2v-tiny-2.1"))  # every Linear kind, k_img / v_img included
    for name, module in ref.named_modules():
        if isinstance(module, nn.Linear) and not name.startswith("condition_embedder.image"):
            assert lora_wan.diffusers_module_to_official(name) == diffusers_to_official(name + ".weight")[:-7]


# ---- files -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["kohya", "comfyui"])
def test_save_load_round_trip_with_metadata(tmp_path, fmt):
    variant, model = tiny_wan()
    net = lora_wan.create_network(1.0, 4, 2.0, None, None, model)
    randomise(net)
    meta = lora_wan.build_lora_metadata(
        "t2v-A14B", "2.2", expert="high_noise", network_dim=4, network_alpha=2.0,
        network_args={"loraplus_lr_ratio": 4}, output_name="my_lora", training_started_at=1.7e9, steps=2,
        epoch=1, learning_rate=1e-4, seed=42, resolution=(832, 480), author="me", tags="wan,test",
        extra={"ss_training_config": {"network_dim": 4}})
    path = net.save_weights(tmp_path / "lora.safetensors", dtype=torch.bfloat16, metadata=meta, fmt=fmt)
    with safe_open(str(path), "pt") as fh:
        keys, saved = set(fh.keys()), fh.metadata()
    first = "lora_unet_blocks_0_self_attn_q" if fmt == "kohya" else "diffusion_model.blocks.0.self_attn.q"
    parts = ("lora_down", "lora_up") if fmt == "kohya" else ("lora_A", "lora_B")
    assert {f"{first}.{parts[0]}.weight", f"{first}.{parts[1]}.weight", f"{first}.alpha"} <= keys
    assert len(keys) == 3 * len(net.loras)
    assert saved["modelspec.architecture"] == "wan2.2-t2v-a14b/lora"
    assert saved["modelspec.sai_model_spec"] == "1.0.0" and saved["modelspec.resolution"] == "832x480"
    assert saved["modelspec.title"] == "my_lora" and saved["modelspec.author"] == "me"
    assert saved["ss_network_module"] == "networks.lora_wan" and saved["ss_network_dim"] == "4"
    assert json.loads(saved["ss_network_args"]) == {"loraplus_lr_ratio": 4}
    assert saved["ss_expert"] == "high_noise" and saved["ss_seed"] == "42"
    assert len(saved["sshs_model_hash"]) == 64 and not list(tmp_path.glob("*.tmp"))

    fresh = lora_wan.create_network(1.0, 4, 1.0, None, None, model)
    report = fresh.load_weights(path, strict=True)
    assert report.loaded == len(net.loras) and not report.unknown_keys
    for a, b in zip(net.loras, fresh.loras):
        torch.testing.assert_close(b.lora_up.weight, a.lora_up.weight.bfloat16().float())
        assert b.scale == 0.5


def test_unknown_keys_are_reported(tmp_path, caplog):
    _, model = tiny_wan()
    net = lora_wan.create_network(1.0, 4, 1.0, None, None, model)
    sd = net.lora_state_dict()
    sd["lora_unet_blocks_9_self_attn_q.lora_down.weight"] = torch.zeros(4, 32)
    sd["lora_unet_blocks_9_self_attn_q.lora_up.weight"] = torch.zeros(32, 4)
    sd["diffusion_model.blocks.0.self_attn.q.diff_b"] = torch.zeros(32)
    report = net.load_weights(sd)
    assert report.loaded == len(net.loras)
    assert set(report.unknown_keys) == {"diffusion_model.blocks.0.self_attn.q.diff_b",
                                        "lora_unet_blocks_9_self_attn_q.down", "lora_unet_blocks_9_self_attn_q.up"}
    assert "3 LoRA keys match no module" in caplog.text
    with pytest.raises(ValueError, match="match no module"):
        net.load_weights(sd, strict=True)


def test_network_from_weights_takes_rank_and_alpha(tmp_path):
    _, model = tiny_wan()
    src = lora_wan.create_network(1.0, 8, 3.0, None, None, model, exclude_patterns=[".*ffn.*"])
    randomise(src)
    path = src.save_weights(tmp_path / "src.safetensors", fmt="comfyui")
    net, sd = lora_wan.create_network_from_weights(1.0, str(path), None, None, model)
    assert len(net.loras) == len(src.loras) and all(lo.lora_dim == 8 and lo.scale == 3.0 / 8 for lo in net.loras)
    assert net.load_weights(sd, strict=True).loaded == len(src.loras)
    smaller = lora_wan.create_network(1.0, 4, 1.0, None, None, model)
    with pytest.raises(ValueError, match="dim_from_weights"):
        smaller.load_weights(path)


# ---- precision -------------------------------------------------------------------------------------


def test_fp32_lora_trains_over_a_bf16_base():
    variant, model = tiny_wan(dtype=torch.bfloat16)
    net = lora_wan.create_network(1.0, 4, 4.0, None, None, model)
    net.apply_to()
    randomise(net)
    assert all(p.dtype == torch.float32 for p in net.parameters())
    latent, t, prompts, _, _ = wan_inputs(variant)
    loss = model(latent, t, [p.bfloat16() for p in prompts]).float().pow(2).mean()
    loss.backward()
    assert all(p.grad is None for p in model.parameters())
    assert all(lo.lora_down.weight.grad is not None and lo.lora_down.weight.grad.dtype == torch.float32
               for lo in net.loras)
    assert any(lo.lora_down.weight.grad.abs().sum() > 0 for lo in net.loras)
    x = torch.randn(2, 3, variant.dim, dtype=torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert net.loras[0](x).dtype == torch.float32  # the LoRA path stays fp32 under autocast
        assert net.loras[0].org_module(x).dtype == torch.bfloat16


# ---- parity with diffusers -------------------------------------------------------------------------


class _MinimalWanPipeline:
    """What `WanLoraLoaderMixin.load_lora_weights` needs from a pipeline: a transformer and its components."""

    hf_device_map = None

    def __init__(self, transformer):
        self.transformer = transformer
        self.components = {"transformer": transformer}


def diffusers_model(variant, state):
    ref = diffusers_transformer(variant).eval()
    ref.load_state_dict({k: state[diffusers_to_official(k)] for k in ref.state_dict()}, strict=True)
    return ref


def run_diffusers(ref, variant, inputs):
    latent, t, prompts, y, clip = inputs
    padded = torch.zeros(1, variant.text_len, variant.text_dim)
    padded[0, : prompts[0].shape[0]] = prompts[0]
    x = torch.cat([latent, y], 1) if y is not None else latent
    with torch.no_grad():
        return ref(x, t, padded, encoder_hidden_states_image=clip, return_dict=False)[0]


def rel_err(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.mark.parametrize("name", ["t2v-tiny", "i2v-tiny-2.1"])
def test_lora_matches_diffusers(tmp_path, name):
    pytest.importorskip("peft")
    from diffusers.loaders import WanLoraLoaderMixin
    from peft.utils import get_peft_model_state_dict

    class Pipeline(_MinimalWanPipeline, WanLoraLoaderMixin):
        pass

    variant = get_variant(name)
    state = random_official_dit_state(variant)
    model = WanModel(variant).eval()
    model.load_state_dict(state)
    inputs = wan_inputs(variant)
    base = run_ours(model, variant, inputs)
    net = lora_wan.create_network(1.0, 4, 2.0, None, None, model)
    randomise(net)
    net.apply_to()
    ours = run_ours(model, variant, inputs)
    assert rel_err(ours, base) > 1e-2  # the LoRA really changes the output

    for fmt in ("kohya", "comfyui"):
        path = net.save_weights(tmp_path / f"{fmt}.safetensors", fmt=fmt)
        ref = diffusers_model(variant, state)
        Pipeline(ref).load_lora_weights(str(path), adapter_name="ours")
        taken = get_peft_model_state_dict(ref, adapter_name="ours")
        assert len(taken) == 2 * len(net.loras)  # every module's A and B were taken
        assert rel_err(run_diffusers(ref, variant, inputs), ours) <= TOL

    # and diffusers' own keys (alpha folded into the weights) load back into our network
    diffusers_sd = {f"transformer.{k}": v for k, v in taken.items()}
    fresh = lora_wan.create_network(1.0, 4, 1.0, None, None, model)
    net.remove()
    fresh.apply_to()
    assert fresh.load_weights(diffusers_sd, strict=True).loaded == len(net.loras)
    assert rel_err(run_ours(model, variant, inputs), ours) <= TOL


def test_bf16_base_keeps_no_fp32_copy_of_the_input():
    """Over a bf16 base, the LoRA down-projection must not save an fp32 copy of the layer input for
    backward (at video lengths that copy, once per q / k / v LoRA, dominates activation memory)."""
    from networks.lora import LoRANetwork

    model = torch.nn.Sequential(torch.nn.Linear(64, 64)).to(torch.bfloat16).requires_grad_(False)
    net = LoRANetwork(model, ["0"], dim=4, alpha=4)
    net.apply_to()
    x = torch.randn(32, 64, dtype=torch.bfloat16)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        out = model(x)
    assert not [t for t in saved if t.dtype == torch.float32 and t.numel() >= x.numel()]
    out.float().sum().backward()
    assert net.loras[0].lora_down.weight.grad.dtype == torch.float32

"""VACE DiT: parity with diffusers' independent WanVACETransformer3DModel, loading official / ComfyUI /
diffusers names, and detection of the variant from the file."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from library.wan.checkpoint_files import CheckpointError
from library.wan.dit_formats import diffusers_to_official
from library.wan.loading import load_dit
from library.wan.vace import VaceWanModel, build_dit
from library.wan.variants import get_variant
from tests.helpers import single_thread

diffusers = pytest.importorskip("diffusers")

TOL = 1e-4


def diffusers_vace(variant):
    from diffusers import WanVACETransformer3DModel

    return WanVACETransformer3DModel(
        patch_size=variant.patch_size, num_attention_heads=variant.num_heads, attention_head_dim=variant.head_dim,
        in_channels=variant.in_dim, out_channels=variant.out_dim, text_dim=variant.text_dim,
        freq_dim=variant.freq_dim, ffn_dim=variant.ffn_dim, num_layers=variant.num_layers,
        vace_layers=list(variant.vace_layers), vace_in_channels=variant.vace_in_dim,
    )


def vace_twin(variant, seed=0):
    torch.manual_seed(seed)
    ref = diffusers_vace(variant).eval()
    with torch.no_grad():  # non-trivial norms, head and VACE projections (diffusers leaves them random)
        for name, p in ref.named_parameters():
            if p.dim() == 1 and "norm" in name:
                p.copy_(1 + 0.1 * torch.randn_like(p))
            elif name.startswith("proj_out") or ".proj_" in name:
                p.normal_(0, 0.2)
    ours = VaceWanModel(variant).eval()
    ours.load_state_dict({diffusers_to_official(k): v for k, v in ref.state_dict().items()}, strict=True)
    return ref, ours


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models run fastest on one thread (intra-op threads only add overhead on a busy machine)."""
    with single_thread():
        yield


@pytest.fixture(scope="module")
def twin():
    return vace_twin(get_variant("vace-tiny"))


def inputs(variant, frames=3, context_frames=3):
    torch.manual_seed(1)
    latent = torch.randn(2, variant.in_dim, frames, 4, 6)
    control = torch.randn(2, variant.vace_in_dim, context_frames, 4, 6)
    prompts = [torch.randn(n, variant.text_dim) for n in (7, 5)]
    padded = torch.zeros(2, variant.text_len, variant.text_dim)
    for i, p in enumerate(prompts):
        padded[i, : p.shape[0]] = p
    return latent, control, prompts, padded


def rel_err(ours, ref):
    assert ours.shape == ref.shape and ours.dtype == torch.float32
    return (ours - ref).abs().max().item() / ref.abs().max().item()


@pytest.mark.parametrize("scale,context_frames", [(1.0, 3), ([0.5, 1.7], 3), (0.8, 2)])
def test_forward_matches_diffusers(twin, scale, context_frames):
    variant = get_variant("vace-tiny")
    ref, ours = twin
    latent, control, prompts, padded = inputs(variant, context_frames=context_frames)
    t = torch.tensor([999.0, 431.5])
    scales = torch.tensor(scale if isinstance(scale, list) else [scale] * len(variant.vace_layers))
    with torch.no_grad():
        expected = ref(latent, t, padded, control_hidden_states=control, control_hidden_states_scale=scales,
                       return_dict=False)[0]
        got = ours(latent, t, prompts, y=control, vace_scale=scale)
        plain = ours(latent, t, prompts, y=control, vace_scale=0.0)
    assert rel_err(got, expected) <= TOL
    assert rel_err(plain, expected) > 1e-2  # the hints matter: scale 0 is another output


def test_hints_run_checkpointed_with_gradients():
    variant = get_variant("vace-tiny")
    _, ours = vace_twin(variant)
    latent, control, prompts, _ = inputs(variant)
    t = torch.tensor([500.0, 100.0])
    ours.requires_grad_(True)
    ours(latent, t, prompts, y=control).square().mean().backward()
    plain = {n: p.grad.clone() for n, p in ours.named_parameters()}
    ours.zero_grad()
    ours.enable_gradient_checkpointing()
    ours(latent, t, prompts, y=control).square().mean().backward()
    for name, p in ours.named_parameters():
        torch.testing.assert_close(p.grad, plain[name], rtol=1e-4, atol=1e-6)
    assert plain["vace_blocks.1.self_attn.q.weight"].abs().sum() > 0


def test_missing_context_and_wrong_scale_are_errors():
    variant = get_variant("vace-tiny")
    model = build_dit(variant)
    latent, control, prompts, _ = inputs(variant)
    with pytest.raises(ValueError, match="needs a VACE context"):
        model(latent, torch.tensor([1.0, 2.0]), prompts)
    with pytest.raises(ValueError, match="2 VACE blocks"):
        model(latent, torch.tensor([1.0, 2.0]), prompts, y=control, vace_scale=[1.0, 1.0, 1.0])
    with pytest.raises(ValueError, match="96 channels"):
        model(latent, torch.tensor([1.0, 2.0]), prompts, y=control[:, :48])


@pytest.mark.parametrize("fmt", ["official", "comfyui", "diffusers"])
def test_loads_every_naming_and_detects_vace(twin, tmp_path, fmt):
    ref, ours = twin
    if fmt == "diffusers":
        sd = ref.state_dict()
    else:
        prefix = "model.diffusion_model." if fmt == "comfyui" else ""
        sd = {prefix + k: v for k, v in ours.state_dict().items()}
    path = tmp_path / f"{fmt}.safetensors"
    save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    loaded = load_dit(path)  # no task: detected from the shapes
    assert isinstance(loaded, VaceWanModel) and loaded.variant.name == "vace-tiny"
    for k, v in ours.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[k], v)


def test_task_contradicting_the_file_is_a_clear_error(tmp_path):
    ours = build_dit(get_variant("vace-tiny"))
    path = tmp_path / "vace.safetensors"
    save_file({k: v.contiguous() for k, v in ours.state_dict().items()}, str(path))
    with pytest.raises(CheckpointError, match=r"checkpoint is vace-tiny .*VACE.*configured task is t2v-tiny"):
        load_dit(path, task="t2v-tiny")
    base = {k: v.contiguous() for k, v in ours.state_dict().items() if not k.startswith("vace_")}
    base = {k: v for k, v in base.items() if not k.startswith("blocks.") or int(k.split(".")[1]) < 2}
    save_file(base, str(tmp_path / "t2v.safetensors"))
    with pytest.raises(CheckpointError, match="configured task is vace-tiny"):
        load_dit(tmp_path / "t2v.safetensors", task="vace-tiny")
    module = {k: v.contiguous() for k, v in ours.state_dict().items() if k.startswith("vace_")}
    save_file(module, str(tmp_path / "module.safetensors"))
    with pytest.raises(CheckpointError, match="only the VACE blocks"):
        load_dit(tmp_path / "module.safetensors")


def test_real_variants_have_the_official_shapes():
    with torch.device("meta"):
        small = build_dit(get_variant("vace-1.3B"))
        big = build_dit(get_variant("vace-14B"))
    assert get_variant("vace-1.3B").vace_layers == tuple(range(0, 30, 2))  # 15 VACE blocks
    assert len(big.vace_blocks) == 8 and get_variant("vace-fun-A14B").two_experts
    assert small.vace_patch_embedding.weight.shape == (1536, 96, 1, 2, 2)
    assert "vace_blocks.0.before_proj.weight" in small.state_dict()
    assert "vace_blocks.1.before_proj.weight" not in small.state_dict()
    vace_params = sum(p.numel() for n, p in big.named_parameters() if n.startswith("vace_"))
    assert vace_params == 8 * (sum(p.numel() for p in big.blocks[0].parameters()) + 5120 * 5120 + 5120) + \
        5120 * 5120 + 5120 + 96 * 4 * 5120 + 5120


def test_lora_module_names_agree_with_the_checkpoint_map():
    from networks import lora_wan
    from networks.convert import diffusers_name

    ref = diffusers_vace(get_variant("vace-tiny"))
    for name, module in ref.named_modules():
        if isinstance(module, torch.nn.Linear) and "vace_blocks" in name:
            official = diffusers_to_official(name + ".weight")[: -len(".weight")]
            assert lora_wan.diffusers_module_to_official(name) == official and diffusers_name(official) == name

"""`load_vae` and `load_text_encoder` over their file formats, and their clear errors."""

from __future__ import annotations

import shutil

import pytest
import torch
from safetensors.torch import save_file

from library.wan.checkpoint_files import CheckpointError
from library.wan.loading import load_text_encoder, load_vae
from library.wan.vae import WanVAE
from library.wan.vae22 import Wan22VAE
from tests.helpers import random_official_dit_state
from library.wan.text_encoder import t5_state_dict_from_official
from library.wan.variants import get_variant
from tests.wan.test_text_encoder import official_state_dict

VAES = {
    "2.1": (WanVAE, dict(dim=8, z_dim=16), dict(base_dim=8, z_dim=16), 16),
    "2.2": (Wan22VAE, dict(dim=8, decoder_dim=12, z_dim=48),
            dict(base_dim=8, decoder_base_dim=12, z_dim=48, is_residual=True, patch_size=2, in_channels=12,
                 out_channels=12, scale_factor_spatial=16), 32),
}


def save(path, sd):
    save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    return path


@pytest.mark.parametrize("kind", ["2.1", "2.2"])
@pytest.mark.parametrize("fmt", ["pth", "safetensors", "fp16", "diffusers", "prefixed"])
def test_vae_formats_load_the_same_model(tmp_path, kind, fmt):
    cls, kwargs, diffusers_kwargs, size = VAES[kind]
    torch.manual_seed(0)
    ref = cls(**kwargs).eval()
    sd = ref.state_dict()
    if fmt == "pth":
        path = tmp_path / "vae.pth"
        torch.save(sd, path)
    elif fmt == "diffusers":  # the same weights under diffusers names, via diffusers' own model
        diffusers = pytest.importorskip("diffusers")
        from library.wan.vae_formats import vae21_state_dict_from_diffusers, vae22_state_dict_from_diffusers

        twin = diffusers.AutoencoderKLWan(**diffusers_kwargs)
        convert = vae21_state_dict_from_diffusers if kind == "2.1" else vae22_state_dict_from_diffusers
        names = convert({k: k for k in twin.state_dict()})  # official name -> diffusers name
        path = save(tmp_path / "vae.safetensors", {names[k]: v for k, v in sd.items()})
    else:
        data = {k: v.half() for k, v in sd.items()} if fmt == "fp16" else sd
        if fmt == "prefixed":
            data = {f"first_stage_model.{k}": v for k, v in data.items()}
        path = save(tmp_path / "vae.safetensors", data)
    vae = load_vae(path)
    assert type(vae) is cls and not vae.training
    video = torch.rand(1, 3, 5, size, size) * 2 - 1
    with torch.no_grad():
        expected, got = ref.encode(video), vae.encode(video)
    tol = 2e-2 if fmt == "fp16" else 1e-6
    assert (got - expected).abs().max() <= tol * expected.abs().max()


def test_dit_passed_as_vae_is_a_clear_error(tmp_path):
    path = save(tmp_path / "dit.safetensors", random_official_dit_state(get_variant("t2v-tiny")))
    with pytest.raises(CheckpointError, match=r"dit\.safetensors: this is a WAN DiT, not a WAN VAE"):
        load_vae(path)


def test_truncated_vae_is_a_clear_error(tmp_path):
    path = save(tmp_path / "vae.safetensors", WanVAE(dim=8).state_dict())
    path.write_bytes(path.read_bytes()[:-64])
    with pytest.raises(CheckpointError, match="truncated"):
        load_vae(path)


@pytest.fixture(scope="module")
def t5_sd():
    return official_state_dict()


@pytest.mark.parametrize("fmt", ["official_pth", "hf_safetensors", "comfy_fp16"])
def test_text_encoder_formats(tmp_path, t5_sd, tiny_umt5_tokenizer_dir, fmt):
    if fmt == "official_pth":
        path = tmp_path / "models_t5_umt5-xxl-enc-bf16.pth"
        torch.save({k: v.bfloat16() for k, v in t5_sd.items()}, path)
    else:
        dtype = torch.float16 if fmt == "comfy_fp16" else torch.float32
        hf = {k: v.to(dtype).clone() for k, v in t5_state_dict_from_official(t5_sd).items()}
        if fmt == "comfy_fp16":  # ComfyUI files may carry only one copy of the tied embedding
            del hf["encoder.embed_tokens.weight"]
        path = save(tmp_path / "umt5_xxl.safetensors", hf)
    encoder = load_text_encoder(path, tiny_umt5_tokenizer_dir, dtype=torch.float32)
    out = encoder.encode(["a cat walks over a red field", "dog"])
    assert [o.shape[1] for o in out] == [t5_sd["token_embedding.weight"].shape[1]] * 2
    assert out[0].shape[0] > out[1].shape[0] >= 2  # true lengths, EOS included


def test_tokenizer_found_beside_the_weights(tmp_path, t5_sd, tiny_umt5_tokenizer_dir):
    path = tmp_path / "models_t5_umt5-xxl-enc-bf16.pth"
    torch.save(t5_sd, path)
    with pytest.raises(CheckpointError, match=r"no tokenizer given and none found beside it"):
        load_text_encoder(path)
    shutil.copytree(tiny_umt5_tokenizer_dir, tmp_path / "google" / "umt5-xxl")
    assert load_text_encoder(path, dtype=torch.float32).encode(["x"])[0].dim() == 2


def test_tokenizer_found_in_a_hugging_face_folder(tmp_path, t5_sd, tiny_umt5_tokenizer_dir):
    """A Hugging Face umT5 folder keeps spiece.model beside its weights, not in a sub-folder."""
    folder = tmp_path / "umt5-xxl-hf"
    shutil.copytree(tiny_umt5_tokenizer_dir, folder)
    save(folder / "model.safetensors", {k: v.clone() for k, v in t5_state_dict_from_official(t5_sd).items()})
    assert load_text_encoder(folder, dtype=torch.float32).encode(["x"])[0].dim() == 2
    assert load_text_encoder(folder / "model.safetensors", dtype=torch.float32).encode(["x"])[0].dim() == 2


def test_vae_passed_as_text_encoder_is_a_clear_error(tmp_path, tiny_umt5_tokenizer_dir):
    path = save(tmp_path / "wan_2.1_vae.safetensors", WanVAE(dim=8).state_dict())
    with pytest.raises(CheckpointError, match=r"wan_2\.1_vae\.safetensors: this is a WAN VAE, not a umT5"):
        load_text_encoder(path, tiny_umt5_tokenizer_dir)

"""The model loaders (DiT, VAE, umT5) against hostile files: random bytes, empty and cut files, headers that
lie, a pickle that would run a command, other architectures, a WAN file in the wrong role, a missing
tensor and NaN weights. Each is a CheckpointError (a UserError, so every command line shows it and exits
with 2) naming the file and what to do; the pickle's command never runs. The loaders are called directly
(the command lines that reach them are in test_training_setup_cli.py and test_tools_cli.py; the caching tools
refusing a NaN VAE / umT5 file with exit status 2 are here)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from library.errors import UserError, run_cli
from library.wan.checkpoint_files import CheckpointError
from library.wan.dit_formats import describe_checkpoint
from library.wan.fp8 import FP8Config
from library.wan.loading import load_dit, load_text_encoder, load_vae

from . import model_files as mf
from .conftest import assert_refused, copy_demo, run_tool

REFETCH = "the download or copy did not finish, fetch the file again"
DAMAGED_PTH = ("the file is damaged, truncated or not a model: download it again, or use the .safetensors "
               "release")
REFUSED = ("refused: unpickling it would import posix.system (code, not weights), so it was not loaded; a model "
           "file holds tensors only: use the model's .safetensors release, or a file from a source you trust")

# name: (make the file in `folder` (from the tiny model set `m`), the message after "{path}: ")
BROKEN = {
    "random bytes (.safetensors)": (
        lambda folder, m: mf.random_bytes(folder / "random.safetensors"),
        "not a safetensors file, or truncated (header length 7106521602475165645 for a 4096-byte file); "
        "re-download or re-export it"),
    "random bytes (.pth)": (
        lambda folder, m: mf.random_bytes(folder / "random.pth"),
        "not a torch checkpoint (neither a zip archive nor a pickle: it starts with bytes cd 07 2c d8); the file is "
        "damaged or not a model: download it again"),
    "zero bytes (.safetensors)": (
        lambda folder, m: mf.zero_bytes(folder / "empty.safetensors"),
        f"is empty (0 bytes), too short to be a safetensors file; {REFETCH}"),
    "zero bytes (.pth)": (lambda folder, m: mf.zero_bytes(folder / "empty.pth"), f"is empty (0 bytes); {REFETCH}"),
    "truncated (.safetensors)": (
        lambda folder, m: mf.truncated(m.dit, folder / "cut.safetensors"),
        "truncated: the header promises {full} bytes but the file has {size}; " + REFETCH),
    "truncated (.pth zip)": (
        lambda folder, m: mf.truncated(m.vae, folder / "cut.pth"),
        "not a readable torch checkpoint (PytorchStreamReader failed reading zip archive: failed finding central "
        f"directory); {DAMAGED_PTH}"),
    "header length of 1 TiB": (
        lambda folder, m: mf.huge_header(folder / "huge.safetensors"),
        "not a safetensors file, or truncated (header length 1099511627776 for a 17-byte file); re-download or "
        "re-export it"),
    "header over the 100 MiB limit": (
        lambda folder, m: mf.header_over_limit(folder / "big_header.safetensors"),
        "its header claims 104,857,608 bytes, over the limit of 104,857,600 (a real model's header is a few MB): the "
        "file is damaged or not a model; re-download or re-export it"),
    "header nested 100,000 deep": (
        lambda folder, m: mf.nesting_bomb(folder / "nested.safetensors"),
        "unreadable safetensors header (nested too deeply); the file is damaged: re-download or re-export it"),
    "offsets that do not fit the shape": (
        lambda folder, m: mf.lying_offsets(folder / "offsets.safetensors"),
        "damaged safetensors header: tensor 'w' spans 8 bytes, but its shape [4, 4] needs 64; re-download or "
        "re-export the file"),
    "pickle running a command (raw)": (
        lambda folder, m: mf.code_pickle(folder / "raw.pth", folder / "PWNED", zipped=False), REFUSED),
    "pickle running a command (torch.save)": (
        lambda folder, m: mf.code_pickle(folder / "zip.pth", folder / "PWNED", zipped=True), REFUSED),
}
WANT = {"dit": "a WAN DiT", "vae": "a WAN VAE", "t5": "a umT5 text encoder"}
INSTEAD = {
    "dit": "the WAN DiT (wan2.2_t2v_low_noise_14B_fp16.safetensors, an official folder of shards, ...)",
    "vae": "the WAN VAE (Wan2.1_VAE.pth or wan_2.1_vae.safetensors; Wan2.2_VAE.pth for ti2v-5B)",
    "t5": "the umT5-XXL encoder (models_t5_umt5-xxl-enc-bf16.pth or umt5_xxl_fp16.safetensors)",
}
OTHER = {"SDXL": (mf.SDXL_KEYS, "a Stable Diffusion XL checkpoint (SDXL UNet)"), "Flux": (mf.FLUX_KEYS, "a Flux DiT")}


def _load(role: str, path: Path, models):
    if role == "dit":
        return load_dit(path, task="t2v-tiny")
    if role == "vae":
        return load_vae(path)
    return load_text_encoder(path, models.tokenizer)


@pytest.mark.parametrize("role", WANT)
@pytest.mark.parametrize("case", BROKEN, ids=list(BROKEN))
def test_a_broken_file_is_named_with_what_to_do(tiny_models, tmp_path, case, role):
    make, message = BROKEN[case]
    path = make(tmp_path, tiny_models)
    with pytest.raises(CheckpointError) as error:
        _load(role, path, tiny_models)
    full = tiny_models.dit.stat().st_size
    assert str(error.value) == f"{path}: " + message.format(full=full, size=full // 2)
    assert isinstance(error.value, UserError)
    assert not (tmp_path / "PWNED").exists()  # the pickle's command never ran


@pytest.mark.parametrize("role", WANT)
@pytest.mark.parametrize("other", OTHER)
def test_another_architecture_is_named(tiny_models, tmp_path, role, other):
    keys, what = OTHER[other]
    path = mf.keys_file(tmp_path / f"{other}.safetensors", keys)
    with pytest.raises(CheckpointError) as error:
        _load(role, path, tiny_models)
    assert str(error.value) == f"{path}: this is {what}, not {WANT[role]}; pass {INSTEAD[role]} instead"


# (the file's role, the role it was given as, where the message sends it)
MISPLACED = [
    ("vae", "t5", "pass it as `vae`"), ("t5", "vae", "pass it as `t5`"), ("dit", "vae", "pass it as `dit` (or "
                                                                          "`dit_high_noise`)"),
    ("vae", "dit", "pass it as `vae`"), ("t5", "dit", "pass it as `t5`"), ("dit", "t5", "pass it as `dit` (or "
                                                                                       "`dit_high_noise`)"),
]


@pytest.mark.parametrize("kind,given,advice", MISPLACED)
def test_a_wan_file_in_the_wrong_role_is_sent_to_its_key(tiny_models, kind, given, advice):
    path = {"dit": tiny_models.dit, "vae": tiny_models.vae, "t5": tiny_models.t5}[kind]
    with pytest.raises(CheckpointError) as error:
        _load(given, path, tiny_models)
    assert str(error.value) == f"{path}: this is {WANT[kind]}, not {WANT[given]}; {advice}"


def test_a_dit_with_a_missing_tensor_is_refused(tiny_models, tmp_path):
    path = mf.without_key(tiny_models.dit, tmp_path / "incomplete.safetensors", "blocks.0.self_attn.q.weight")
    with pytest.raises(CheckpointError) as error:
        load_dit(path, task="t2v-tiny")
    assert str(error.value) == (
        f"{path}: WAN DiT (t2v-tiny) keys do not match: 1 missing (e.g. blocks.0.self_attn.q.weight); the file is "
        "incomplete or holds another model: download it again, or pass the file made for this model")
    path = mf.without_key(tiny_models.dit, tmp_path / "headless.safetensors", "head.head.weight")
    with pytest.raises(CheckpointError, match="WAN DiT key 'head.head.weight' is missing; the file is incomplete: "
                                              "download it again"):
        load_dit(path, task="t2v-tiny")


@pytest.mark.parametrize("value,counts", [(float("nan"), "1 NaN and 0 infinite"), (float("inf"), "0 NaN and 1 "
                                                                                                  "infinite")])
@pytest.mark.parametrize("fp8", [None, FP8Config()], ids=["bf16", "fp8_base"])
def test_non_finite_dit_weights_are_refused_naming_the_tensor(tiny_models, tmp_path, value, counts, fp8):
    path = mf.with_value(tiny_models.dit, tmp_path / "nan.safetensors", "blocks.1.ffn.0.weight", value)
    numel = load_dit(tiny_models.dit, task="t2v-tiny").blocks[1].ffn[0].weight.numel()
    with pytest.raises(CheckpointError) as error:
        load_dit(path, task="t2v-tiny", dtype=torch.bfloat16, fp8=fp8)
    assert str(error.value) == (
        f"{path}: tensor 'blocks.1.ffn.0.weight' holds {counts} values (of {numel}); the file is damaged or was "
        "saved from a diverged training: use another copy of the model (or an earlier checkpoint)")


@pytest.mark.parametrize("tool,key", [("cache_latents", "decoder.head.2.weight"),
                                      ("cache_text_encoder_outputs", "blocks.0.attn.q.weight")])
def test_caching_with_a_nan_model_file_exits_2_naming_file_and_tensor(tiny_models, demo_source, tmp_path, tool,
                                                                      key):
    source = tiny_models.vae if tool == "cache_latents" else tiny_models.t5
    state = torch.load(source, weights_only=True)
    state[key].view(-1)[0] = float("nan")
    path = tmp_path / f"nan_{source.name}"
    torch.save(state, path)
    root = copy_demo(demo_source, tmp_path)
    flags = ["--vae", path] if tool == "cache_latents" else ["--t5", path, "--tokenizer", tiny_models.tokenizer]
    result = run_tool(tool, "--dataset_config", root / "dataset.toml", *flags, "--device", "cpu", "--no_progress")
    assert_refused(result, f"{path}: tensor {key!r} holds 1 NaN and 0 infinite values (of ")
    assert "use another copy of the model" in result.stdout + result.stderr
    assert not list(root.rglob("*.safetensors"))  # no cache written from a NaN model


def test_run_cli_shows_the_message_and_exits_2(tiny_models, tmp_path, capsys):
    path = mf.zero_bytes(tmp_path / "empty.safetensors")
    assert run_cli(load_vae, path) == 2
    assert capsys.readouterr().err == (f"error: {path}: is empty (0 bytes), too short to be a safetensors file; "
                                       f"{REFETCH}\n")
    with pytest.raises(ZeroDivisionError):  # anything else is a bug of ours: it keeps its traceback
        run_cli(lambda: 1 / 0)


# what describe_checkpoint calls a file, by its key names (two or three telling keys of each family)
FAMILIES = {
    "SDXL (original names)": (mf.SDXL_KEYS, "a Stable Diffusion XL checkpoint (SDXL UNet)"),
    "SDXL UNet (diffusers)": (["add_embedding.linear_1.weight", "down_blocks.0.resnets.0.conv1.weight"],
                              "a Stable Diffusion XL checkpoint (SDXL UNet)"),
    "SD 1.5": (["model.diffusion_model.input_blocks.0.0.weight",
                "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight",
                "first_stage_model.decoder.conv_in.weight"], "a Stable Diffusion 1.x / 2.x checkpoint (UNet)"),
    "Flux": (mf.FLUX_KEYS, "a Flux DiT"),
    "Flux (diffusers)": (["single_transformer_blocks.0.attn.to_q.weight", "x_embedder.weight"], "a Flux DiT"),
    "HunyuanVideo": (["double_blocks.0.img_attn_qkv.weight", "txt_in.individual_token_refiner.blocks.0.mlp.fc1."
                      "weight"], "a HunyuanVideo DiT"),
    "SD3": (["joint_blocks.0.x_block.attn.qkv.weight", "pos_embed", "x_embedder.proj.weight"],
            "a Stable Diffusion 3 DiT (MMDiT)"),
    "SD VAE": (["encoder.down.0.block.0.conv1.weight", "decoder.up.0.block.0.conv1.weight", "post_quant_conv.weight"],
               "a Stable Diffusion / Flux VAE (2D, not WAN's video VAE)"),
    "CLIP-L text encoder": (["text_model.encoder.layers.0.self_attn.q_proj.weight",
                             "text_model.embeddings.token_embedding.weight"],
                            "a CLIP text encoder (Stable Diffusion / Flux), not umT5"),
    "T5 v1.1": (["encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight",
                 "encoder.block.1.layer.0.SelfAttention.q.weight", "encoder.final_layer_norm.weight"],
                "a T5 text encoder (T5-XXL v1.1, as Flux and SD3 use), not umT5"),
    "umT5": (["encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight",
              "encoder.block.1.layer.0.SelfAttention.relative_attention_bias.weight",
              "encoder.block.1.layer.0.SelfAttention.q.weight"], "a umT5 text encoder"),
    "WAN DiT (diffusers)": (["condition_embedder.time_embedder.linear_1.weight", "blocks.0.attn1.to_q.weight"],
                            "a WAN DiT"),
    "WAN VAE": (["encoder.downsamples.0.residual.0.gamma", "decoder.middle.0.residual.0.gamma"], "a WAN VAE"),
    "WAN CLIP": (["visual.transformer.0.attn.to_qkv.weight", "textual.token_embedding.weight"], "a CLIP model"),
}


@pytest.mark.parametrize("family", FAMILIES)
def test_checkpoint_families_are_told_apart(family):
    keys, name = FAMILIES[family]
    assert describe_checkpoint(keys) == name

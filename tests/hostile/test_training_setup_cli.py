"""train_network_wan.py and finetune/fine_tune_wan.py against bad setups: broken, hostile or misplaced model
files, a dataset that is not cached or has nothing in it, a resume that points nowhere, an output folder
that is a file, numbers that are not finite, LoRA settings in a full fine-tune, sample prompts that cannot
work, an unknown optimizer. Each stops the run with one message naming the file or key and what to do,
exit status 2 and no traceback, before anything is written over: an earlier save in the output folder is
untouched.

Cases the trainer itself meets (a model file, the dataset, the state) run the entry script in a
subprocess on the tiny models; those `validate` and `check_inputs` catch before any model loads run
`library.training.cli.main` in this process (the function both entry scripts are), a subprocess for each
kind proving the scripts exit the same way."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from library.training import cli
from library.wan.variants import get_variant
from tests.helpers import random_official_dit_state

from . import model_files as mf
from .conftest import REPO, assert_refused

EARLIER = b"an earlier save of this run"


def flags(models, demo: Path, out: Path, **over) -> list[str]:
    values = {"task": "t2v-tiny", "dit": models.dit, "dit_high_noise": models.dit_high_noise,
              "dataset_config": demo / "dataset.toml", "output_dir": out, "output_name": "lora", "network_dim": 4,
              "learning_rate": 1e-3, "max_train_steps": 1, "max_data_loader_n_workers": 0, **over}
    return [arg for k, v in values.items() if v is not None for arg in (f"--{k}", str(v))]


def with_samples(folder: Path, models, **over) -> dict:
    prompts = folder / "prompts.txt"
    prompts.write_text("a cat walks on grass --w 32 --h 32 --f 5 --s 2\n")
    return {"sample_prompts": prompts, "sample_every_n_steps": 1, "vae": models.vae, "t5": models.t5,
            "t5_tokenizer": models.tokenizer, **over}


def _i2v_dit(path: Path) -> Path:
    save_file(random_official_dit_state(get_variant("i2v-tiny")), str(path))
    return path


def _uncached(folder: Path, demo: Path) -> dict:
    data = folder / "uncached"
    shutil.copytree(demo, data, ignore=shutil.ignore_patterns("cache"))
    return {"dataset_config": data / "dataset.toml"}


def _empty(folder: Path, demo: Path) -> dict:
    (folder / "none").mkdir()
    toml = folder / "empty.toml"
    toml.write_text(f'[general]\nresolution = [32, 32]\n[[datasets]]\nimage_directory = "{folder / "none"}"\n'
                    f'cache_directory = "{folder / "cache"}"\n')
    return {"dataset_config": toml}


REFETCH = "the download or copy did not finish, fetch the file again"
I2V, T2V = get_variant("i2v-tiny").describe(), get_variant("t2v-tiny").describe()
# name: (the flags to change, from (folder, models, demo); the message, formatted with those flags)
TRAINER = {
    "dit: random bytes": (
        lambda f, m, d: {"dit": mf.random_bytes(f / "random.safetensors")},
        "error: {dit}: not a safetensors file, or truncated (header length 7106521602475165645 for a 4096-byte "
        "file); re-download or re-export it"),
    "dit: a pickle that would run a command": (
        lambda f, m, d: {"dit": mf.code_pickle(f / "evil.pth", f / "PWNED", zipped=False)},
        "error: {dit}: refused: unpickling it would import posix.system (code, not weights), so it was not loaded; "
        "a model file holds tensors only: use the model's .safetensors release, or a file from a source you trust"),
    "dit: a NaN weight": (
        lambda f, m, d: {"dit": mf.with_value(m.dit, f / "nan.safetensors", "blocks.0.self_attn.q.weight")},
        "error: {dit}: tensor 'blocks.0.self_attn.q.weight' holds 1 NaN and 0 infinite values (of 1024); the file "
        "is damaged or was saved from a diverged training: use another copy of the model (or an earlier "
        "checkpoint)"),
    "dit: an SDXL checkpoint": (
        lambda f, m, d: {"dit": mf.keys_file(f / "sdxl.safetensors", mf.SDXL_KEYS)},
        "error: {dit}: this is a Stable Diffusion XL checkpoint (SDXL UNet), not a WAN DiT; pass the WAN DiT "
        "(wan2.2_t2v_low_noise_14B_fp16.safetensors, an official folder of shards, ...) instead"),
    "dit_high_noise: another variant": (
        lambda f, m, d: {"dit_high_noise": _i2v_dit(f / "i2v.safetensors")},
        f"error: {{dit_high_noise}}: checkpoint is {I2V}, but the configured task is {T2V}; set `task` to match the "
        "checkpoint, or pass the checkpoint for this task"),
    "dit_high_noise: truncated": (
        lambda f, m, d: {"dit_high_noise": mf.truncated(m.dit_high_noise, f / "cut.safetensors")},
        "error: {dit_high_noise}: truncated: the header promises "),
    "vae: the umT5 file": (
        lambda f, m, d: with_samples(f, m, vae=m.t5),
        "error: {vae}: this is a umT5 text encoder, not a WAN VAE; pass it as `t5`"),
    "vae: zero bytes": (
        lambda f, m, d: with_samples(f, m, vae=mf.zero_bytes(f / "vae.pth")),
        f"error: {{vae}}: is empty (0 bytes); {REFETCH}"),
    "t5: the VAE file": (
        lambda f, m, d: with_samples(f, m, t5=m.vae),
        "error: {t5}: this is a WAN VAE, not a umT5 text encoder; pass it as `vae`"),
    "t5: a truncated .pth": (
        lambda f, m, d: with_samples(f, m, t5=mf.truncated(m.t5, f / "t5.pth")),
        "error: {t5}: not a readable torch checkpoint (PytorchStreamReader failed reading zip archive: failed "
        "finding central directory); the file is damaged, truncated or not a model: download it again, or use "
        "the .safetensors release"),
    "dataset: not cached": (
        lambda f, m, d: _uncached(f, d),
        "cache problem(s)"),
    "dataset: no usable item": (
        lambda f, m, d: _empty(f, d),
        "error: {dataset_config}: [[datasets]] #0 ({folder}/none): no usable item (0 skipped)"),
    "resume: a folder that is not a state": (
        lambda f, m, d: {"resume": f},
        "error: resume: {resume} is not a training state folder"),
    "resume: latest with no state": (
        lambda f, m, d: {"resume": "latest"},
        "error: resume = 'latest' but {out} holds no"),
}


@pytest.mark.parametrize("case", TRAINER, ids=list(TRAINER))
def test_the_trainer_refuses_a_bad_setup(tiny_models, cached_demo, tmp_path, case):
    make, message = TRAINER[case]
    out = tmp_path / "out"
    out.mkdir()
    (out / "lora_low_noise-step00000001.safetensors").write_bytes(EARLIER)
    changed = make(tmp_path, tiny_models, cached_demo)
    result = subprocess.run([sys.executable, str(REPO / "train_network_wan.py"),
                             *flags(tiny_models, cached_demo, out, **changed)],
                            cwd=tmp_path, capture_output=True, text=True, timeout=300)
    output = assert_refused(result, message.format(**changed, out=out, folder=tmp_path))
    if case == "dataset: not cached":
        assert "python tools/cache_latents.py --dataset_config" in output
    assert (out / "lora_low_noise-step00000001.safetensors").read_bytes() == EARLIER
    assert not list(out.glob("*.safetensors"))[1:]  # nothing saved beside it
    assert not (tmp_path / "PWNED").exists()


def _output_in_a_file(folder: Path, models) -> dict:
    (folder / "file").write_text("not a folder")
    return {"output_dir": folder / "file" / "out"}


def _empty_prompts(folder: Path, models) -> dict:
    (folder / "empty.txt").write_text("# only a comment\n\n")
    return with_samples(folder, models, sample_prompts=folder / "empty.txt")


# name: (the flags to change, from (folder, models); the message; full fine-tuning?)
CONFIG = {
    "learning_rate = nan": (lambda f, m: {"learning_rate": "nan"}, "`learning_rate` = nan must be a finite number "
                                                                   "(not nan or inf)", False),
    "learning_rate = inf": (lambda f, m: {"learning_rate": "inf"}, "`learning_rate` = inf must be a finite number "
                                                                   "(not nan or inf)", False),
    "max_grad_norm = 'nan'": (lambda f, m: {"max_grad_norm": "nan"}, "`max_grad_norm` = nan must be a finite "
                                                                     "number (not nan or inf)", False),
    "discrete_flow_shift = inf": (lambda f, m: {"discrete_flow_shift": "inf"}, "`discrete_flow_shift` = inf must be "
                                                                               "a finite number", False),
    "full fine-tuning with network_dim": (
        lambda f, m: {"network_dim": 16, "dit_high_noise": None},
        "`network_dim` = 16 is a LoRA setting and cannot be used with full fine-tuning (it trains the DiT's own "
        "weights): remove it, or train a LoRA with train_network_wan.py", True),
    "full fine-tuning with save_lora_format": (
        lambda f, m: {"network_dim": None, "save_lora_format": "comfyui", "dit_high_noise": None},
        "`save_lora_format` = 'comfyui' is a LoRA setting and cannot be used with full fine-tuning", True),
    "full fine-tuning with network_alpha": (
        lambda f, m: {"network_dim": None, "network_alpha": 8, "dit_high_noise": None},
        "`network_alpha` = 8.0 is a LoRA setting and cannot be used with full fine-tuning", True),
    "full fine-tuning with a preset": (
        lambda f, m: {"network_dim": None, "preset": "character", "dit_high_noise": None},
        "`preset` = 'character' holds the guide's LoRA settings (rank, alpha, a LoRA learning rate) and cannot be "
        "used with full fine-tuning: remove it and set `learning_rate` (1e-5 or lower for a full fine-tune)", True),
    "dit and dit_high_noise one file": (
        lambda f, m: {"dit_high_noise": m.dit.parent / "." / m.dit.name},
        "`dit` and `dit_high_noise` are the same file ({dit}): WAN 2.2 A14B has two experts; pass low_noise_model "
        "as `dit` and high_noise_model as `dit_high_noise`, or drop `dit_high_noise` to train one expert", False),
    "dit that does not exist": (lambda f, m: {"dit": "models/wan_low.safetensors"},
                                "`dit` = models/wan_low.safetensors: no such file or folder (looked for "
                                "{folder}/models/wan_low.safetensors); check the path", False),
    "output_dir is a file": (lambda f, m: {"output_dir": mf.zero_bytes(f / "out.txt")},
                             "`output_dir` = {output_dir} is a file, not a folder; point output_dir at a folder (it "
                             "is created when missing)", False),
    "output_dir inside a file": (_output_in_a_file,
                                 "`output_dir` = {output_dir} is inside {folder}/file, which is a file, not a folder",
                                 False),
    "samples without vae and t5": (
        lambda f, m: with_samples(f, m, vae=None, t5=None),
        "`sample_prompts` needs `vae` and `t5` (the prompts are encoded once at the start and the samples decoded "
        "with the VAE)", False),
    "a sample prompt file that does not exist": (
        lambda f, m: with_samples(f, m, sample_prompts=f / "nowhere.txt"),
        "`sample_prompts` = {sample_prompts}: no such file or folder; check the path", False),
    "an empty sample prompt file": (
        _empty_prompts,
        "`sample_prompts` = {sample_prompts}: it holds no prompt; write one prompt per line (for example: a cat "
        "walks on grass --w 832 --h 480 --f 81 --d 42 --s 20), or remove sample_prompts", False),
    "an unknown optimizer": (
        lambda f, m: {"optimizer_type": "AdamW9bit"},
        "`optimizer_type` = 'AdamW9bit' is neither a known optimizer (AdamW, AdamW8bit, PagedAdamW8bit, AdaFactor, "
        "Lion, Prodigy) nor a dotted class path (e.g. torch.optim.SGD)", False),
    "an optimizer class that does not import": (
        lambda f, m: {"optimizer_type": "torch.optim.AdamX"},
        "`optimizer_type` = 'torch.optim.AdamX' cannot be imported (module 'torch.optim' has no attribute "
        "'AdamX'); install its package or fix the name", False),
}


@pytest.mark.parametrize("case", CONFIG, ids=list(CONFIG))
def test_a_bad_config_stops_before_any_model_loads(tiny_models, cached_demo, tmp_path, monkeypatch, capsys, case):
    make, message, full = CONFIG[case]
    monkeypatch.chdir(tmp_path)
    changed = make(tmp_path, tiny_models)
    args = flags(tiny_models, cached_demo, tmp_path / "out", **changed)
    assert cli.main(args, full_fine_tune=full) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.startswith("error: ")
    assert message.format(**{"folder": tmp_path, "dit": tiny_models.dit, **changed}) in err
    assert not (tmp_path / "out").exists()  # nothing was created


@pytest.mark.parametrize("script,full", [("train_network_wan.py", False), ("finetune/fine_tune_wan.py", True)])
def test_both_entry_scripts_exit_2_on_a_config_error(tiny_models, cached_demo, tmp_path, script, full):
    over = {"network_dim": 32, "dit_high_noise": None} if full else {"learning_rate": "nan"}
    result = subprocess.run([sys.executable, str(REPO / script), *flags(tiny_models, cached_demo, tmp_path, **over)],
                            cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert_refused(result, "`network_dim` = 32 is a LoRA setting" if full else "`learning_rate` = nan must be a "
                                                                                "finite number")


def test_gpu_out_of_memory_points_to_the_planner(tiny_models, cached_demo, tmp_path, monkeypatch, capsys):
    from library.training.trainer import Trainer

    def out_of_memory(self):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (GPU 0; 23.6 GiB total)\n"
                                          "Of the allocated memory ...")

    monkeypatch.setattr(Trainer, "run", out_of_memory)
    assert cli.main(flags(tiny_models, cached_demo, tmp_path / "out")) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert err == ("error: the GPU ran out of memory (CUDA out of memory. Tried to allocate 2.00 GiB (GPU 0; 23.6 GiB "
                   "total)): these settings do not fit this card. `python tools/plan_memory.py --task t2v-tiny "
                   "--width W --height H --frames F` (your largest bucket) shows what fits: gradient_checkpointing, "
                   "fp8_base, blocks_to_swap, a smaller batch or resolution; auto_memory = true picks it for you. "
                   "Saves made before are kept (resume = 'latest' continues from the last state)\n")


def test_a_copy_of_one_expert_as_the_other_is_a_warning(tiny_models, cached_demo, tmp_path, caplog):
    from library.config import load_config, validate

    copy = tmp_path / "copy_of_low_noise.safetensors"
    shutil.copyfile(tiny_models.dit, copy)
    cfg = validate(load_config(flags(tiny_models, cached_demo, tmp_path / "out", dit_high_noise=copy)))
    cli.check_inputs(cfg)  # two paths: allowed, but said
    assert f"`dit` ({tiny_models.dit}) and `dit_high_noise` ({copy}) hold the same bytes" in caplog.text
    caplog.clear()
    cli.check_inputs(validate(load_config(flags(tiny_models, cached_demo, tmp_path / "out"))))
    assert "hold the same bytes" not in caplog.text  # the two real experts share a header, not their weights

"""musubi-tuner-gui's default WAN run, unchanged, on this trainer: its three command lines and its TOML.

This checkout sits where the GUI keeps musubi-tuner (`<gui>/musubi-tuner`, here a link), and the commands
are the ones `train_model` in bmaltais/musubi-tuner-gui `lora_gui.py` (commit 1b5a41ed) builds from its
widgets, reproduced by `tests/musubi_gui.py` (sources listed there): `uv run` is this interpreter and `uv run
accelerate launch` is `python -m accelerate.commands.launch` with the same flags. The widgets keep the GUI's
defaults except what a WAN user sets: the architecture, the model and dataset paths, `network_module` and
an attention flag (musubi-tuner needs both), the CPU as the caching device, no mixed precision (this
machine has no GPU), two steps, a sample prompt file, and in the GUI's "Additional parameters" the tiny
test variant (`--task t2v-tiny`: the real task names need real weights) and `--max_data_loader_n_workers 0`
(the GUI drops a 0 from its TOML). The caching commands get the GUI's `--vae_dtype float16
--vae_spatial_tile_sample_min_size 256 --console_width 80`, the training TOML its `model_version = "original"`,
`dit_dtype`, `guidance_scale`, `max_grad_norm = 1` and `timestep_boundary = 875`.
"""

from __future__ import annotations

import os
import subprocess

import pytest
import toml
from safetensors import safe_open

from tests.helpers import REPO
from tests.musubi_gui import cache_latents_command, cache_text_command, gui_fields, train_command, write_run_toml

PROMPT = "a red ball rolls on grass --w 32 --h 32 --f 1 --s 2 --d 3\n"


def _run(cmd: list[str], cwd, what: str) -> str:
    env = dict(os.environ, PYTHONPATH="")  # the GUI's environment, not this repo's test path
    out = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, f"{what}: {' '.join(cmd)}\n{out.stdout[-2000:]}\n{out.stderr[-4000:]}"
    return out.stdout + out.stderr


@pytest.mark.slow
def test_the_guis_default_wan_run_caches_trains_and_samples(tmp_path):
    from library.prep.demo_dataset import write_demo_dataset
    from library.wan.tiny import write_tiny_model_set

    gui = tmp_path / "musubi-tuner-gui"
    gui.mkdir()
    (gui / "musubi-tuner").symlink_to(REPO, target_is_directory=True)
    models = write_tiny_model_set(tmp_path / "models", "t2v-tiny")
    dataset = write_demo_dataset(tmp_path / "data", clips=2, images=2, width=32, height=32, frames=9)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text(PROMPT)
    out = tmp_path / "output"
    fields = gui_fields(
        architecture="wan", task="t2v-A14B", dataset_config=str(dataset), dit=str(models.dit),
        dit_high_noise=str(models.dit_high_noise), vae=str(models.vae), t5=str(models.t5), timestep_boundary=875,
        network_module="networks.lora_wan", sdpa=True, output_dir=str(out), output_name="gui_lora",
        caching_latent_device="cpu", caching_teo_device="cpu", mixed_precision="no", max_train_steps=2, seed=42,
        sample_prompts=str(prompts), sample_every_n_steps=2,
        additional_parameters="--task t2v-tiny --max_data_loader_n_workers 0")
    latents_cmd, text_cmd = cache_latents_command(fields), cache_text_command(fields)
    assert latents_cmd[1:] == ["./musubi-tuner/wan_cache_latents.py", "--dataset_config", str(dataset), "--vae",
                               str(models.vae), "--vae_dtype", "float16", "--vae_spatial_tile_sample_min_size", "256",
                               "--device", "cpu", "--console_width", "80"]
    log = _run(latents_cmd, gui, "latent caching")
    assert "VAE tiling: frames larger than 256 px" in log and "skipping --console_width" in log
    _run(text_cmd, gui, "text caching")

    config = write_run_toml(fields)
    written = toml.load(config)
    assert written["model_version"] == "original" and written["timestep_boundary"] == 875
    assert written["max_grad_norm"] == 1 and "architecture" not in written
    log = _run(train_command(fields, config, gui), gui, "training")
    assert "skipping dit_dtype, guidance_scale, model_version" in log
    for expert in ("high_noise", "low_noise"):
        with safe_open(str(out / f"gui_lora_{expert}.safetensors"), "pt") as f:
            assert f.metadata()["ss_network_module"] == "networks.lora_wan"
            assert any(key.startswith("lora_unet_blocks_0_") for key in f.keys())
    assert list((out / "sample").rglob("*.png")) or list((out / "sample").rglob("*.mp4")), "no sample rendered"

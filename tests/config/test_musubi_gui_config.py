"""The configs bmaltais/musubi-tuner-gui really writes for a WAN run, read by this trainer.

The TOMLs are written by `tests/musubi_gui.py`, which reproduces the GUI's writer (`lora_gui.py` train_model
and `common_gui.py` SaveConfigFileToRun / SaveConfigFile at bmaltais/musubi-tuner-gui 1b5a41ed, widget
defaults from its `class_*.py`): flat, sorted, 0 / "" / false dropped, whole floats as ints, and every other
architecture's widget values in it (`model_version = "original"` in every WAN run). The whole run, commands
included, is `tests/test_musubi_gui.py`.
"""

from __future__ import annotations

import logging

import pytest
import toml

from library.config import ConfigError, config_to_dict, load_config, validate
from tests.musubi_gui import GUI_DEFAULTS, gui_fields, run_toml_values, write_run_toml, write_saved_config

# what a WAN 2.2 user sets in the GUI before "Start training" (musubi-tuner needs network_module and an
# attention flag; everything else stays at the GUI's default)
USER = {"architecture": "wan", "task": "t2v-A14B", "dataset_config": "/data/dataset.toml",
        "dit": "/models/wan2.2_t2v_low_noise_14B_fp16.safetensors",
        "dit_high_noise": "/models/wan2.2_t2v_high_noise_14B_fp16.safetensors",
        "vae": "/models/wan_2.1_vae.safetensors",
        "t5": "/models/models_t5_umt5-xxl-enc-bf16.pth", "network_module": "networks.lora_wan", "sdpa": True}


def test_the_default_wan_run_toml_is_what_the_issue_describes(tmp_path):
    values = run_toml_values(gui_fields(**USER, output_dir=str(tmp_path), timestep_boundary=875))
    assert list(values) == sorted(values)
    assert values["model_version"] == "original" and values["max_grad_norm"] == 1 and values["timestep_boundary"] == 875
    assert isinstance(values["max_grad_norm"], int) and values["vae_spatial_tile_sample_min_size"] == 256
    assert not any(v == 0 or v == "" or v is False for v in values.values())
    assert "architecture" not in values and "hv15_task" not in values and "caching_latent_device" not in values


def test_the_default_wan_run_toml_trains_here(tmp_path, caplog):
    caplog.set_level(logging.INFO)
    path = write_run_toml(gui_fields(**USER, output_dir=str(tmp_path), timestep_boundary=875))
    cfg = validate(load_config(["--config_file", str(path)]))
    assert cfg.model.task == "t2v-A14B" and cfg.timesteps.timestep_boundary == 0.875
    assert cfg.loop.mixed_precision == "fp16" and cfg.model.vae_dtype == "float16"
    assert cfg.saving.save_precision == "fp32"
    assert cfg.memory.vae_tile_size == 256  # samples during training decode tile by tile, as asked
    assert cfg.network.network_module == "networks.lora_wan" and cfg.network.network_dim == 32
    assert cfg.optimizer.max_grad_norm == 1.0 and cfg.optimizer.learning_rate == 2e-6
    text = caplog.text
    assert "skipping dit_dtype, guidance_scale, model_version" in text and "no meaning for WAN" in text
    assert "model_version" not in config_to_dict(cfg)


def test_the_guis_saved_config_with_every_architectures_keys_loads(tmp_path, caplog):
    """"Save configuration" keeps every widget: architecture, hv15_task, kandinsky5_task, hidream_*, the
    launcher and caching settings, empty hub fields. All accepted, each skipped with a log line."""
    caplog.set_level(logging.INFO)
    fields = gui_fields(**USER, output_dir=str(tmp_path))
    path = write_saved_config(fields, tmp_path / "saved.toml")
    saved = toml.load(path)
    for key in ("architecture", "hv15_task", "kandinsky5_task", "hidream_task", "hidream_model_type",
                "caching_latent_console_width", "num_processes", "huggingface_token", "dynamo_use_fullgraph"):
        assert key in saved
    cfg = validate(load_config(["--config_file", str(path)]))
    assert cfg.model.dit_high_noise.endswith("high_noise_14B_fp16.safetensors")
    for key in ("hv15_task", "kandinsky5_task", "hidream_model_type", "caching_latent_console_width", "num_processes",
                "block_swap_h2d_only", "architecture", "ddp_static_graph", "persistent_data_loader_workers"):
        assert key in caplog.text, key


def test_a_saved_config_of_another_architecture_is_refused(tmp_path):
    path = write_saved_config(gui_fields(**{**USER, "architecture": "qwen_image"}), tmp_path / "qwen.toml")
    with pytest.raises(ConfigError, match=r"architecture = 'qwen_image': .*trains WAN"):
        load_config(["--config_file", str(path)])


def test_every_gui_field_is_used_skipped_or_refused(monkeypatch, caplog):
    """Each widget of every architecture, set to a value other than its default, is used (the config
    changes), skipped with a log line naming it, or refused with a message naming it: none is an unknown key
    and none is silently taken."""
    monkeypatch.setenv("WANDB_API_KEY", "")  # restored after the test: the loader exports a given key
    caplog.set_level(logging.INFO)
    base = config_to_dict(load_config([]))
    for name, default in GUI_DEFAULTS.items():
        value = True if default is False else "x" if isinstance(default, str) or default is None else 3
        caplog.clear()
        try:
            cfg = load_config([f"--{name}", str(value)] if value is not True else [f"--{name}"])
        except ConfigError as exc:
            assert "unknown key" not in str(exc) and name in str(exc), (name, exc)
            continue
        assert config_to_dict(cfg) != base or (name in caplog.text and "skipping" in caplog.text), name


def test_config_file_without_extension_means_toml(tmp_path, monkeypatch):
    path = write_run_toml(gui_fields(**USER, output_dir=str(tmp_path)))
    cfg = load_config(["--config_file", str(path.with_suffix(""))])
    assert cfg.model.task == "t2v-A14B" and cfg.run.config_file == str(path)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match=r"config file nope not found \(nor nope.toml\)"):
        load_config(["--config_file", "nope"])

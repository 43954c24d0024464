"""Every musubi-tuner WAN training flag, at musubi's default and at a non-default value.

The flags and their defaults are musubi-tuner's WAN training parser as it builds it: `setup_parser_common()`
in `src/musubi_tuner/training/parser_common.py` plus `wan_setup_parser()` in
`src/musubi_tuner/wan_train_network.py`, kohya-ss/musubi-tuner commit 30c658c4f4b0bf05038b3346eff9670259b10fc7
(v0.3.4), listed from the parser's actions (`--config_file` aside). At musubi's default a TOML with all of
them trains here; at any other value each flag is used (the resolved config changes), skipped with a log
line naming it, or refused with an error naming it: never silently ignored.
"""

from __future__ import annotations

import logging

import pytest
import toml

from library.config import ConfigError, config_to_dict, load_config, validate

# name: musubi's default (None: no default value, absent from a TOML)
MUSUBI_WAN_FLAGS: dict[str, object] = {
    "dataset_config": None, "sdpa": False, "flash_attn": False, "sage_attn": False, "xformers": False,
    "flash3": False, "split_attn": False, "compile": False, "compile_backend": "inductor", "compile_mode": "default",
    "compile_dynamic": None, "compile_fullgraph": False, "compile_cache_size_limit": None, "cuda_allow_tf32": False,
    "cuda_cudnn_benchmark": False, "dynamo_backend": "NO", "dynamo_mode": None, "dynamo_fullgraph": False,
    "dynamo_dynamic": False, "max_train_steps": 1600, "max_train_epochs": None, "max_data_loader_n_workers": 8,
    "persistent_data_loader_workers": False, "seed": None, "gradient_checkpointing": False,
    "gradient_checkpointing_cpu_offload": False, "gradient_accumulation_steps": 1, "mixed_precision": None,
    "save_precision": None, "logging_dir": None, "log_with": None, "log_prefix": None, "log_tracker_name": None,
    "wandb_run_name": None, "log_tracker_config": None, "wandb_api_key": None, "log_config": False,
    "ddp_timeout": None, "ddp_gradient_as_bucket_view": False, "ddp_static_graph": False,
    "sample_every_n_steps": None, "sample_at_first": False, "sample_every_n_epochs": None, "sample_prompts": None,
    "optimizer_type": "", "optimizer_args": None, "learning_rate": 2e-6, "max_grad_norm": 1.0,
    "lr_scheduler": "constant", "lr_warmup_steps": 0, "lr_decay_steps": 0, "lr_scheduler_num_cycles": 1,
    "lr_scheduler_power": 1, "lr_scheduler_timescale": None, "lr_scheduler_min_lr_ratio": None,
    "lr_scheduler_type": "", "lr_scheduler_args": None, "fp8_base": False, "blocks_to_swap": None,
    "use_pinned_memory_for_block_swap": False, "block_swap_h2d_only": False, "block_swap_ring_size": 2,
    "img_in_txt_in_offloading": False, "disable_numpy_memmap": False, "guidance_scale": 1.0,
    "timestep_sampling": "sigma", "discrete_flow_shift": 1.0, "sigmoid_scale": 1.0, "weighting_scheme": "none",
    "logit_mean": 0.0, "logit_std": 1.0, "mode_scale": 1.29, "min_timestep": None, "max_timestep": None,
    "preserve_distribution_shape": False, "num_timestep_buckets": None, "show_timesteps": None,
    "no_metadata": False, "network_weights": None, "network_module": None, "network_dim": None, "network_alpha": 1,
    "network_dropout": None, "network_args": None, "training_comment": None, "dim_from_weights": False,
    "scale_weight_norms": None, "base_weights": None, "base_weights_multiplier": None, "output_dir": None,
    "output_name": None, "resume": None, "save_every_n_epochs": None, "save_every_n_steps": None,
    "save_last_n_epochs": None, "save_last_n_epochs_state": None, "save_last_n_steps": None,
    "save_last_n_steps_state": None, "save_state": False, "save_state_on_train_end": False, "metadata_title": None,
    "metadata_author": None, "metadata_description": None, "metadata_license": None, "metadata_tags": None,
    "metadata_reso": None, "metadata_arch": None, "huggingface_repo_id": None, "huggingface_repo_type": None,
    "huggingface_path_in_repo": None, "huggingface_token": None, "huggingface_repo_visibility": None,
    "save_state_to_huggingface": False, "resume_from_huggingface": False, "async_upload": False, "dit": None,
    "vae": None, "vae_dtype": None,
    # wan_setup_parser
    "task": "t2v-14B", "fp8_scaled": False, "t5": None, "fp8_t5": False, "clip": None, "vae_cache_cpu": False,
    "one_frame": False, "force_v2_1_time_embedding": False, "dit_high_noise": None, "timestep_boundary": None,
    "offload_inactive_dit": False,
}

# a value other than musubi's default for each flag that is not a switch
NON_DEFAULT: dict[str, object] = {
    "compile_backend": "eager", "compile_mode": "max-autotune", "compile_dynamic": "true",
    "compile_cache_size_limit": 64, "dynamo_backend": "INDUCTOR", "dynamo_mode": "max-autotune",
    "max_train_steps": 10, "max_train_epochs": 3, "max_data_loader_n_workers": 2, "seed": 1,
    "gradient_accumulation_steps": 2, "mixed_precision": "bf16", "save_precision": "bf16", "logging_dir": "logs",
    "log_with": "tensorboard", "log_prefix": "p_", "log_tracker_name": "t", "wandb_run_name": "r",
    "log_tracker_config": "tracker.toml", "wandb_api_key": "secret", "ddp_timeout": 30,
    "sample_every_n_steps": 5, "sample_every_n_epochs": 1, "sample_prompts": "prompts.txt",
    "optimizer_type": "AdamW8bit", "optimizer_args": ["weight_decay=0.1"], "learning_rate": 1e-4,
    "max_grad_norm": 0.5, "lr_scheduler": "cosine", "lr_warmup_steps": 10, "lr_decay_steps": 0.5,
    "lr_scheduler_num_cycles": 2, "lr_scheduler_power": 2.0, "lr_scheduler_timescale": 10,
    "lr_scheduler_min_lr_ratio": 0.1, "lr_scheduler_type": "torch.optim.lr_scheduler.StepLR",
    "lr_scheduler_args": ["step_size=10"], "blocks_to_swap": 4, "block_swap_ring_size": 3, "guidance_scale": 3.5,
    "timestep_sampling": "shift", "discrete_flow_shift": 3.0, "sigmoid_scale": 2.0, "weighting_scheme": "mode",
    "logit_mean": 0.5, "logit_std": 2.0, "mode_scale": 1.5, "min_timestep": 100, "max_timestep": 900,
    "num_timestep_buckets": 4, "show_timesteps": "image", "network_weights": "w.safetensors",
    "network_module": "lycoris.kohya", "network_dim": 16, "network_alpha": 8, "network_dropout": 0.1,
    "network_args": ["loraplus_lr_ratio=4"], "training_comment": "c", "scale_weight_norms": 1.0,
    "base_weights": ["b.safetensors"], "base_weights_multiplier": [0.5], "output_dir": "out", "output_name": "n",
    "resume": "out/n-state", "save_every_n_epochs": 1, "save_every_n_steps": 10, "save_last_n_epochs": 2,
    "save_last_n_epochs_state": 2, "save_last_n_steps": 20, "save_last_n_steps_state": 20, "metadata_title": "t",
    "metadata_author": "a", "metadata_description": "d", "metadata_license": "l", "metadata_tags": "x,y",
    "metadata_reso": "832,480", "metadata_arch": "wan2.1", "huggingface_repo_id": "me/lora",
    "huggingface_repo_type": "model", "huggingface_path_in_repo": "p", "huggingface_token": "hf_secret",
    "huggingface_repo_visibility": "public", "dit": "low.safetensors", "vae": "vae.pth", "vae_dtype": "float16",
    "dataset_config": "data.toml", "task": "t2v-A14B", "t5": "t5.pth", "clip": "clip.pth",
    "dit_high_noise": "high.safetensors", "timestep_boundary": 900,
}


def test_every_flag_is_listed_once():
    switches = {k for k, v in MUSUBI_WAN_FLAGS.items() if v is False}
    assert set(NON_DEFAULT) | switches == set(MUSUBI_WAN_FLAGS)


def test_all_flags_at_musubi_defaults_train_here(tmp_path):
    """A TOML with every flag that has a default value, at that value (musubi's `block_swap_ring_size = 2`,
    `dynamo_backend = "NO"`, `dynamo_fullgraph = false`, ...), loads and validates."""
    path = tmp_path / "musubi_defaults.toml"
    path.write_text(toml.dumps({k: v for k, v in MUSUBI_WAN_FLAGS.items() if v is not None}))
    cfg = validate(load_config(["--config_file", str(path), "--dit", "low.safetensors", "--dataset_config", "d.toml"]))
    assert cfg.model.task == "t2v-14B" and cfg.optimizer.optimizer_type == "AdamW"  # musubi's "" = not set


def _outcome(flag: str, value, tmp_path, caplog, monkeypatch) -> str:
    monkeypatch.setenv("WANDB_API_KEY", "")  # restored after the test: the loader exports a given key
    empty = tmp_path / "empty.toml"
    empty.write_text("")
    base = {**config_to_dict(load_config(["--config_file", str(empty)])), "config_file": None}
    path = tmp_path / f"{flag}.toml"
    path.write_text(toml.dumps({flag: value}))
    caplog.clear()
    try:
        cfg = load_config(["--config_file", str(path)])
    except ConfigError as exc:
        assert flag in str(exc), exc
        return "error"
    if {**config_to_dict(cfg), "config_file": None} != base:
        return "used"
    assert flag in caplog.text and "skipping" in caplog.text, f"{flag} = {value!r} was silently ignored"
    return "skipped"


@pytest.mark.parametrize("flag", sorted(MUSUBI_WAN_FLAGS))
def test_each_flag_at_a_non_default_value_is_used_skipped_or_refused(flag, tmp_path, caplog, monkeypatch):
    caplog.set_level(logging.INFO)
    value = NON_DEFAULT.get(flag, True)
    outcome = _outcome(flag, value, tmp_path, caplog, monkeypatch)
    expected = {"dynamo_backend": "error", "dynamo_mode": "error", "dynamo_fullgraph": "error",
                "block_swap_ring_size": "error", "one_frame": "skipped", "huggingface_token": "error",
                "guidance_scale": "skipped", "img_in_txt_in_offloading": "skipped", "log_config": "skipped",
                "ddp_static_graph": "skipped", "persistent_data_loader_workers": "skipped", "wandb_api_key": "skipped",
                "network_module": "used", "vae_dtype": "used", "vae_cache_cpu": "used", "log_tracker_config": "used",
                "ddp_timeout": "used", "sdpa": "used"}
    assert outcome == expected.get(flag, outcome), (flag, outcome)


def test_secrets_are_never_echoed(tmp_path):
    path = tmp_path / "hub.toml"
    path.write_text('huggingface_token = "hf_verysecret"\n')
    with pytest.raises(ConfigError) as info:
        load_config(["--config_file", str(path)])
    assert "hf_verysecret" not in str(info.value) and "<hidden>" in str(info.value)


def test_several_attention_backends_take_musubis_first(caplog):
    """musubi-tuner uses sdpa when sdpa and flash_attn are both set (a GUI test file does) and goes on."""
    caplog.set_level(logging.WARNING)
    cfg = validate(load_config(["--sdpa", "--flash_attn", "--dit", "d.safetensors", "--dataset_config", "d.toml"]))
    assert cfg.attention.attention_backend == "sdpa"
    assert "more than one attention backend is set (sdpa, flash_attn); using sdpa" in caplog.text

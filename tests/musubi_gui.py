"""What bmaltais/musubi-tuner-gui writes and runs for a WAN LoRA, reproduced from its own code.

Sources (read at bmaltais/musubi-tuner-gui commit 1b5a41ed159bf8a83f391585dbb1e2b1af7307d9 unless noted;
`lora_gui.py` at 0ea1b4ae has the same logic):
- `musubi_tuner_gui/lora_gui.py`: `FIELD_NAMES` (every widget, in order) and `train_model`, which builds and
  runs, one after the other and without checking their exit codes, `uv run ./musubi-tuner/<cache latents>`,
  `uv run ./musubi-tuner/<cache text>` and `uv run accelerate launch <launcher flags>
  <gui>/musubi-tuner/wan_train_network.py --config_file <output_dir>/<output_name>_<YYYYmmdd-HHMMSS>.toml
  <additional_parameters>`; the run TOML leaves out the `caching_*` keys, the launcher keys and
  `architecture`, and writes the WAN `task` last;
- `common_gui.py` `SaveConfigFileToRun` (the version `lora_gui.py` 1b5a41ed calls): `toml.dump` of the
  parameters sorted by name, without those whose value is 0, "" or False (`value != 0 and value != "" and
  value is not False`; `toml` itself drops None); `SaveConfigFile` (the GUI's saved config) keeps them all;
- the widget defaults: `class_model.py`, `class_training.py` and `class_save_load.py` at 1b5a41ed;
  `class_accelerate_launch.py`, `class_optimizer_and_scheduler.py`, `class_advanced_training.py` and
  `class_huggingface.py` at 12d45a68; `class_latent_caching.py` and `class_text_encoder_outputs_caching.py`
  at bcc01d3a; `class_network.py` at a148ff02; `class_metadata.py` at 73ac745b; `class_architecture.py`
  (script names, default architecture "hunyuanvideo") at 63cfc5c8;
- `AccelerateLaunch.run_cmd` (flag order) in `class_accelerate_launch.py` and `run_cmd_advanced_training`
  (additional parameters appended, `"` removed, split on spaces) in `common_gui.py`.

Numbers reach the GUI's Python as the browser's JSON sends them, where a whole float is an integer: the
default `max_grad_norm = 1.0` is written `max_grad_norm = 1`, a boundary typed as 875 stays 875 (`gui_value`).
No code of the GUI is copied here; this is its behaviour written down.
"""

from __future__ import annotations

import shlex
import sys
from pathlib import Path

import toml

# FIELD_NAMES of lora_gui.py with each widget's default value (None: an empty Number / Textbox / Dropdown)
GUI_DEFAULTS: dict[str, object] = {
    "mixed_precision": "fp16", "num_cpu_threads_per_process": 2, "num_processes": 1, "num_machines": 1,
    "multi_gpu": False, "gpu_ids": "", "main_process_port": 0, "dynamo_backend": "no", "dynamo_mode": "default",
    "dynamo_use_fullgraph": False, "dynamo_use_dynamic": False, "extra_accelerate_launch_args": "",
    "additional_parameters": "", "dataset_config": "", "sdpa": False, "flash_attn": False, "sage_attn": False,
    "xformers": False, "split_attn": False, "max_train_steps": 1600, "max_train_epochs": None,
    "max_data_loader_n_workers": 8, "persistent_data_loader_workers": False, "seed": None,
    "gradient_checkpointing": False, "gradient_accumulation_steps": 1, "logging_dir": "", "log_with": "",
    "log_prefix": "", "log_tracker_name": "", "wandb_run_name": "", "log_tracker_config": "", "wandb_api_key": "",
    "log_config": False, "ddp_timeout": None, "ddp_gradient_as_bucket_view": False, "ddp_static_graph": False,
    "sample_every_n_steps": None, "sample_at_first": False, "sample_every_n_epochs": None, "sample_prompts": "",
    "caching_latent_device": "cuda", "caching_latent_batch_size": None, "caching_latent_num_workers": None,
    "caching_latent_skip_existing": False, "caching_latent_keep_cache": False, "caching_latent_debug_mode": None,
    "caching_latent_console_width": 80, "caching_latent_console_back": None,
    "caching_latent_console_num_images": None, "caching_teo_text_encoder1": "", "caching_teo_text_encoder2": "",
    "caching_teo_text_encoder_dtype": "float16", "caching_teo_device": "cuda", "caching_teo_fp8_llm": False,
    "caching_teo_batch_size": None, "caching_teo_num_workers": None, "caching_teo_skip_existing": False,
    "caching_teo_keep_cache": False, "optimizer_type": "AdamW", "optimizer_args": "", "learning_rate": 2e-6,
    "max_grad_norm": 1.0, "lr_scheduler": "constant", "lr_warmup_steps": 0, "lr_decay_steps": 0,
    "lr_scheduler_num_cycles": 1, "lr_scheduler_power": 1, "lr_scheduler_timescale": None,
    "lr_scheduler_min_lr_ratio": None, "lr_scheduler_type": "", "lr_scheduler_args": "", "dit": "",
    "dit_dtype": "bfloat16", "vae": "", "vae_dtype": "float16", "vae_tiling": False, "vae_chunk_size": None,
    "vae_spatial_tile_sample_min_size": 256, "text_encoder1": "", "text_encoder2": "", "fp8_llm": False,
    "fp8_base": False, "blocks_to_swap": None, "img_in_txt_in_offloading": False, "guidance_scale": 1.0,
    "timestep_sampling": "sigma", "discrete_flow_shift": 1.0, "sigmoid_scale": 1.0, "weighting_scheme": "none",
    "logit_mean": 0.0, "logit_std": 1.0, "mode_scale": 1.29, "min_timestep": 0, "max_timestep": 1000,
    "show_timesteps": None, "no_metadata": False, "network_weights": None, "network_module": None,
    "network_dim": 32, "network_alpha": 1, "network_dropout": 0, "network_args": "", "training_comment": None,
    "dim_from_weights": False, "scale_weight_norms": None, "base_weights": "", "base_weights_multiplier": "",
    "output_dir": None, "output_name": "lora", "resume": None, "save_every_n_epochs": None,
    "save_every_n_steps": None, "save_last_n_epochs": None, "save_last_n_epochs_state": None,
    "save_last_n_steps": None, "save_last_n_steps_state": None, "save_state": False,
    "save_state_on_train_end": False, "huggingface_repo_id": "", "huggingface_token": "",
    "huggingface_repo_type": "", "huggingface_repo_visibility": "", "huggingface_path_in_repo": "",
    "save_state_to_huggingface": False, "resume_from_huggingface": "", "async_upload": False,
    "metadata_author": "", "metadata_description": "", "metadata_license": "", "metadata_tags": "",
    "metadata_title": "", "architecture": "hunyuanvideo", "task": "t2v-14B", "dit_high_noise": "",
    "timestep_boundary": None, "t5": "", "clip": "", "fp8_scaled": False, "fp8_t5": False, "vae_cache_cpu": False,
    "text_encoder": "", "fp8_vl": False, "model_version": "original", "num_layers": None,
    "remove_first_image_from_target": False, "fp8_text_encoder": False, "hv15_task": "t2v", "byt5": "",
    "image_encoder": "", "vae_enable_patch_conv": False, "vae_sample_size": None, "latent_window_size": None,
    "f1": False, "bulk_decode": False, "one_frame": False, "kandinsky5_task": "", "text_encoder_clip": "",
    "text_encoder_qwen": "", "hidream_task": "t2i", "hidream_model_type": "full", "fp8_te": False,
    "dino_loss_weight": 0, "unconditional_dit": "", "sampler_preset": None, "initial_sigma": None,
    "use_unconditional_dit_for_lora_sampling": False, "validate_caption_structure": False,
    "warn_on_caption_issues": False, "turbo_dit": "", "turbo_dit_cache": False, "save_precision": "fp32",
    "use_pinned_memory_for_block_swap": False, "block_swap_h2d_only": False, "block_swap_ring_size": None,
    "compile": False, "compile_backend": "", "compile_mode": None,
}
LAUNCHER_KEYS = ("num_cpu_threads_per_process", "num_processes", "num_machines", "multi_gpu", "gpu_ids",
                 "main_process_port", "dynamo_backend", "dynamo_mode", "dynamo_use_fullgraph", "dynamo_use_dynamic",
                 "extra_accelerate_launch_args")
TASK_KEYS = ("task", "hv15_task", "kandinsky5_task", "hidream_task", "hidream_model_type")
WAN_SCRIPTS = ("wan_train_network.py", "wan_cache_latents.py", "wan_cache_text_encoder_outputs.py")


def gui_value(value):
    """A number as the browser's JSON hands it back: a whole float is an integer."""
    return int(value) if isinstance(value, float) and value.is_integer() else value


def gui_fields(**user) -> dict[str, object]:
    """Every widget's value: the defaults, with what the user set, as the browser returns them."""
    unknown = set(user) - set(GUI_DEFAULTS)
    if unknown:
        raise KeyError(f"not a musubi-tuner-gui field: {sorted(unknown)}")
    return {name: gui_value(user.get(name, default)) for name, default in GUI_DEFAULTS.items()}


def run_toml_values(fields: dict[str, object]) -> dict[str, object]:
    """The parameters `train_model` passes to SaveConfigFileToRun, filtered and sorted as it writes them."""
    params = [(k, v) for k, v in fields.items() if k not in TASK_KEYS]
    if fields["architecture"] == "wan":
        params.append(("task", fields["task"]))
    caching = (k for k in fields if k.startswith(("caching_latent_", "caching_teo_")))
    excluded = {*LAUNCHER_KEYS, "architecture", *caching}
    return {k: v for k, v in sorted(params, key=lambda kv: kv[0])
            if k not in excluded and v != 0 and v != "" and v is not False}


def write_run_toml(fields: dict[str, object], when: str = "20250101-120000") -> Path:
    """The TOML the GUI writes before launching: <output_dir>/<output_name>_<date>.toml (toml.dump)."""
    path = Path(str(fields["output_dir"])) / f"{fields['output_name']}_{when}.toml"
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        toml.dump(run_toml_values(fields), f)
    return path


def write_saved_config(fields: dict[str, object], path: Path) -> Path:
    """The GUI's "Save configuration" file (SaveConfigFile): every field, sorted, None dropped by toml."""
    with open(path, "w", encoding="utf-8") as f:
        toml.dump(dict(sorted(fields.items())), f)
    return path


def _flags(fields: dict, pairs: tuple[tuple[str, str], ...], switches: tuple[tuple[str, str], ...] = ()) -> list:
    out: list[str] = []
    for flag, key in pairs:
        if fields.get(key):
            out += [flag, str(fields[key])]
    for flag, key in switches:
        if fields.get(key):
            out.append(flag)
    return out


def cache_latents_command(fields: dict, python: str = sys.executable) -> list[str]:
    """`uv run ./musubi-tuner/wan_cache_latents.py ...` as train_model builds it (uv run -> python)."""
    cmd = [python, "./musubi-tuner/wan_cache_latents.py", "--dataset_config", str(fields["dataset_config"]),
           "--vae", str(fields["vae"])]
    cmd += _flags(fields, (("--vae_dtype", "vae_dtype"), ("--vae_chunk_size", "vae_chunk_size")),
                  (("--vae_tiling", "vae_tiling"),))
    cmd += _flags(fields, (("--vae_spatial_tile_sample_min_size", "vae_spatial_tile_sample_min_size"),
                           ("--device", "caching_latent_device"), ("--batch_size", "caching_latent_batch_size"),
                           ("--num_workers", "caching_latent_num_workers")))
    cmd += _flags(fields, (), (("--skip_existing", "caching_latent_skip_existing"),
                               ("--keep_cache", "caching_latent_keep_cache")))
    cmd += _flags(fields, (("--debug_mode", "caching_latent_debug_mode"),
                           ("--console_width", "caching_latent_console_width"),
                           ("--console_back", "caching_latent_console_back"),
                           ("--console_num_images", "caching_latent_console_num_images"), ("--clip", "clip")))
    return cmd + (["--i2v"] if "i2v" in str(fields.get("task", "")) else [])


def cache_text_command(fields: dict, python: str = sys.executable) -> list[str]:
    """`uv run ./musubi-tuner/wan_cache_text_encoder_outputs.py ...` as train_model builds it for WAN."""
    cmd = [python, "./musubi-tuner/wan_cache_text_encoder_outputs.py", "--dataset_config",
           str(fields["dataset_config"])]
    cmd += _flags(fields, (("--t5", "t5"),), (("--fp8_t5", "fp8_t5"),))
    cmd += _flags(fields, (("--device", "caching_teo_device"), ("--batch_size", "caching_teo_batch_size")),
                  (("--skip_existing", "caching_teo_skip_existing"),))
    return cmd + _flags(fields, (("--num_workers", "caching_teo_num_workers"),))  # its --keep_cache key is misspelt


def train_command(fields: dict, config_file: Path, gui_dir: Path, python: str = sys.executable) -> list[str]:
    """`uv run accelerate launch <flags> <gui>/musubi-tuner/wan_train_network.py --config_file X <extra>`."""
    cmd = [python, "-m", "accelerate.commands.launch"]
    cmd += _flags(fields, (("--dynamo_backend", "dynamo_backend"), ("--dynamo_mode", "dynamo_mode")),
                  (("--dynamo_use_fullgraph", "dynamo_use_fullgraph"), ("--dynamo_use_dynamic", "dynamo_use_dynamic")))
    cmd += [shlex.quote(a) for a in str(fields["extra_accelerate_launch_args"]).replace('"', "").split()]
    cmd += ["--gpu_ids", shlex.quote(str(fields["gpu_ids"]))] if fields["gpu_ids"] != "" else []
    cmd += ["--main_process_port", str(int(fields["main_process_port"]))] if fields["main_process_port"] > 0 else []
    cmd += _flags(fields, (("--mixed_precision", "mixed_precision"),), (("--multi_gpu", "multi_gpu"),))
    for key in ("num_processes", "num_machines", "num_cpu_threads_per_process"):
        if int(fields[key]) > 0:
            cmd += [f"--{key}", str(int(fields[key]))]
    cmd += [f"{gui_dir}/musubi-tuner/wan_train_network.py", "--config_file", str(config_file)]
    return cmd + [shlex.quote(a) for a in str(fields["additional_parameters"]).replace('"', "").split()]

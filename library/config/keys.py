"""The key tables: old names, keys GUIs write that we do not use, and keys that belong elsewhere.

- `ALIASES`: old or foreign names of a real key; the value is taken under the new name (logged).
- `GUI_ONLY_KEYS` (+ `GUI_ONLY_PREFIXES`): what bmaltais/kohya_ss and musubi-tuner-gui write for the
  launcher, the caching steps, the hub upload or other architectures. They carry no training meaning
  here, so they are logged and skipped whatever their value. `wandb_api_key` is one of them on purpose:
  a secret never enters the config (it would be saved next to every output); set WANDB_API_KEY instead.
- `UNSUPPORTED_FLAGS`: musubi training flags this trainer does not implement. Left at their off value
  (false / empty) they are skipped; turned on, they are an error, because silently ignoring a training
  option the user asked for ruins the run.
- `MISPLACED_KEYS`: keys that mean something we spell differently or that belong in the dataset TOML;
  always an error that says where the setting goes.
- `IGNORED_WITH_WARNING`: accepted for compatibility, meaningless for WAN; warned about once per load.

`log_tracker_config` and `sample_prompts` are real keys (a tracker config file, a prompt file): GUIs
write them empty when unused, and an empty value means "not set" for every key.

`pretrained_model_name_or_path` is a misplaced key, not an alias of `dit`: it is the sd-scripts model
key, and a config that carries it was written for Stable Diffusion, so loading its path as a WAN DiT
would only fail later and less clearly.
"""

from __future__ import annotations

ALIASES: dict[str, str] = {
    "fp8": "fp8_base",  # early musubi (HunyuanVideo) spelling
    "dit_low_noise": "dit",  # the low-noise expert is `dit` in musubi
    "boundary_ratio": "timestep_boundary",  # diffusers' name for the expert switch (a fraction)
    "persistent_workers": "persistent_data_loader_workers",
    "lora_format": "save_lora_format",
}

GUI_ONLY_KEYS: frozenset[str] = frozenset({
    # launcher (accelerate) settings and GUI state
    "additional_parameters", "extra_accelerate_launch_args", "gpu_ids", "main_process_port", "multi_gpu",
    "num_cpu_threads_per_process", "num_machines", "num_processes", "dynamo_backend", "dynamo_mode",
    "dynamo_use_dynamic", "dynamo_use_fullgraph", "save_as_bool", "model_list", "LoRA_type",
    # hub upload, secrets
    "async_upload", "save_state_to_huggingface", "resume_from_huggingface", "wandb_api_key",
    # DDP knobs accelerate already owns; config logging (the resolved config is always saved)
    "ddp_timeout", "ddp_gradient_as_bucket_view", "ddp_static_graph", "log_config",
    # other architectures in the same GUI (HunyuanVideo, FramePack, ...)
    "text_encoder1", "text_encoder2", "fp8_llm", "dit_dtype", "guidance_scale", "img_in_txt_in_offloading",
    "vae_chunk_size", "vae_tiling", "vae_spatial_tile_sample_min_size", "force_v2_1_time_embedding",
    # our metadata is derived from the model and the data, and we always write safetensors
    "metadata_reso", "metadata_arch", "save_model_as", "show_timesteps",
})
GUI_ONLY_PREFIXES: tuple[str, ...] = ("caching_", "huggingface_")

UNSUPPORTED_FLAGS: dict[str, str] = {
    "one_frame": "one-frame (single image) training is not implemented; train on images with the I2V task",
    "num_timestep_buckets": "timestep buckets are not implemented",
    "block_swap_h2d_only": "use blocks_to_swap alone",
    "block_swap_ring_size": "use blocks_to_swap alone",
    "disable_numpy_memmap": "caches are always memory-mapped",
    "fp16_master_weights": "LoRA weights always train in fp32",
    "full_fp16": "fp16 weights overflow in WAN's DiT; use `full_bf16` (full fine-tuning)",
    "blockwise_fused_optimizers": "use `fused_backward_pass`, which steps each tensor as its gradient arrives",
    "fused_optimizer_groups": "use `fused_backward_pass`, which steps each tensor as its gradient arrives",
}

_DATASET = "belongs in the dataset TOML passed as `dataset_config` ([general] or [[datasets]])"
MISPLACED_KEYS: dict[str, str] = {
    "pretrained_model_name_or_path": "is the sd-scripts model key; pass the WAN DiT checkpoint as `dit`",
    "train_data_dir": _DATASET, "reg_data_dir": _DATASET, "resolution": _DATASET, "batch_size": _DATASET,
    "train_batch_size": _DATASET, "caption_extension": _DATASET, "num_repeats": _DATASET,
    "enable_bucket": _DATASET, "bucket_no_upscale": _DATASET, "target_frames": _DATASET,
    "frame_extraction": _DATASET, "cache_directory": _DATASET,
    "min_t": "is not a key here; use `min_timestep` (0-1000)",
    "max_t": "is not a key here; use `max_timestep` (0-1000)",
    "boundary": "is not a key here; use `timestep_boundary` (a fraction 0-1 or a timestep 0-1000)",
}

IGNORED_WITH_WARNING: dict[str, str] = {
    "clip_skip": "`clip_skip` has no meaning for WAN's umT5 text encoder and is ignored",
    "mem_eff_save": "`mem_eff_save`: saves always stream one tensor at a time here; nothing to change",
}


def is_gui_only(key: str) -> bool:
    return key in GUI_ONLY_KEYS or key.startswith(GUI_ONLY_PREFIXES)


def is_off(value) -> bool:
    """What a GUI writes for a setting left off: false, 0, "", None or an empty list."""
    return value is None or value is False or value == 0 or value == "" or value == [] or (
        isinstance(value, str) and value.strip().lower() in ("false", "0", "none", "")
    )

"""The key tables: every key a Kohya GUI or musubi-tuner writes that is not a field of the schema, and what
happens to it. Nothing accepted is silently ignored: each key is used, skipped with a log line, or an
error that says what to use.

- `ALIASES`: old or foreign names of a real key; the value is taken under the new name (logged).
- `GUI_ONLY_KEYS` (+ `GUI_ONLY_PREFIXES`): what bmaltais/kohya_ss and musubi-tuner-gui write for the
  launcher (`accelerate launch` flags), the caching tools (`caching_*`, passed to them as flags) or the GUI
  itself. Skipped with a log line whatever their value: the launcher and the caching tools use them.
- `OTHER_ARCHITECTURE_KEYS`: the settings of HunyuanVideo, Qwen-Image, FLUX, FramePack, Kandinsky 5,
  HiDream, Ideogram 4 and Krea 2 that musubi-tuner-gui writes into every config, WAN ones included (its
  hidden widgets keep their values: `model_version = "original"` is in every WAN run it starts).
  Skipped with one log line whatever their value: they mean nothing for WAN. `architecture` (the GUI's
  model family) must be "wan" when given.
- `NO_EFFECT_KEYS`: settings whose purpose this trainer already serves another way (DDP knobs without a
  DDP wrapper, workers that start once per epoch, ...). Skipped with a log line, a warning when turned on.
- `UNSUPPORTED_FLAGS`: musubi-tuner training flags this trainer does not implement, with musubi's default.
  At that default (or off) they are skipped with a log line; any other value is an error that says what
  to use instead, because silently ignoring a training option the user asked for ruins the run.
- `MISPLACED_KEYS`: keys that mean something we spell differently or that belong in the dataset TOML;
  always an error that says where the setting goes.
- `SECRET_KEYS`: never stored in the config (it is saved next to every output) and never echoed.
- `NETWORK_MODULES`: the values `network_module` accepts, and what each needs.

`log_tracker_config` and `sample_prompts` are real keys (a tracker config file, a prompt file): GUIs
write them empty when unused, and an empty value means "not set" for every key.

`pretrained_model_name_or_path` is a misplaced key, not an alias of `dit`: it is the sd-scripts model
key, and a config that carries it was written for Stable Diffusion, so loading its path as a WAN DiT
would only fail later and less clearly.

Where the lists come from: musubi-tuner's training parser (`src/musubi_tuner/training/parser_common.py`
and `wan_train_network.py`, kohya-ss/musubi-tuner 30c658c4) and musubi-tuner-gui's field list and TOML
writer (`musubi_tuner_gui/lora_gui.py` FIELD_NAMES and `class_model.py`, bmaltais/musubi-tuner-gui
1b5a41ed); `tests/config/test_musubi_flags.py` checks every one of them.
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
    "num_cpu_threads_per_process", "num_machines", "num_processes", "dynamo_use_dynamic", "dynamo_use_fullgraph",
    "save_as_bool", "model_list", "LoRA_type", "file_path", "save_as", "headless", "print_only",
    # our metadata is derived from the model and the data, and we always write safetensors
    "save_model_as",
})
GUI_ONLY_PREFIXES: tuple[str, ...] = ("caching_",)

OTHER_ARCHITECTURE_KEYS: frozenset[str] = frozenset({
    # HunyuanVideo (musubi's common parser; its WAN trainer ignores them as well)
    "dit_dtype", "text_encoder1", "text_encoder2", "text_encoder_dtype", "fp8_llm", "guidance_scale",
    "img_in_txt_in_offloading",
    # Qwen-Image, Z-Image, FLUX.2, FLUX.1 Kontext
    "text_encoder", "fp8_vl", "model_version", "num_layers", "remove_first_image_from_target", "fp8_text_encoder",
    "edit", "edit_plus",
    # HunyuanVideo 1.5, FramePack
    "hv15_task", "byt5", "image_encoder", "vae_enable_patch_conv", "vae_sample_size", "latent_window_size", "f1",
    "bulk_decode",
    # Kandinsky 5, HiDream-O1, Ideogram 4, Krea 2
    "kandinsky5_task", "text_encoder_clip", "text_encoder_qwen", "hidream_task", "hidream_model_type", "model_type",
    "fp8_te", "dino_loss_weight", "unconditional_dit", "sampler_preset", "initial_sigma",
    "use_unconditional_dit_for_lora_sampling", "validate_caption_structure", "warn_on_caption_issues",
    "log_loss_stats", "turbo_dit", "turbo_dit_cache",
})

NO_EFFECT_KEYS: dict[str, str] = {
    "clip_skip": "has no meaning for WAN's umT5 text encoder",
    "mem_eff_save": "saves always stream one tensor at a time here",
    "log_config": "the resolved config is always logged to the tracker and saved next to the outputs",
    "ddp_gradient_as_bucket_view": "this trainer does not wrap the model in DDP (it averages the gradients in "
                                   "buckets itself)",
    "ddp_static_graph": "this trainer does not wrap the model in DDP (it averages the gradients in buckets itself)",
    "persistent_data_loader_workers": "each epoch builds its loader for its own batch order, so workers start "
                                      "once per epoch (about a second)",
    "one_frame": "samples of prompts with musubi's `--of` (and `--ci`) options always render one-frame; one-frame "
                 "datasets are the ones with fp_1f_* keys",
    "vae_chunk_size": "the WAN VAE already runs its causal convolutions one chunk at a time (4 frames when "
                      "encoding, 1 latent frame when decoding), the least memory chunking can give",
}

_COMPILE = "this trainer compiles the DiT blocks with `compile = true` (`compile_backend`, `compile_mode`, " \
           "`compile_fullgraph`, `compile_dynamic`); use those"
_HUB = "uploading to the Hugging Face Hub is not built in: upload the output folder with `huggingface-cli upload`"
# name: (musubi's default value(s), what to do instead)
UNSUPPORTED_FLAGS: dict[str, tuple[tuple, str]] = {
    "block_swap_h2d_only": ((False,), "use blocks_to_swap alone"),
    "block_swap_ring_size": ((2,), "this trainer's block swap has no ring of blocks to size; use blocks_to_swap"),
    "disable_numpy_memmap": ((False,), "caches are always memory-mapped"),
    "force_v2_1_time_embedding": ((False,), "WAN 2.2 models train with their own time embedding"),
    "show_timesteps": ((None,), "the timestep distribution plot is not built in; loss.png shows the run"),
    "metadata_reso": ((None,), "modelspec.resolution is written from the dataset's resolution"),
    "metadata_arch": ((None,), "modelspec.architecture names the trained variant"),
    "dynamo_backend": (("no",), _COMPILE),
    "dynamo_mode": ((None, "default"), _COMPILE),
    "dynamo_fullgraph": ((False,), _COMPILE),
    "dynamo_dynamic": ((False,), _COMPILE),
    "huggingface_repo_id": ((None,), _HUB),
    "huggingface_repo_type": ((None,), _HUB),
    "huggingface_path_in_repo": ((None,), _HUB),
    "huggingface_repo_visibility": ((None,), _HUB),
    "huggingface_token": ((None,), _HUB),
    "save_state_to_huggingface": ((False,), _HUB),
    "resume_from_huggingface": ((False,), _HUB + "; resume from a local `*-state` folder"),
    "async_upload": ((False,), _HUB),
    "fp16_master_weights": ((False,), "LoRA weights always train in fp32"),
    "full_fp16": ((False,), "fp16 weights overflow in WAN's DiT; use `full_bf16` (full fine-tuning)"),
    "blockwise_fused_optimizers": ((False,), "use `fused_backward_pass`, which steps each tensor as its gradient "
                                             "arrives"),
    "fused_optimizer_groups": ((None,), "use `fused_backward_pass`, which steps each tensor as its gradient arrives"),
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

SECRET_KEYS: frozenset[str] = frozenset({"wandb_api_key", "huggingface_token"})

NETWORK_MODULES: dict[str, str] = {
    "networks.lora_wan": "this trainer's LoRA (the default)",
    "lycoris.kohya": "LyCORIS (LoHa, LoKr, LoCon, ...: the algorithm and its options in `network_args`, e.g. "
                     '["algo=lokr", "factor=8"]); install it with `pip install lycoris-lora`',
}


def is_gui_only(key: str) -> bool:
    return key in GUI_ONLY_KEYS or key.startswith(GUI_ONLY_PREFIXES)


def is_off(value) -> bool:
    """What a GUI writes for a setting left off: false, 0, "", None or an empty list."""
    return value is None or value is False or value == 0 or value == "" or value == [] or (
        isinstance(value, str) and value.strip().lower() in ("false", "0", "none", "")
    )


def is_musubi_default(key: str, value) -> bool:
    """Whether an unsupported flag is off or holds musubi's default value: then it is only skipped."""
    if is_off(value):
        return True
    for default in UNSUPPORTED_FLAGS[key][0]:
        if isinstance(default, str) and isinstance(value, str) and value.strip().lower() == default:
            return True
        if isinstance(default, int) and not isinstance(default, bool) and not isinstance(value, bool):
            try:
                if float(value) == default:
                    return True
            except (TypeError, ValueError):
                pass
    return False

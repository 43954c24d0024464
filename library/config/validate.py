"""Cross-field rules of a TrainConfig. Every broken rule is collected, then raised as one ConfigError.

Pure checks on values (no file is opened), so `--output_config` and tests can run them anywhere. The
variant (from `library.wan.variants`, shapes and defaults only) decides what a task allows.
"""

from __future__ import annotations

import importlib
import logging
import math
import re
from dataclasses import fields

from library.runtime.sequence_parallel import SequenceParallelError, check_heads

from .coerce import ConfigError
from .keys import NETWORK_MODULES
from .schema import ATTENTION_ORDER, TrainConfig, field_default

logger = logging.getLogger(__name__)

_BACKENDS = ATTENTION_ORDER
_A14B = "WAN 2.2 A14B tasks (t2v-A14B, i2v-A14B)"


def _variant(cfg: TrainConfig, errors: list[str]):
    from library.wan.variants import get_variant

    try:
        return get_variant(cfg.model.task)
    except ValueError as exc:
        errors.append(f"task: {exc}")
        return None


def _models(cfg: TrainConfig, variant, errors: list[str]) -> None:
    m, mem = cfg.model, cfg.memory
    if not m.dit:
        errors.append("`dit` is required: the DiT checkpoint (for WAN 2.2 A14B, the low-noise expert)")
    if not cfg.run.dataset_config:
        errors.append("`dataset_config` is required: the dataset TOML")
    if mem.fp8_scaled and not mem.fp8_base:
        errors.append("`fp8_scaled` needs `fp8_base = true`")
    if mem.fp8_fast and not (mem.fp8_base or mem.auto_memory):
        errors.append("`fp8_fast` multiplies the fp8 block weights in fp8: it needs `fp8_base = true` (with "
                      "`fp8_scaled = true`), or `auto_memory = true`, which then plans with fp8 weights")
    if mem.gradient_checkpointing_cpu_offload and not mem.gradient_checkpointing:
        errors.append("`gradient_checkpointing_cpu_offload` needs `gradient_checkpointing = true`")
    if mem.gradient_checkpointing_keep_attention and not mem.gradient_checkpointing:
        errors.append("`gradient_checkpointing_keep_attention` needs `gradient_checkpointing = true` (without "
                      "checkpointing every activation is kept anyway)")
    if mem.gradient_checkpointing_keep_attention_blocks and not mem.gradient_checkpointing:
        errors.append("`gradient_checkpointing_keep_attention_blocks` needs `gradient_checkpointing = true` "
                      "(without checkpointing every activation is kept anyway)")
    if mem.gradient_checkpointing_keep_attention_blocks and mem.gradient_checkpointing_keep_attention:
        errors.append("`gradient_checkpointing_keep_attention = true` keeps every block's attention: remove "
                      "`gradient_checkpointing_keep_attention_blocks`, or set it alone to keep only some blocks'")
    if mem.gradient_checkpointing_offload_attention and not (
            mem.gradient_checkpointing_cpu_offload and (mem.gradient_checkpointing_keep_attention
                                                        or mem.gradient_checkpointing_keep_attention_blocks)):
        errors.append("`gradient_checkpointing_offload_attention` sends the kept self-attention outputs to the host "
                      "with the offloaded block inputs: it needs `gradient_checkpointing_cpu_offload = true` and "
                      "`gradient_checkpointing_keep_attention = true` (or "
                      "`gradient_checkpointing_keep_attention_blocks`)")
    skip = mem.gradient_checkpointing_skip_blocks
    if skip and not mem.gradient_checkpointing:
        errors.append("`gradient_checkpointing_skip_blocks` needs `gradient_checkpointing = true` (without "
                      "checkpointing no block is checkpointed anyway)")
    if skip and mem.blocks_to_swap:
        errors.append(f"`gradient_checkpointing_skip_blocks` = {skip} cannot be combined with `blocks_to_swap` = "
                      f"{mem.blocks_to_swap}: the swapped blocks are the last ones and must be checkpointed; set "
                      "one of them to 0")
    if mem.offload_inactive_dit and not m.dit_high_noise:
        errors.append("`offload_inactive_dit` needs two experts: set `dit_high_noise` too")
    if variant is None:
        return
    if mem.gradient_checkpointing_keep_attention_blocks > variant.num_layers:
        errors.append(f"`gradient_checkpointing_keep_attention_blocks` = "
                      f"{mem.gradient_checkpointing_keep_attention_blocks} is more than the {variant.num_layers} "
                      f"blocks of {variant.name} (`gradient_checkpointing_keep_attention = true` keeps them all)")
    if skip > variant.num_layers:
        errors.append(f"`gradient_checkpointing_skip_blocks` = {skip} is more than the {variant.num_layers} blocks "
                      f"of {variant.name}")
    elif mem.gradient_checkpointing_keep_attention_blocks + skip > variant.num_layers:
        errors.append(f"`gradient_checkpointing_keep_attention_blocks` = "
                      f"{mem.gradient_checkpointing_keep_attention_blocks} counts among the checkpointed blocks, "
                      f"but `gradient_checkpointing_skip_blocks` = {skip} leaves only {variant.num_layers - skip} of "
                      f"the {variant.num_layers} blocks of {variant.name} checkpointed: lower one of them (or set "
                      "`gradient_checkpointing_keep_attention = true` to keep every checkpointed block's)")
    if mem.blocks_to_swap >= variant.num_layers:
        errors.append(f"`blocks_to_swap` = {mem.blocks_to_swap} must be less than the {variant.num_layers} "
                      f"blocks of {variant.name}")
    if m.dit_high_noise and not variant.two_experts:
        errors.append(f"`dit_high_noise` is only for {_A14B}; task is {variant.name}")
    if m.clip and not variant.image_embedding:
        logger.warning("`clip` is only used by WAN 2.1 I2V (i2v-14B); it is ignored for %s", variant.name)


def _experts(cfg: TrainConfig, variant, errors: list[str]) -> None:
    net, both = cfg.network, bool(cfg.model.dit_high_noise)
    high = {"shared_expert_lora": net.shared_expert_lora, "network_dim_high_noise": net.network_dim_high_noise,
            "learning_rate_high_noise": cfg.optimizer.learning_rate_high_noise}
    for name, value in high.items():
        if value and not both:
            errors.append(f"`{name}` needs both experts: set `dit_high_noise` (the {_A14B} high-noise expert)")
    if net.shared_expert_lora and (net.network_dim_high_noise or cfg.optimizer.learning_rate_high_noise):
        errors.append("`shared_expert_lora` trains one LoRA for both experts: remove `network_dim_high_noise` "
                      "and `learning_rate_high_noise`")
    if cfg.timesteps.timestep_boundary is not None and variant is not None and not variant.two_experts:
        errors.append(f"`timestep_boundary` is only for {_A14B}; task is {variant.name}")
    p = cfg.loop.i2v_probability
    if not 0.0 <= p <= 1.0:
        errors.append(f"`i2v_probability` = {p} must be between 0 and 1")
    elif p > 0 and variant is not None and variant.model_type != "ti2v":
        errors.append(f"`i2v_probability` is only for TI2V tasks (ti2v-5B); task is {variant.name}")


def _timesteps(cfg: TrainConfig, variant, errors: list[str]) -> None:
    t = cfg.timesteps
    lo, hi = t.min_timestep, t.max_timestep
    for name, value in (("min_timestep", lo), ("max_timestep", hi)):
        if not 0 <= value <= 1000:
            errors.append(f"`{name}` = {value} must be within 0-1000")
    if lo >= hi:
        errors.append(f"`min_timestep` ({lo}) must be less than `max_timestep` ({hi})")
    boundary = t.timestep_boundary
    if boundary is not None and not 0.0 < boundary < 1.0:
        errors.append(f"`timestep_boundary` = {boundary} must be strictly between 0 and 1 (or 0 and 1000)")
    if boundary is None and variant is not None:
        boundary = variant.boundary
    if cfg.model.dit_high_noise and boundary and lo < hi:
        if hi <= boundary * 1000:
            errors.append(f"`max_timestep` = {hi} is at or below the expert boundary ({boundary * 1000:g}): "
                          "the high-noise expert would never train; drop `dit_high_noise` or raise it")
        if lo >= boundary * 1000:
            errors.append(f"`min_timestep` = {lo} is at or above the expert boundary ({boundary * 1000:g}): "
                          "the low-noise expert would never train")
    for name in ("discrete_flow_shift", "sigmoid_scale", "logit_std", "mode_scale"):
        if getattr(t, name) <= 0:
            errors.append(f"`{name}` = {getattr(t, name)} must be greater than 0")


def _attention(cfg: TrainConfig, errors: list[str]) -> None:
    chosen = [name for name in _BACKENDS if getattr(cfg.attention, name)]
    if len(chosen) > 1:  # musubi-tuner takes the first in its order and goes on; so do we, saying so
        logger.warning("more than one attention backend is set (%s); using %s (musubi-tuner's order: %s)",
                       ", ".join(chosen), cfg.attention.attention_backend, ", ".join(_BACKENDS))
    if cfg.attention.sage_attn:
        errors.append("`sage_attn`: SageAttention has no backward pass, so it cannot train; use it for generation "
                      "(generate_video_wan.py --attn_mode sageattn) and train with sdpa, flash_attn, flash3 or "
                      "xformers")


def _sequence_parallel(cfg: TrainConfig, variant, errors: list[str]) -> None:
    a = cfg.attention
    if variant is None or a.sequence_parallel == 1:
        return
    try:
        check_heads(variant.num_heads, a.sequence_parallel, a.sequence_parallel_attention)
    except SequenceParallelError as exc:
        errors.append(f"{variant.name}: {exc}")
    if cfg.network.network_dropout:
        logger.warning("network_dropout with sequence_parallel_size = %d: each process draws the dropout of its own "
                       "token slice, so the masks (not the maths) differ from a run on one process",
                       a.sequence_parallel)


def _check_network_args(cfg: TrainConfig, errors: list[str]) -> None:
    net = cfg.network
    try:
        module = importlib.import_module(net.network_module)
    except ImportError as exc:
        errors.append(f"`network_module` = {net.network_module!r} cannot be imported ({exc}); it is "
                      f"{NETWORK_MODULES.get(net.network_module, 'not a network module of this trainer')}")
        return
    checker = getattr(module, "check_network_args", None)
    if checker is not None:
        errors.extend(f"network_args: {msg}" for msg in checker(net.network_args))


def _network(cfg: TrainConfig, errors: list[str]) -> None:
    net = cfg.network
    if net.network_module == "networks.lora":
        errors.append("`network_module` = 'networks.lora' is the generic module; use 'networks.lora_wan'")
    else:
        _check_network_args(cfg, errors)
    if net.network_dim < 1:
        errors.append(f"`network_dim` = {net.network_dim} must be 1 or more")
    if net.network_alpha < 0:
        errors.append(f"`network_alpha` = {net.network_alpha} must be 0 or more (0 means alpha = rank)")
    if not 0.0 <= net.network_dropout < 1.0:
        errors.append(f"`network_dropout` = {net.network_dropout} must be in [0, 1)")
    if net.dim_from_weights and not net.network_weights:
        errors.append("`dim_from_weights` needs `network_weights`")
    if net.base_weights_multiplier and len(net.base_weights_multiplier) != len(net.base_weights):
        errors.append(f"`base_weights_multiplier` has {len(net.base_weights_multiplier)} values for "
                      f"{len(net.base_weights)} `base_weights` files")


def _steps_or_ratio(name: str, value, errors: list[str]) -> None:
    if isinstance(value, float) and not 0.0 < value < 1.0:
        errors.append(f"`{name}` = {value}: give an int number of steps or a float ratio below 1 (e.g. 0.05)")
    elif value < 0:
        errors.append(f"`{name}` = {value} must be 0 or more")


def _optimizer(cfg: TrainConfig, errors: list[str]) -> None:
    opt, sch = cfg.optimizer, cfg.scheduler
    if opt.learning_rate <= 0:
        errors.append(f"`learning_rate` = {opt.learning_rate} must be greater than 0")
    if not opt.optimizer_type.strip():
        errors.append("`optimizer_type` is empty")
    _steps_or_ratio("lr_warmup_steps", sch.lr_warmup_steps, errors)
    _steps_or_ratio("lr_decay_steps", sch.lr_decay_steps, errors)
    if sch.lr_scheduler_num_cycles < 1:
        errors.append(f"`lr_scheduler_num_cycles` = {sch.lr_scheduler_num_cycles} must be 1 or more")
    ratio = sch.lr_scheduler_min_lr_ratio
    if not 0.0 <= ratio <= 1.0:
        errors.append(f"`lr_scheduler_min_lr_ratio` = {ratio} must be between 0 and 1")
    relative = str(opt.optimizer_args.get("relative_step")).lower() == "true"
    if not sch.lr_scheduler_type and sch.lr_scheduler == "adafactor" and not (
            opt.optimizer_type.lower() == "adafactor" and relative):
        errors.append("`lr_scheduler` = 'adafactor' reports Adafactor's own step sizes: set `optimizer_type` = "
                      "'AdaFactor' with `optimizer_args` = [\"relative_step=True\"], or pick another schedule")
    if (not sch.lr_scheduler_type and sch.lr_scheduler == "piecewise_constant"
            and "step_rules" not in sch.lr_scheduler_args):
        errors.append("`lr_scheduler` = 'piecewise_constant' needs `lr_scheduler_args` = "
                      "[\"step_rules=1:100,0.1:200,0.01\"] (a factor before each step, then the final factor)")
    if sch.lr_decay_steps and sch.lr_scheduler != "warmup_stable_decay":
        logger.warning("`lr_decay_steps` is used by lr_scheduler 'warmup_stable_decay' only; it is ignored here")
    if sch.lr_scheduler_timescale and sch.lr_scheduler != "inverse_sqrt":
        logger.warning("`lr_scheduler_timescale` is used by lr_scheduler 'inverse_sqrt' only; it is ignored here")
    if sch.lr_warmup_steps and sch.lr_scheduler == "constant":
        logger.warning("`lr_warmup_steps` is set but `lr_scheduler` is 'constant'; use 'constant_with_warmup'")


# 0 means off / default for these; a negative value is a mistake
_NON_NEGATIVE = ("blocks_to_swap", "max_train_epochs", "save_every_n_epochs", "save_every_n_steps",
                 "save_last_n_epochs", "save_last_n_steps", "save_last_n_epochs_state", "save_last_n_steps_state",
                 "sample_every_n_steps", "sample_every_n_epochs", "validate_every_n_steps",
                 "lr_scheduler_timescale", "compile_cache_size_limit", "network_dim_high_noise",
                 "learning_rate_high_noise", "scale_weight_norms", "max_grad_norm", "max_data_loader_n_workers")


def _loop(cfg: TrainConfig, errors: list[str]) -> None:
    loop = cfg.loop
    if loop.max_train_steps < 1:
        errors.append(f"`max_train_steps` = {loop.max_train_steps} must be 1 or more")
    if loop.gradient_accumulation_steps < 1:
        errors.append(f"`gradient_accumulation_steps` = {loop.gradient_accumulation_steps} must be 1 or more")
    for name in _NON_NEGATIVE:
        if cfg.get(name) < 0:
            errors.append(f"`{name}` = {cfg.get(name)} must be 0 or more (0 turns it off)")


def _sampling(cfg: TrainConfig, variant, errors: list[str]) -> None:
    """Samples during training: checked here, before any model loads, not after a 14B DiT has."""
    s, m = cfg.sampling, cfg.model
    if (s.sample_every_n_steps or s.sample_every_n_epochs or s.sample_at_first) and not s.sample_prompts:
        errors.append("sampling is requested but `sample_prompts` (the prompt file) is not set")
    if not s.sample_prompts:
        return
    if not (m.vae and m.t5):
        errors.append("`sample_prompts` needs `vae` and `t5` (the prompts are encoded once at the start and the "
                      "samples decoded with the VAE)")
    if variant is not None and variant.image_embedding and variant.is_i2v and not m.clip:
        errors.append(f"sample_prompts with {variant.name} (WAN 2.1 I2V) needs `clip`, the CLIP vision file "
                      "(models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth) for the start images")


def _finite(cfg: TrainConfig, errors: list[str]) -> None:
    """Every number must be finite: NaN passes every `<` / `>` rule and trains nothing (or everything) later."""
    for group in fields(cfg):
        args = getattr(cfg, group.name)
        for f in fields(args):
            value = getattr(args, f.name)
            values = value.values() if isinstance(value, dict) else value if isinstance(value, tuple) else (value,)
            if any(isinstance(v, float) and not math.isfinite(v) for v in values):
                errors.append(f"`{f.name}` = {value} must be a finite number (not nan or inf)")


_LORA_ONLY = ("network_weights", "base_weights", "scale_weight_norms", "shared_expert_lora", "network_dim_high_noise",
              "fp8_base", "fp8_fast", "blocks_to_swap", "offload_inactive_dit")
# LoRA settings with a default a full fine-tuning config inherits: an error when set to anything else
_LORA_SETTINGS = ("network_module", "network_dim", "network_alpha", "network_dropout", "network_args",
                  "dim_from_weights", "base_weights_multiplier", "save_lora_format")


def _lora_settings_in_full(cfg: TrainConfig, errors: list[str]) -> None:
    if cfg.run.preset:
        errors.append(f"`preset` = {cfg.run.preset!r} holds the guide's LoRA settings (rank, alpha, a LoRA learning "
                      "rate) and cannot be used with full fine-tuning: remove it and set `learning_rate` (1e-5 or "
                      "lower for a full fine-tune)")
        return  # the preset's rank and alpha are not the user's doing
    for name in _LORA_SETTINGS:
        value = cfg.get(name)
        if value != field_default(name):
            errors.append(f"`{name}` = {value!r} is a LoRA setting and cannot be used with full fine-tuning (it "
                          "trains the DiT's own weights): remove it, or train a LoRA with train_network_wan.py")


def _finetune(cfg: TrainConfig, errors: list[str]) -> None:
    ft = cfg.finetune
    if not ft.full_fine_tune:
        for name in ("full_bf16", "fused_backward_pass", "trainable_patterns", "frozen_patterns", "fsdp",
                     "fsdp_cpu_offload"):
            if cfg.get(name):
                errors.append(f"`{name}` is for full fine-tuning: run finetune/fine_tune_wan.py (or set "
                              "`full_fine_tune` = true), or remove it")
        return
    why = {"fp8_base": "fp8 weights cannot be trained", "fp8_fast": "it multiplies frozen fp8 weights, and full "
           "fine-tuning trains them", "blocks_to_swap": "swapped blocks would need their "
           "gradients and optimizer state on the host", "offload_inactive_dit": "the optimizer state of the "
           "inactive expert stays on the GPU; train one expert per run instead"}
    for name in _LORA_ONLY:
        if cfg.get(name):
            errors.append(f"`{name}` cannot be used with full fine-tuning"
                          + (f" ({why[name]})" if name in why else " (it is a LoRA setting)"))
    _lora_settings_in_full(cfg, errors)
    if ft.full_bf16 and cfg.loop.mixed_precision != "bf16":
        errors.append("`full_bf16` needs `mixed_precision` = 'bf16'")
    if ft.fused_backward_pass:
        if cfg.loop.gradient_accumulation_steps != 1:
            errors.append("`fused_backward_pass` updates weights during the backward pass, so it cannot accumulate "
                          "gradients: set `gradient_accumulation_steps` = 1 (raise the batch size instead)")
        if cfg.loop.mixed_precision == "fp16":
            errors.append("`fused_backward_pass` cannot use fp16 loss scaling: use `mixed_precision` = 'bf16'")
    if ft.fsdp and ft.fused_backward_pass:
        errors.append("`fused_backward_pass` and `fsdp` cannot be combined (FSDP reduces the gradients after the "
                      "backward pass); sharding already removes most of the gradient memory: drop one of them")
    s = cfg.sampling
    if ft.fsdp and (s.sample_every_n_steps or s.sample_every_n_epochs or s.sample_at_first):
        errors.append("samples during training are not available with `fsdp` (every process holds only shards of "
                      "the model): render the saved checkpoints with generate_video_wan.py or "
                      "tools/compare_checkpoints.py instead, and keep `validate_every_n_steps` for a loss curve")
    if ft.fsdp_cpu_offload and not ft.fsdp:
        errors.append("`fsdp_cpu_offload` needs `fsdp` = true")
    for name in ("trainable_patterns", "frozen_patterns"):
        for pattern in cfg.get(name):
            try:
                re.compile(pattern)
            except re.error as exc:
                errors.append(f"`{name}`: {pattern!r} is not a valid regular expression ({exc})")


def validate(cfg: TrainConfig) -> TrainConfig:
    """Check the cross-field rules; raise one ConfigError listing every problem, else return cfg."""
    errors: list[str] = []
    _finite(cfg, errors)
    variant = _variant(cfg, errors)
    _models(cfg, variant, errors)
    _experts(cfg, variant, errors)
    _timesteps(cfg, variant, errors)
    _attention(cfg, errors)
    _sequence_parallel(cfg, variant, errors)
    if not cfg.finetune.full_fine_tune:
        _network(cfg, errors)  # full fine-tuning refuses every LoRA setting instead (`_finetune`)
    _optimizer(cfg, errors)
    _loop(cfg, errors)
    _sampling(cfg, variant, errors)
    _finetune(cfg, errors)
    if errors:
        where = f" ({cfg.run.config_file})" if cfg.run.config_file else ""
        raise ConfigError(f"invalid training config{where}:\n  - " + "\n  - ".join(errors))
    return cfg

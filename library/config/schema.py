"""The training config schema: frozen dataclasses whose field names are the flat Kohya / musubi flags.

Every field name is unique across the tree, so a flat TOML (or the flat argparse namespace) maps onto
the nested `TrainConfig` without loss. A field's metadata holds its help text and, where needed, its
allowed `choices` (compared case-insensitively) or a `coerce` function applied after type coercion.
Defaults are what a GUI means when it drops a key (it drops "", false, 0, 0.0 and None).
"""

from __future__ import annotations

from dataclasses import MISSING, dataclass, field, fields
from typing import Any

from library.wan.vae_tiling import DEFAULT_TILE as DEFAULT_VAE_TILE

from .coerce import normalise_timestep_boundary
from .keys import NETWORK_MODULES


def arg(default: Any, help: str, choices: tuple[str, ...] | None = None, coerce=None):  # noqa: A002
    """A schema field: default, help text and optional choices / post-coercion normaliser."""
    meta: dict[str, Any] = {"help": help}
    if choices is not None:
        meta["choices"] = choices
    if coerce is not None:
        meta["coerce"] = coerce
    if isinstance(default, dict):
        return field(default_factory=dict, metadata=meta)
    return field(default=default, metadata=meta)


DTYPES = ("float32", "fp32", "float", "float16", "fp16", "bfloat16", "bf16")


def _non_negative(value: int) -> int:
    if value < 0:
        raise ValueError("must be 0 or more")
    return value


@dataclass(frozen=True)
class RunArgs:
    config_file: str | None = arg(None, "training TOML (flat keys, or one level of sections); CLI flags override it")
    output_config: str | None = arg(None, "write the resolved config to this TOML file and exit without training")
    dataset_config: str | None = arg(None, "dataset TOML (musubi-tuner schema)")
    preset: str = arg("", "training preset: character, style, motion or domain (empty: none)",
                      choices=("", "character", "style", "motion", "domain"))


@dataclass(frozen=True)
class ModelArgs:
    task: str = arg("t2v-14B", "WAN task / variant: t2v-A14B, i2v-A14B, ti2v-5B, t2v-14B, t2v-1.3B, i2v-14B")
    dit: str | None = arg(None, "DiT checkpoint: the low-noise expert for WAN 2.2 A14B, or the only DiT")
    dit_high_noise: str | None = arg(None, "WAN 2.2 A14B high-noise expert checkpoint (trains both experts)")
    vae: str | None = arg(None, "VAE checkpoint (WAN 2.1 VAE, or the WAN 2.2 VAE for TI2V-5B)")
    vae_dtype: str | None = arg(None, "VAE dtype (default bfloat16)", choices=DTYPES)
    t5: str | None = arg(None, "umT5-XXL text encoder checkpoint")
    t5_tokenizer: str | None = arg(None, "local umT5 tokenizer folder (default: google/umt5-xxl beside `t5`)")
    clip: str | None = arg(None, "CLIP vision checkpoint (WAN 2.1 I2V only)")


@dataclass(frozen=True)
class MemoryArgs:
    fp8_base: bool = arg(False, "keep the DiT Linear weights in fp8 (LoRA weights stay fp32)")
    fp8_scaled: bool = arg(False, "scaled fp8 quantisation of the DiT weights (needs fp8_base)")
    fp8_fast: bool = arg(False, "with fp8_base: the frozen block Linears multiply in fp8 (torch._scaled_mm, forward "
                                "and input gradient; activations and gradients quantised per row) on GPUs with "
                                "fp8 tensor cores (compute capability 8.9+: Ada, Hopper, Blackwell), twice the "
                                "bf16 rate; elsewhere one warning and bf16 matmuls. Error against bf16: "
                                "docs/memory.md")
    fp8_t5: bool = arg(False, "umT5 block weights in fp8 e4m3 with per-row scales (about 4.6 GB less for umT5-XXL)")
    blocks_to_swap: int = arg(0, "number of DiT blocks kept on the CPU and swapped in during each step")
    use_pinned_memory_for_block_swap: bool = arg(False, "use pinned host memory for block swap")
    offload_inactive_dit: bool = arg(False, "WAN 2.2 A14B: keep the expert not in use on the CPU")
    gradient_checkpointing: bool = arg(False, "recompute block activations in the backward pass")
    gradient_checkpointing_cpu_offload: bool = arg(False, "offload checkpointed activations to the CPU")
    gradient_checkpointing_keep_attention: bool = arg(
        False, "with gradient_checkpointing: keep each block's self-attention output and log-sum-exp instead of "
               "recomputing the attention in the backward pass (faster; 2 bytes x dim + 4 bytes x heads more per "
               "token and block: 0.32 GiB a block, 12.4 GiB for an A14B expert at 832x480x81)")
    gradient_checkpointing_keep_attention_blocks: int = arg(
        0, "with gradient_checkpointing: keep the self-attention output and log-sum-exp of the last N blocks only "
           "and recompute the attention of the others (0: none; `gradient_checkpointing_keep_attention = true` "
           "keeps every block's); auto_memory chooses the largest N that fits", coerce=_non_negative)
    gradient_checkpointing_offload_attention: bool = arg(
        False, "with gradient_checkpointing_cpu_offload and kept attention (`gradient_checkpointing_keep_attention` "
               "or `_blocks`): the kept self-attention outputs go to pinned host memory with the block inputs and "
               "come back with them for the backward pass, so attention is not recomputed and its outputs take no "
               "GPU memory (2 bytes x dim + 4 bytes x heads per token and block of host RAM). auto_memory "
               "chooses it where the GPU cannot hold the kept outputs and the host can")
    gradient_checkpointing_skip_blocks: int = arg(
        0, "with gradient_checkpointing: the last N DiT blocks are not checkpointed and keep all their activations "
           "(faster: no recomputation; about 8.5 GiB more a block for an A14B expert at 832x480x81, but the last "
           "block costs about nothing). Keeping attention and activation offload apply to the other blocks; "
           "`gradient_checkpointing_keep_attention_blocks` counts among them; VACE blocks stay checkpointed; "
           "not with blocks_to_swap. auto_memory chooses the largest N that fits", coerce=_non_negative)
    vae_cache_cpu: bool = arg(False, "keep the VAE's causal chunk cache in host memory (samples during training)")
    vae_tiling: bool = arg(False, "decode samples in overlapping spatial tiles, blended at the seams (less VRAM; tiles "
                                  f"of {DEFAULT_VAE_TILE} px unless vae_spatial_tile_sample_min_size says)")
    vae_spatial_tile_sample_min_size: int = arg(0, "VAE tile side in pixels; setting it turns vae_tiling on (0: "
                                                   "off)", coerce=_non_negative)
    auto_memory: bool = arg(False, "choose fp8, block swap and checkpointing from the free GPU memory")

    @property
    def vae_tile_size(self) -> int | None:
        """The VAE tile side in pixels, as musubi-tuner reads its two flags: a size turns tiling on, and
        `vae_tiling` alone means 256 px. None: no tiling."""
        if self.vae_spatial_tile_sample_min_size:
            return self.vae_spatial_tile_sample_min_size
        return DEFAULT_VAE_TILE if self.vae_tiling else None


ATTENTION_ORDER = ("sdpa", "flash_attn", "sage_attn", "xformers", "flash3")  # musubi-tuner's precedence


@dataclass(frozen=True)
class AttentionArgs:
    sdpa: bool = arg(False, "PyTorch scaled_dot_product_attention (also the default without an attention option, "
                            "except on Hopper GPUs with FlashAttention 3 installed)")
    flash_attn: bool = arg(False, "FlashAttention 2 (needs flash-attn)")
    flash3: bool = arg(False, "FlashAttention 3 (needs flash-attn 3; the default on Hopper GPUs where installed)")
    xformers: bool = arg(False, "xformers memory-efficient attention (needs xformers)")
    sage_attn: bool = arg(False, "SageAttention (needs sageattention)")
    split_attn: bool = arg(False, "compute attention one sample at a time (less memory)")
    sequence_parallel_size: int = arg(0, "split each sample's tokens over N processes (sequence parallelism, for long "
                                         "clips; the processes = data-parallel groups x N; 0 or 1: off)",
                                      coerce=_non_negative)
    sequence_parallel_attention: str = arg("ulysses", "attention under sequence parallelism: ulysses (all-to-all over "
                                                      "heads; N must divide the head count) or all_gather (keys and "
                                                      "values gathered; any N)", choices=("ulysses", "all_gather"))

    @property
    def sequence_parallel(self) -> int:
        """Processes per sample (1: no sequence parallelism)."""
        return max(1, self.sequence_parallel_size)

    @property
    def attention_backend(self) -> str:
        """The backend chosen; "auto" when none is (`library.wan.attention.AUTO`: FlashAttention 3 on a Hopper
        GPU where it is installed, else sdpa, chosen once per process). With several set, musubi-tuner's order
        decides (sdpa, flash_attn, sage_attn, xformers, flash3) and `validate` warns that the others are unused."""
        for name in ATTENTION_ORDER:
            if getattr(self, name):
                return name
        return "auto"


@dataclass(frozen=True)
class TimestepArgs:
    timestep_sampling: str = arg("sigma", "how training timesteps are drawn",
                                 choices=("sigma", "uniform", "sigmoid", "shift", "flux_shift", "logsnr",
                                          "logit_normal"))
    discrete_flow_shift: float = arg(1.0, "flow shift for `shift` sampling and the sigma schedule")
    sigmoid_scale: float = arg(1.0, "scale of the logits for `sigmoid` and `shift` sampling")
    weighting_scheme: str = arg("none", "loss weighting over timesteps",
                                choices=("none", "logit_normal", "mode", "cosmap", "sigma_sqrt"))
    logit_mean: float = arg(0.0, "mean for `logit_normal` weighting")
    logit_std: float = arg(1.0, "std for `logit_normal` weighting")
    mode_scale: float = arg(1.29, "scale for `mode` weighting")
    min_timestep: int = arg(0, "lowest training timestep, 0-1000")
    max_timestep: int = arg(1000, "highest training timestep, 0-1000")
    preserve_distribution_shape: bool = arg(False, "restrict to [min, max] by rejection, keeping the shape")
    num_timestep_buckets: int | None = arg(None, "stratified timesteps: each epoch's draws spread evenly over N "
                                                 "equal buckets of the distribution (musubi-tuner's; None or 1: off)")
    timestep_boundary: int | float | None = arg(
        None, "WAN 2.2 A14B expert switch: a fraction 0-1 or a timestep 0-1000 (0 or absent: the variant's)",
        coerce=normalise_timestep_boundary,
    )


@dataclass(frozen=True)
class NetworkArgs:
    network_module: str = arg("networks.lora_wan", "network module: networks.lora_wan (this trainer's LoRA) or "
                                                   "lycoris.kohya (LyCORIS LoHa / LoKr / ..., needs `pip install "
                                                   "lycoris-lora`)", choices=tuple(NETWORK_MODULES))
    network_dim: int = arg(4, "LoRA rank")
    network_alpha: float = arg(1.0, "LoRA alpha; scale = alpha / rank (0: alpha = rank)")
    network_dropout: float = arg(0.0, "dropout on the LoRA down-projection output (0: off)")
    network_args: dict = arg({}, 'list of "key=value": loraplus_lr_ratio, exclude_patterns, include_patterns, '
                                 "rank_dropout, module_dropout, verbose")
    network_weights: str | None = arg(None, "LoRA weights to start from")
    dim_from_weights: bool = arg(False, "take rank and alpha from `network_weights`")
    base_weights: tuple[str, ...] = arg((), "LoRA files merged into the DiT before training")
    base_weights_multiplier: tuple[float, ...] = arg((), "strength of each `base_weights` file")
    scale_weight_norms: float = arg(0.0, "max-norm regularisation of each LoRA module's delta (0: off)")
    shared_expert_lora: bool = arg(False, "WAN 2.2 A14B: one LoRA shared by both experts (musubi style)")
    network_dim_high_noise: int = arg(0, "WAN 2.2 A14B: rank of the high-noise expert's LoRA (0: network_dim)")


@dataclass(frozen=True)
class OptimizerArgs:
    optimizer_type: str = arg("AdamW", "AdamW, AdamW8bit, AdaFactor, Lion, Prodigy, or a dotted class path")
    optimizer_args: dict = arg({}, 'list of "key=value" optimizer arguments (e.g. "weight_decay=0.01")')
    learning_rate: float = arg(2.0e-6, "learning rate")
    learning_rate_high_noise: float = arg(0.0, "WAN 2.2 A14B: learning rate of the high-noise LoRA (0: learning_rate)")
    max_grad_norm: float = arg(1.0, "gradient clipping norm (0: no clipping)")


_SCHEDULERS = ("constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial",
               "inverse_sqrt", "cosine_with_min_lr", "warmup_stable_decay", "adafactor", "piecewise_constant")


@dataclass(frozen=True)
class SchedulerArgs:
    lr_scheduler: str = arg("constant", "learning-rate schedule", choices=_SCHEDULERS)
    lr_warmup_steps: int | float = arg(0, "warmup: int steps, or a float < 1 as a ratio of the total steps")
    lr_decay_steps: int | float = arg(0, "decay: int steps, or a float < 1 as a ratio of the total steps")
    lr_scheduler_num_cycles: int = arg(1, "restarts for cosine_with_restarts")
    lr_scheduler_power: float = arg(1.0, "power for the polynomial schedule")
    lr_scheduler_timescale: int = arg(0, "timescale for inverse_sqrt (0: the warmup steps)")
    lr_scheduler_min_lr_ratio: float = arg(0.0, "final learning rate as a ratio of the initial one")
    lr_scheduler_type: str = arg("", "custom scheduler class as a dotted path (overrides lr_scheduler)")
    lr_scheduler_args: dict = arg({}, 'list of "key=value" arguments for the custom scheduler')


@dataclass(frozen=True)
class LoopArgs:
    max_train_steps: int = arg(1600, "training steps (overridden by max_train_epochs)")
    max_train_epochs: int = arg(0, "training epochs, overrides max_train_steps (0: use max_train_steps)")
    gradient_accumulation_steps: int = arg(1, "steps accumulated before each optimizer update")
    mixed_precision: str = arg("no", "mixed precision", choices=("no", "fp16", "bf16"))
    seed: int | None = arg(None, "random seed (default: a random one, recorded in the metadata)")
    max_data_loader_n_workers: int = arg(8, "DataLoader workers (0: load in the main process)")
    ddp_timeout: int = arg(0, "minutes the processes wait for each other (0: PyTorch's default)",
                           coerce=_non_negative)
    i2v_probability: float = arg(0.0, "TI2V-5B: probability of an image-to-video step (clean first frame)")
    validate_every_n_steps: int = arg(0, "validation loss every N steps, needs a validation set (0: off)")


@dataclass(frozen=True)
class SavingArgs:
    output_dir: str | None = arg(None, "folder for LoRA files, state and samples")
    output_name: str | None = arg(None, "base name of the saved files")
    save_every_n_epochs: int = arg(0, "save every N epochs (0: off)")
    save_every_n_steps: int = arg(0, "save every N steps (0: off)")
    save_last_n_epochs: int = arg(0, "keep only the last N epoch saves (0: off)")
    save_last_n_steps: int = arg(0, "keep only the saves of the last N steps (0: off)")
    save_last_n_epochs_state: int = arg(0, "keep only the last N epoch states (0: off)")
    save_last_n_steps_state: int = arg(0, "keep only the states of the last N steps (0: off)")
    save_state: bool = arg(False, "save optimizer and scheduler state with each save (for resume)")
    save_state_on_train_end: bool = arg(False, "save the state at the end of training")
    resume: str | None = arg(None, "state folder to resume from")
    save_precision: str | None = arg(None, "dtype of the saved LoRA (default fp32)",
                                     choices=("float", "fp32", "fp16", "bf16"))
    save_lora_format: str = arg("kohya", "saved LoRA keys: kohya (lora_unet_*) or comfyui (diffusion_model.*)",
                                choices=("kohya", "comfyui"))
    no_metadata: bool = arg(False, "save only the minimum metadata")
    training_comment: str | None = arg(None, "free text stored as ss_training_comment")
    metadata_title: str | None = arg(None, "model spec title (default: output_name)")
    metadata_author: str | None = arg(None, "model spec author")
    metadata_description: str | None = arg(None, "model spec description")
    metadata_license: str | None = arg(None, "model spec license")
    metadata_tags: str | None = arg(None, "model spec tags, comma separated")


@dataclass(frozen=True)
class LoggingArgs:
    logging_dir: str | None = arg(None, "TensorBoard log folder (enables logging)")
    log_with: str | None = arg(None, "tensorboard, wandb or all", choices=("tensorboard", "wandb", "all"))
    log_prefix: str | None = arg(None, "prefix of each log folder name")
    log_tracker_name: str | None = arg(None, "tracker (project) name")
    log_tracker_config: str | None = arg(None, "tracker config TOML passed to the tracker's init")
    wandb_run_name: str | None = arg(None, "wandb run name")


@dataclass(frozen=True)
class SamplingArgs:
    sample_prompts: str | None = arg(None, "prompt file (.txt, .toml or .json) for samples during training")
    sample_every_n_steps: int = arg(0, "sample every N steps (0: off)")
    sample_every_n_epochs: int = arg(0, "sample every N epochs, overrides sample_every_n_steps (0: off)")
    sample_at_first: bool = arg(False, "sample before training")


@dataclass(frozen=True)
class FineTuneArgs:
    full_fine_tune: bool = arg(False, "train the DiT weights themselves instead of a LoRA (finetune/fine_tune_wan.py "
                                      "turns it on)")
    full_bf16: bool = arg(False, "full fine-tuning: weights, gradients and optimizer state in bf16, no fp32 master "
                                 "weights (less memory; updates far below a weight's bf16 step are lost)")
    fused_backward_pass: bool = arg(False, "full fine-tuning: update each weight as soon as its gradient is ready and "
                                           "free the gradient (needs gradient_accumulation_steps = 1; max_grad_norm "
                                           "clips each tensor)")
    trainable_patterns: tuple[str, ...] = arg((), "full fine-tuning: regexes of DiT parameter names to train "
                                                  "(empty: all), e.g. 'blocks\\.(1[0-9]|2[0-9])\\.'")
    frozen_patterns: tuple[str, ...] = arg((), "full fine-tuning: regexes of DiT parameter names to keep frozen")
    fsdp: bool = arg(False, "full fine-tuning on several processes: shard weights, gradients and optimizer state "
                            "across them, block by block (PyTorch FSDP2) instead of a full copy on each")
    fsdp_cpu_offload: bool = arg(False, "with fsdp: keep the shards and the optimizer state in host memory (slower; "
                                        "fits models the GPUs cannot hold even sharded)")
    save_model_format: str = arg("official", "full fine-tuning: saved DiT keys: official (blocks.0...) or comfyui "
                                             "(model.diffusion_model.blocks.0...)", choices=("official", "comfyui"))


@dataclass(frozen=True)
class CompileArgs:
    compile: bool | None = arg(None, "torch.compile the DiT blocks, one block at a time (not set: on when training "
                                     "on a CUDA GPU, except with fsdp, eager elsewhere; false: always eager). A "
                                     "backend that fails on this machine falls back to eager with one warning")
    compile_backend: str = arg("inductor", "torch.compile backend")
    compile_mode: str = arg("default", "torch.compile mode",
                            choices=("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"))
    compile_dynamic: str | None = arg(None, "dynamic shapes: true, false or auto", choices=("true", "false", "auto"))
    compile_fullgraph: bool = arg(False, "torch.compile fullgraph mode")
    compile_cache_size_limit: int = arg(0, "torch._dynamo cache size limit (0: PyTorch's default)")
    cuda_allow_tf32: bool = arg(False, "allow TF32 matmuls on Ampere and newer")
    cuda_cudnn_benchmark: bool = arg(False, "cudnn benchmark mode")


@dataclass(frozen=True)
class TrainConfig:
    """The whole resolved training config. Build it with `load_config`, check it with `validate`."""

    run: RunArgs = field(default_factory=RunArgs)
    model: ModelArgs = field(default_factory=ModelArgs)
    memory: MemoryArgs = field(default_factory=MemoryArgs)
    attention: AttentionArgs = field(default_factory=AttentionArgs)
    timesteps: TimestepArgs = field(default_factory=TimestepArgs)
    network: NetworkArgs = field(default_factory=NetworkArgs)
    optimizer: OptimizerArgs = field(default_factory=OptimizerArgs)
    scheduler: SchedulerArgs = field(default_factory=SchedulerArgs)
    loop: LoopArgs = field(default_factory=LoopArgs)
    saving: SavingArgs = field(default_factory=SavingArgs)
    logging: LoggingArgs = field(default_factory=LoggingArgs)
    sampling: SamplingArgs = field(default_factory=SamplingArgs)
    compilation: CompileArgs = field(default_factory=CompileArgs)
    finetune: FineTuneArgs = field(default_factory=FineTuneArgs)

    def get(self, name: str) -> Any:
        """A field by its flat name, wherever it lives (`cfg.get("learning_rate")`)."""
        return getattr(getattr(self, FIELD_GROUP[name]), name)


GROUPS: dict[str, type] = {f.name: f.default_factory for f in fields(TrainConfig)}  # group -> its dataclass
FIELD_GROUP: dict[str, str] = {}  # flat field name -> group attribute
for _group, _cls in GROUPS.items():
    for _f in fields(_cls):
        if _f.name in FIELD_GROUP:
            raise RuntimeError(f"config field {_f.name!r} is declared twice")  # a schema bug, caught at import
        FIELD_GROUP[_f.name] = _group


def field_default(name: str) -> Any:
    """The default value of a flat field."""
    f = next(f for f in fields(GROUPS[FIELD_GROUP[name]]) if f.name == name)
    return f.default_factory() if f.default is MISSING else f.default

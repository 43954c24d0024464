"""Command-line plumbing shared by `generate_video_wan.py` and `tools/compare_checkpoints.py`.

Argument groups (models, prompts and sampling), loading the models a command names, and turning the
prompt flags into `SampleRequest`s. Per-line values of a prompt file win over the command line, which wins
over the variant's defaults.
"""

from __future__ import annotations

import argparse
import logging

import torch

from .generate import SamplingModels, encode_requests
from .prompts import PromptError, SampleRequest, read_prompt_file
from .schedules import CONVENTIONS, SAMPLERS

logger = logging.getLogger(__name__)

# --attn_mode values (ours and musubi-tuner's) -> library.wan.attention backend
ATTN_MODES = {"auto": "auto", "sdpa": "sdpa", "torch": "sdpa", "flash": "flash_attn", "flash2": "flash_attn",
              "flash3": "flash3", "xformers": "xformers", "sageattn": "sage_attn", "sage": "sage_attn"}
DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


def add_model_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("models")
    g.add_argument("--task", default="t2v-14B",
                   help="variant: t2v-A14B, i2v-A14B, ti2v-5B, t2v-14B (default, as in musubi-tuner), t2v-1.3B, ...")
    g.add_argument("--dit", help="DiT file or folder (the low-noise expert for WAN 2.2 A14B); required")
    g.add_argument("--dit_high_noise", help="the high-noise expert of WAN 2.2 A14B")
    g.add_argument("--vae", help="WAN VAE (2.1 for A14B / 2.1 models, 2.2 for TI2V-5B); required")
    g.add_argument("--vae_dtype", choices=sorted(DTYPES), help="VAE dtype (default: bfloat16 on GPU, float32 on CPU)")
    g.add_argument("--t5", help="umT5-XXL encoder weights; required")
    g.add_argument("--tokenizer", help="umT5 tokenizer folder (default: google/umt5-xxl beside the weights)")
    g.add_argument("--clip", help="CLIP vision file, WAN 2.1 I2V only (i2v-14B): the official models_clip_open-"
                                  "clip-xlm-roberta-large-vit-huge-14.pth or clip_vision_h.safetensors")
    g.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    g.add_argument("--dtype", choices=sorted(DTYPES), help="DiT dtype (default: bfloat16 on GPU, float32 on CPU)")
    m = parser.add_argument_group("memory (as in training)")
    m.add_argument("--fp8_base", "--fp8", action="store_true",
                   help="DiT Linear weights in fp8 (ComfyUI fp8_scaled files as they are)")
    m.add_argument("--fp8_scaled", action="store_true", help="scaled fp8 (with --fp8_base)")
    m.add_argument("--fp8_fast", action="store_true", help="with --fp8_base: the fp8 weights multiply in fp8 "
                   "(torch._scaled_mm) on GPUs with fp8 tensor cores (Ada, Hopper, Blackwell); elsewhere bf16")
    m.add_argument("--fp8_t5", action="store_true",
                   help="umT5 block Linear weights in fp8 with per-channel scales (about 4.6 GB less for umT5-XXL)")
    m.add_argument("--blocks_to_swap", type=int, default=0,
                   help="DiT blocks kept in host memory and streamed in (CUDA)")
    m.add_argument("--offload_inactive_dit", action="store_true",
                   help="WAN 2.2 A14B: the expert that is not denoising waits in host memory")
    m.add_argument("--vae_cache_cpu", action="store_true",
                   help="keep the VAE's causal chunk cache in host memory (less VRAM, the same frames)")
    s = parser.add_argument_group("speed")
    s.add_argument("--attn_mode", default="auto", choices=sorted(ATTN_MODES),
                   help="attention kernel: auto (default: flash3 on Hopper GPUs where FlashAttention 3 is installed, "
                        "else sdpa), sdpa / torch, flash / flash2, flash3, xformers, sageattn (inference only); "
                        "musubi-tuner's names are accepted")
    s.add_argument("--split_attn", action="store_true", help="attention one sample at a time (less memory with CFG)")
    s.add_argument("--compile", action="store_true", help="torch.compile the DiT blocks (first steps are slower)")
    s.add_argument("--compile_backend", default="inductor")
    s.add_argument("--compile_mode", default="default",
                   choices=("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"))
    s.add_argument("--compile_dynamic", choices=("true", "false", "auto"))
    s.add_argument("--compile_fullgraph", action="store_true")
    s.add_argument("--compile_cache_size_limit", type=int, default=0,
                   help="torch._dynamo cache size (0: default)")


def add_sampling_args(parser: argparse.ArgumentParser) -> None:
    from .musubi import sampler_name

    g = parser.add_argument_group("prompts and sampling (defaults: the variant's)")
    g.add_argument("--prompt", action="append", help="a prompt (sample-prompt options allowed); repeatable")
    g.add_argument("--from_file", help="prompt file: .txt (musubi / Kohya sample-prompt lines), .toml or .json")
    g.add_argument("--negative_prompt", help="default: the official WAN negative prompt")
    g.add_argument("--image", "--image_path", help="start image for I2V / TI2V (a line's --i wins)")
    g.add_argument("--end_image", "--end_image_path", help="last frame for FLF2V (flf2v-14B) and Fun-InP (a line's "
                                                           "--ei wins)")
    g.add_argument("--one_frame_inference", help="one-frame inference, e.g. target_index=1,control_index=0 "
                                                 "(WAN 2.1 I2V / FLF2V; a line's --of wins)")
    g.add_argument("--control_image_path", nargs="*", help="control images of one-frame inference, one per "
                                                         "control_index (a line's --ci wins)")
    g.add_argument("--control_path", help="Fun-Control and VACE: the control video (or a folder of frames, or a still "
                                          "image), read from frame 0 at the output size (a line's --cn wins)")
    g.add_argument("--mask_path", help="VACE: mask video, frame folder or image, white = generate (--mk)")
    g.add_argument("--ref_image_path", help="VACE: reference image(s), comma-separated; Fun-Control models "
                                            "with ref_conv (V1.1, WAN 2.2): one reference image (--ri)")
    g.add_argument("--vace_scale", type=float, help="VACE: scale of the VACE hints (default 1; --vs)")
    g.add_argument("--width", type=int, help="a multiple of 16 (32 for TI2V-5B)")
    g.add_argument("--height", type=int, help="a multiple of 16 (32 for TI2V-5B)")
    g.add_argument("--frames", "--video_length", type=int, help="frame count, 1 + 4k")
    g.add_argument("--fps", type=float, help="frame rate of the written video (default: the variant's, 16 or 24)")
    g.add_argument("--steps", "--infer_steps", type=int)
    g.add_argument("--seed", type=int, help="default: a random seed, recorded in the sidecar")
    g.add_argument("--guidance_scale", type=float, help="CFG scale (both experts unless the next flag is set)")
    g.add_argument("--guidance_scale_high_noise", type=float, help="CFG scale of the A14B high-noise expert")
    g.add_argument("--timestep_boundary", type=float,
                   help="A14B expert switch: 0-1 (or 0-1000); default: the variant's (0.875 T2V, 0.9 I2V)")
    g.add_argument("--flow_shift", type=float)
    g.add_argument("--sampler", "--sample_solver", type=sampler_name, choices=SAMPLERS, default="unipc",
                   help="unipc, euler (musubi: vanilla) or dpm++")
    g.add_argument("--schedule", choices=CONVENTIONS, default="wan",
                   help="sigma list: the official WAN code's, or diffusers' (to reproduce diffusers outputs)")
    g.add_argument("--save_frames", action="store_true", help="also write every frame as PNG")


def build_requests(args) -> tuple[list[SampleRequest], list[PromptError]]:
    """Requests from --prompt / --from_file with the command line's values as defaults, checked against the
    variant (sizes, start images) so that a line that cannot render is named before any model loads."""
    from library.wan.variants import get_variant

    from .prompts import PromptNotes, check_requests, parse_prompt_line

    requests, errors = [], []
    if args.from_file:
        requests, errors = read_prompt_file(args.from_file)
    notes = PromptNotes("--prompt")
    for i, text in enumerate(args.prompt or [], 1):
        try:
            requests.append(parse_prompt_line(text, f"--prompt {i}", notes))
        except PromptError as exc:
            errors.append(exc)
    notes.log()
    defaults = dict(negative_prompt=args.negative_prompt, image=args.image, end_image=args.end_image,
                    one_frame=args.one_frame_inference, control_images=tuple(args.control_image_path or ()) or None,
                    width=args.width, height=args.height,
                    frames=args.frames, steps=args.steps, seed=args.seed, guidance=args.guidance_scale,
                    guidance_high=args.guidance_scale_high_noise, flow_shift=args.flow_shift,
                    control=args.control_path, mask=args.mask_path, references=args.ref_image_path,
                    vace_scale=args.vace_scale)
    requests = [r.with_defaults(**defaults) for r in requests]
    requests, bad = check_requests(requests, get_variant(args.task), args.from_file or "--prompt")
    return requests, errors + bad


def _dtype(name: str | None, device: torch.device) -> torch.dtype:
    return DTYPES[name] if name else (torch.bfloat16 if device.type == "cuda" else torch.float32)


def load_models(args) -> tuple[SamplingModels, dict]:
    """Load the DiT expert(s), the VAE, the text encoder (and the CLIP vision encoder of WAN 2.1 I2V) the
    arguments name; returns them and the file list for the sidecar."""
    from library.wan.loading import load_text_encoder, load_vae
    from library.wan.variants import get_variant

    variant = get_variant(args.task)
    device = torch.device(args.device)
    dtype = _dtype(args.dtype, device)
    clip = _load_clip(args, variant, device)  # first: a missing --clip fails before the large models load
    offload = bool(getattr(args, "offload_inactive_dit", False)) and variant.two_experts and bool(args.dit_high_noise)
    experts = {}
    if variant.two_experts:
        if args.dit_high_noise:
            experts["high_noise"] = _load_expert(args, args.dit_high_noise, device, dtype, variant.name, offload)
        experts["low_noise"] = _load_expert(args, args.dit, device, dtype, variant.name, offload)
    else:
        if args.dit_high_noise:
            raise ValueError(f"--dit_high_noise is only for the two-expert WAN 2.2 A14B models, not {variant.name}")
        experts["dit"] = _load_expert(args, args.dit, device, dtype, variant.name)
    vae_dtype = _dtype(getattr(args, "vae_dtype", None), device)
    vae = load_vae(args.vae, device=device, dtype=vae_dtype, cache_cpu=getattr(args, "vae_cache_cpu", False))
    text_encoder = load_text_encoder(args.t5, args.tokenizer, device=device, fp8=getattr(args, "fp8_t5", False),
                                     dtype=torch.float32 if device.type == "cpu" else torch.bfloat16)
    files = {"task": variant.name, "dit": str(args.dit), "dit_high_noise": args.dit_high_noise, "vae": str(args.vae),
             "t5": str(args.t5), "dtype": str(dtype).replace("torch.", ""), "device": str(device)}
    if getattr(args, "fp8_t5", False):
        files["t5_fp8"] = True
    if clip is not None:
        files["clip"] = str(args.clip)
    models = SamplingModels(variant, experts, vae, text_encoder, clip=clip, run_device=device, offload_inactive=offload,
                            boundary=getattr(args, "timestep_boundary", None))
    return models, files


def _compile_settings(args):
    from library.config.schema import CompileArgs

    return CompileArgs(compile=True, compile_backend=getattr(args, "compile_backend", "inductor"),
                       compile_mode=getattr(args, "compile_mode", "default"),
                       compile_dynamic=getattr(args, "compile_dynamic", None),
                       compile_fullgraph=getattr(args, "compile_fullgraph", False),
                       compile_cache_size_limit=getattr(args, "compile_cache_size_limit", 0) or 0)


def _load_expert(args, path, device: torch.device, dtype, task: str, offload: bool = False):
    """One DiT with the memory features the flags ask for (the same code as training uses); with `offload`
    it waits in host memory until sampling brings it in."""
    from types import SimpleNamespace

    from library.runtime.memory import apply_memory_features, fp8_config
    from library.wan.loading import load_dit

    if getattr(args, "fp8_scaled", False) and not getattr(args, "fp8_base", False):
        raise ValueError("--fp8_scaled needs --fp8_base (musubi-tuner: --fp8)")
    if getattr(args, "fp8_fast", False) and not getattr(args, "fp8_base", False):
        raise ValueError("--fp8_fast needs --fp8_base (musubi-tuner: --fp8 --fp8_scaled --fp8_fast)")
    memory = SimpleNamespace(fp8_base=getattr(args, "fp8_base", False), fp8_scaled=getattr(args, "fp8_scaled", False),
                             fp8_fast=getattr(args, "fp8_fast", False),
                             blocks_to_swap=getattr(args, "blocks_to_swap", 0), gradient_checkpointing=False,
                             gradient_checkpointing_cpu_offload=False, use_pinned_memory_for_block_swap=True)
    swap = memory.blocks_to_swap > 0 and device.type == "cuda"
    model = load_dit(path, "cpu" if swap or offload else device, dtype, task, fp8=fp8_config(memory))
    if memory.fp8_base or memory.blocks_to_swap:
        apply_memory_features(model, memory, device, place=not offload)
    model.set_attention_backend(ATTN_MODES[getattr(args, "attn_mode", "auto")], getattr(args, "split_attn", False))
    if getattr(args, "compile", False):
        from library.runtime.compiling import compile_blocks

        compile_blocks(model, _compile_settings(args))
    return model


def _load_clip(args, variant, device: torch.device):
    """The CLIP vision encoder for WAN 2.1 I2V (float16 on GPU as the official code runs it), else None."""
    from library.wan.loading import load_clip_vision

    path = getattr(args, "clip", None)
    if not (variant.image_embedding and variant.is_i2v):  # text-to-video Fun-Control: zero CLIP tokens
        if path:
            logger.warning("--clip is only used by WAN 2.1 I2V (i2v-14B); ignored for %s", variant.name)
        return None
    if not path:
        raise ValueError(f"--task {variant.name} (WAN 2.1 I2V) needs --clip, the CLIP vision file "
                         "(models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth or clip_vision_h.safetensors)")
    return load_clip_vision(path, device=device, dtype=torch.float16 if device.type == "cuda" else torch.float32)


def encode_and_free(models: SamplingModels, requests: list[SampleRequest]) -> list[SampleRequest]:
    """Encode every prompt once, then drop the text encoder (it is the largest model after the DiT)."""
    requests = encode_requests(models.text_encoder, requests, models.variant)
    models.text_encoder = None
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return requests


def report_errors(errors: list) -> None:
    for exc in errors:
        logger.error("%s", exc)

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
ATTN_MODES = {"sdpa": "sdpa", "torch": "sdpa", "flash": "flash_attn", "flash2": "flash_attn", "flash3": "flash3",
              "xformers": "xformers", "sageattn": "sage_attn", "sage": "sage_attn"}
DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


def add_model_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("models")
    g.add_argument("--task", required=True, help="variant: t2v-A14B, i2v-A14B, ti2v-5B, t2v-14B, t2v-1.3B, ...")
    g.add_argument("--dit", required=True, help="DiT file or folder (the low-noise expert for WAN 2.2 A14B)")
    g.add_argument("--dit_high_noise", help="the high-noise expert of WAN 2.2 A14B")
    g.add_argument("--vae", required=True, help="WAN VAE (2.1 for A14B / 2.1 models, 2.2 for TI2V-5B)")
    g.add_argument("--t5", required=True, help="umT5-XXL encoder weights")
    g.add_argument("--tokenizer", help="umT5 tokenizer folder (default: google/umt5-xxl beside the weights)")
    g.add_argument("--clip", help="CLIP vision file, WAN 2.1 I2V only (i2v-14B): the official models_clip_open-"
                                  "clip-xlm-roberta-large-vit-huge-14.pth or clip_vision_h.safetensors")
    g.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    g.add_argument("--dtype", choices=sorted(DTYPES), help="DiT dtype (default: bfloat16 on GPU, float32 on CPU)")
    m = parser.add_argument_group("memory (as in training)")
    m.add_argument("--fp8_base", action="store_true", help="DiT Linear weights in fp8 (ComfyUI fp8_scaled files as they are)")
    m.add_argument("--fp8_scaled", action="store_true", help="scaled fp8 (with --fp8_base)")
    m.add_argument("--fp8_t5", action="store_true",
                   help="umT5 block Linear weights in fp8 with per-channel scales (about 4.6 GB less for umT5-XXL)")
    m.add_argument("--blocks_to_swap", type=int, default=0, help="DiT blocks kept in host memory and streamed in (CUDA)")
    m.add_argument("--vae_cache_cpu", action="store_true",
                   help="keep the VAE's causal chunk cache in host memory (less VRAM, the same frames)")
    s = parser.add_argument_group("speed")
    s.add_argument("--attn_mode", default="sdpa", choices=sorted(ATTN_MODES),
                   help="attention kernel: sdpa (default), flash / flash2, flash3, xformers, sageattn (inference only); "
                        "musubi-tuner's names are accepted")
    s.add_argument("--split_attn", action="store_true", help="attention one sample at a time (less memory with CFG)")
    s.add_argument("--compile", action="store_true", help="torch.compile the DiT blocks (first steps are slower)")


def add_sampling_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("prompts and sampling (defaults: the variant's)")
    g.add_argument("--prompt", action="append", help="a prompt (Kohya options allowed); repeatable")
    g.add_argument("--from_file", help="prompt file: .txt (Kohya sample-prompt lines), .toml or .json")
    g.add_argument("--negative_prompt", help="default: the official WAN negative prompt")
    g.add_argument("--image", help="start image for I2V / TI2V (a line's --i wins)")
    g.add_argument("--width", type=int)
    g.add_argument("--height", type=int)
    g.add_argument("--frames", type=int, help="frame count, 1 + 4k (others are rounded with a warning)")
    g.add_argument("--steps", type=int)
    g.add_argument("--seed", type=int, help="default: a random seed, recorded in the sidecar")
    g.add_argument("--guidance_scale", type=float, help="CFG scale (both experts unless the next flag is set)")
    g.add_argument("--guidance_scale_high_noise", type=float, help="CFG scale of the A14B high-noise expert")
    g.add_argument("--flow_shift", type=float)
    g.add_argument("--sampler", choices=SAMPLERS, default="unipc")
    g.add_argument("--schedule", choices=CONVENTIONS, default="wan",
                   help="sigma list: the official WAN code's, or diffusers' (to reproduce diffusers outputs)")
    g.add_argument("--save_frames", action="store_true", help="also write every frame as PNG")


def build_requests(args) -> tuple[list[SampleRequest], list[PromptError]]:
    """Requests from --prompt / --from_file with the command line's values as defaults."""
    from .prompts import parse_prompt_line

    requests, errors = [], []
    if args.from_file:
        requests, errors = read_prompt_file(args.from_file)
    for i, text in enumerate(args.prompt or [], 1):
        try:
            requests.append(parse_prompt_line(text, f"--prompt {i}"))
        except PromptError as exc:
            errors.append(exc)
    defaults = dict(negative_prompt=args.negative_prompt, image=args.image, width=args.width, height=args.height,
                    frames=args.frames, steps=args.steps, seed=args.seed, guidance=args.guidance_scale,
                    guidance_high=args.guidance_scale_high_noise, flow_shift=args.flow_shift)
    return [r.with_defaults(**defaults) for r in requests], errors


def load_models(args) -> tuple[SamplingModels, dict]:
    """Load the DiT expert(s), the VAE, the text encoder (and the CLIP vision encoder of WAN 2.1 I2V) the
    arguments name; returns them and the file list for the sidecar."""
    from library.wan.loading import load_text_encoder, load_vae
    from library.wan.variants import get_variant

    variant = get_variant(args.task)
    device = torch.device(args.device)
    dtype = DTYPES[args.dtype] if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    clip = _load_clip(args, variant, device)  # first: a missing --clip fails before the large models load
    experts = {}
    if variant.two_experts:
        if args.dit_high_noise:
            experts["high_noise"] = _load_expert(args, args.dit_high_noise, device, dtype, variant.name)
        experts["low_noise"] = _load_expert(args, args.dit, device, dtype, variant.name)
    else:
        if args.dit_high_noise:
            raise ValueError(f"--dit_high_noise is only for the two-expert WAN 2.2 A14B models, not {variant.name}")
        experts["dit"] = _load_expert(args, args.dit, device, dtype, variant.name)
    vae = load_vae(args.vae, device=device, cache_cpu=getattr(args, "vae_cache_cpu", False))
    text_encoder = load_text_encoder(args.t5, args.tokenizer, device=device, fp8=getattr(args, "fp8_t5", False),
                                     dtype=torch.float32 if device.type == "cpu" else torch.bfloat16)
    files = {"task": variant.name, "dit": str(args.dit), "dit_high_noise": args.dit_high_noise, "vae": str(args.vae),
             "t5": str(args.t5), "dtype": str(dtype).replace("torch.", ""), "device": str(device)}
    if getattr(args, "fp8_t5", False):
        files["t5_fp8"] = True
    if clip is not None:
        files["clip"] = str(args.clip)
    return SamplingModels(variant, experts, vae, text_encoder, clip=clip), files


def _load_expert(args, path, device: torch.device, dtype, task: str):
    """One DiT with the memory features the flags ask for (the same code as training uses)."""
    from types import SimpleNamespace

    from library.runtime.memory import apply_memory_features, fp8_config
    from library.wan.loading import load_dit

    if getattr(args, "fp8_scaled", False) and not getattr(args, "fp8_base", False):
        raise ValueError("--fp8_scaled needs --fp8_base")
    memory = SimpleNamespace(fp8_base=getattr(args, "fp8_base", False), fp8_scaled=getattr(args, "fp8_scaled", False),
                             blocks_to_swap=getattr(args, "blocks_to_swap", 0), gradient_checkpointing=False,
                             gradient_checkpointing_cpu_offload=False, use_pinned_memory_for_block_swap=True)
    swap = memory.blocks_to_swap > 0 and device.type == "cuda"
    model = load_dit(path, "cpu" if swap else device, dtype, task, fp8=fp8_config(memory))
    if memory.fp8_base or memory.blocks_to_swap:
        apply_memory_features(model, memory, device)
    model.set_attention_backend(ATTN_MODES[getattr(args, "attn_mode", "sdpa")], getattr(args, "split_attn", False))
    if getattr(args, "compile", False):
        from library.config.schema import CompileArgs
        from library.runtime.compiling import compile_blocks

        compile_blocks(model, CompileArgs(compile=True))
    return model


def _load_clip(args, variant, device: torch.device):
    """The CLIP vision encoder for WAN 2.1 I2V (float16 on GPU as the official code runs it), else None."""
    from library.wan.loading import load_clip_vision

    path = getattr(args, "clip", None)
    if not variant.image_embedding:
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

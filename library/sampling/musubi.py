"""musubi-tuner's `wan_generate_video.py` command lines, read by `generate_video_wan.py` (and its musubi-named
twin `wan_generate_video.py`).

Flags with our own spelling are aliases on the same option (`--video_length` = `--frames`, `--infer_steps`
= `--steps`, `--save_path` = `--output_dir`, `--image_path` = `--image`, `--fp8` = `--fp8_base`,
`--sample_solver` = `--sampler` with `vanilla` = `euler`). The flags added here are turned into ours by
`normalise` once, before anything loads:
- `--video_size H W` (musubi's order: height, width) -> `--height`, `--width`;
- `--lora_weight A B --lora_multiplier 1.0 0.5` -> LoRAs on the `--dit` model (the low-noise expert of an
  A14B pair, or the only DiT); `--lora_weight_high_noise` / `--lora_multiplier_high_noise` -> LoRAs on
  `--dit_high_noise`; a missing multiplier is 1.0; `--include_patterns` / `--exclude_patterns`: the i-th
  regex filters the i-th LoRA of each list by `re.search` on its Kohya module names
  (`lora_unet_blocks_9_cross_attn_k`), include first, then exclude;
- `--ckpt_dir` (an official release folder) fills `--dit`, `--dit_high_noise`, `--vae`, `--t5`, `--clip`
  that are not given; `--task t2i-14B` (its own variant) renders 1-frame images; `--lazy_loading` is
  `--offload_inactive_dit`; `--compile_args` is the old spelling of the `--compile_*` flags;
  `--timestep_boundary` above 1 is read as 0-1000.
`UNSUPPORTED` flags are clear errors that say why; `NO_EFFECT` flags ask for what already happens and are
logged once.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from .guidance import CFG_SKIP_MODES, SLG_MODES

logger = logging.getLogger(__name__)

UNSUPPORTED = {
    "video_path": "--video_path (video-to-video) is not supported; generate from text or a start image",
    "control_image_mask_path": "--control_image_mask_path: WAN one-frame inference uses no masks (as musubi-tuner)",
}
NO_EFFECT = {
    "lycoris": "--lycoris: LyCORIS LoHa / LoKr files are recognised from their keys and applied like LoRAs",
    "cpu_noise": "--cpu_noise: the noise is always drawn on the CPU here (ComfyUI's noise for the seed)",
    "force_v2_1_time_embedding": "--force_v2_1_time_embedding: the A14B experts already use one timestep "
                                 "embedding per video (the WAN 2.1 form)",
    "disable_numpy_memmap": "--disable_numpy_memmap: the DiT is read from memory-mapped safetensors either way",
    "use_pinned_memory_for_block_swap": "--use_pinned_memory_for_block_swap: block swap always uses pinned "
                                        "host memory here",
}
# official release file names, for --ckpt_dir
CKPT_FILES = {"vae": ("Wan2.1_VAE.pth", "Wan2.2_VAE.pth"), "t5": ("models_t5_umt5-xxl-enc-bf16.pth",),
              "clip": ("models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth",)}


def sampler_name(text: str) -> str:
    """`--sampler` / `--sample_solver` value: musubi's `vanilla` is the Euler sampler."""
    return "euler" if text == "vanilla" else text


def add_musubi_args(parser: argparse.ArgumentParser) -> None:
    """The flags of musubi-tuner's wan_generate_video.py that have no alias among ours."""
    g = parser.add_argument_group("musubi-tuner's wan_generate_video.py flags")
    g.add_argument("--video_size", type=int, nargs=2, metavar=("HEIGHT", "WIDTH"), help="height and width")
    g.add_argument("--ckpt_dir", help="official release folder: fills --dit/--vae/--t5/--clip that are not given")
    g.add_argument("--lora_weight", nargs="*", default=None, help="LoRA files for the --dit model")
    g.add_argument("--lora_multiplier", type=float, nargs="*", default=None, help="one per --lora_weight")
    g.add_argument("--lora_weight_high_noise", nargs="*", default=None, help="LoRA files for --dit_high_noise")
    g.add_argument("--lora_multiplier_high_noise", type=float, nargs="*", default=None)
    g.add_argument("--include_patterns", nargs="*", default=None, help="regex per LoRA: modules to apply")
    g.add_argument("--exclude_patterns", nargs="*", default=None, help="regex per LoRA: modules to leave out")
    g.add_argument("--lazy_loading", action="store_true", help="as --offload_inactive_dit")
    g.add_argument("--compile_args", nargs=4, metavar=("BACKEND", "MODE", "DYNAMIC", "FULLGRAPH"),
                   help="old spelling of --compile_backend/--compile_mode/--compile_dynamic/--compile_fullgraph")
    c = parser.add_argument_group("CFG skip and skip-layer guidance (musubi-tuner's)")
    c.add_argument("--cfg_skip_mode", default="none", choices=CFG_SKIP_MODES, help="which steps skip CFG")
    c.add_argument("--cfg_apply_ratio", type=float, help="share of the steps that run CFG (0-1)")
    c.add_argument("--slg_layers", help="block indices to skip for skip-layer guidance, e.g. 4,5,6")
    c.add_argument("--slg_mode", choices=SLG_MODES, help="original (SD 3.5) or uncond (Wan2GP)")
    c.add_argument("--slg_scale", type=float, default=3.0)
    c.add_argument("--slg_start", type=float, default=0.0, help="first step, as a share of the steps")
    c.add_argument("--slg_end", type=float, default=0.3, help="end step, as a share of the steps")
    u = parser.add_argument_group("musubi-tuner flags that are accepted for its command lines")
    for name in NO_EFFECT:
        u.add_argument(f"--{name}", action="store_true", help=NO_EFFECT[name].split(": ", 1)[1])
    u.add_argument("--video_path", help="not supported (a clear error)")
    u.add_argument("--control_image_mask_path", nargs="*", help="not supported (a clear error)")


def _ckpt_dir(args, errors: list[str]) -> None:
    """Fill the model paths an official release folder holds (only those not given)."""
    folder = Path(args.ckpt_dir).expanduser()
    if not folder.is_dir():
        errors.append(f"--ckpt_dir {folder} is not a folder")
        return
    if args.dit is None:
        low, high = folder / "low_noise_model", folder / "high_noise_model"
        args.dit = str(low if low.is_dir() else folder)
        if args.dit_high_noise is None and high.is_dir():
            args.dit_high_noise = str(high)
    for name, candidates in CKPT_FILES.items():
        if getattr(args, name, None) is None:
            found = next((folder / c for c in candidates if (folder / c).is_file()), None)
            setattr(args, name, str(found) if found else None)


def _size(args, errors: list[str]) -> None:
    if args.video_size is None:
        return
    height, width = args.video_size
    for name, value in (("height", height), ("width", width)):
        own = getattr(args, name)
        if own is not None and own != value:
            errors.append(f"--video_size says {name} {value} but --{name} says {own}; give one of them")
        setattr(args, name, value)


def _compile(args, errors: list[str]) -> None:
    if args.compile_args is None:
        return
    backend, mode, dynamic, fullgraph = args.compile_args
    args.compile_backend, args.compile_mode = backend, mode
    args.compile_dynamic, args.compile_fullgraph = dynamic.lower(), fullgraph.lower() == "true"
    if args.compile_dynamic not in ("true", "false", "auto"):
        errors.append(f"--compile_args DYNAMIC must be true, false or auto, got {dynamic!r}")


def normalise(args) -> list[str]:
    """Turn musubi's flags on a parsed generate command line into ours, in place (once). Returns the
    problems (unsupported flags, conflicts); the caller reports them and exits with 2."""
    if getattr(args, "_normalised", False):
        return []
    args._normalised = True
    errors = [why for name, why in UNSUPPORTED.items() if getattr(args, name, None)]
    task = str(getattr(args, "task", "") or "").lower()
    fun_control = task.endswith("-fc")  # Fun-Control: a reference image for `ref_conv` (V1.1 / WAN 2.2 models)
    vace_inputs = [f"--{n}" for n in ("mask_path", "ref_image_path") if getattr(args, n, None)
                   and not (fun_control and n == "ref_image_path")]
    if vace_inputs and "vace" not in task:
        errors.append(f"{' / '.join(vace_inputs)}: masks and reference images are for the VACE models (--task "
                      f"vace-1.3B, vace-14B, vace-A14B; reference images also for the Fun-Control models with "
                      f"ref_conv, --task *-FC); {args.task} takes none")
    if getattr(args, "control_path", None) and "vace" not in task and not task.endswith("-fc"):
        errors.append(f"--control_path: control videos are for the Fun-Control models (--task t2v-1.3B-FC, "
                      f"t2v-14B-FC, i2v-14B-FC, t2v-A14B-FC, i2v-A14B-FC) and the VACE models (vace-1.3B, vace-14B, "
                      f"vace-A14B); {args.task} takes none")
    for name, note in NO_EFFECT.items():
        if getattr(args, name, False):
            logger.info("%s", note)
    if getattr(args, "lazy_loading", False):
        logger.info("--lazy_loading: the inactive A14B expert waits in host memory (--offload_inactive_dit)")
        args.offload_inactive_dit = True
    if getattr(args, "ckpt_dir", None):
        _ckpt_dir(args, errors)
    if hasattr(args, "video_size"):
        _size(args, errors)
    if hasattr(args, "compile_args"):
        _compile(args, errors)
    boundary = getattr(args, "timestep_boundary", None)
    if boundary is not None and 1.0 < boundary <= 1000.0:
        args.timestep_boundary = boundary / 1000.0
    return errors


def _patterns(args, name: str, index: int) -> str | None:
    patterns = getattr(args, name, None) or []
    return patterns[index] if index < len(patterns) else None


def lora_specs(args, two_experts: bool) -> list:
    """Every LoRA of the command line as a `LoraSpec`: `--lora FILE[:STRENGTH]` (experts from the file
    names), `--lora_weight` (the `--dit` model) and `--lora_weight_high_noise` (the high-noise expert),
    each with its multiplier and the include / exclude pattern of its position."""
    from .loras import LoraError, LoraSpec, parse_lora_spec

    groups = [([parse_lora_spec(text) for text in getattr(args, "lora", None) or []], None)]
    own = "low_noise" if two_experts else "dit"
    for files, multipliers, expert in (
            ("lora_weight", "lora_multiplier", own),
            ("lora_weight_high_noise", "lora_multiplier_high_noise", "high_noise")):
        files, multipliers = getattr(args, files, None) or [], getattr(args, multipliers, None) or []
        if len(multipliers) > len(files):
            raise LoraError(f"{len(multipliers)} LoRA multipliers for {len(files)} LoRA files: give one multiplier per "
                            "file (a missing one is 1.0)")
        if files and expert == "high_noise" and not two_experts:
            raise LoraError(f"--lora_weight_high_noise is for the WAN 2.2 A14B high-noise expert; --task {args.task} "
                            "has one DiT: use --lora_weight")
        groups.append(([LoraSpec(Path(f).expanduser(), multipliers[i] if i < len(multipliers) else 1.0)
                        for i, f in enumerate(files)], expert))
    specs = []
    for group, expert in groups:
        for i, spec in enumerate(group):
            specs.append(LoraSpec(spec.path, spec.strength, expert, _patterns(args, "include_patterns", i),
                                  _patterns(args, "exclude_patterns", i)))
    return specs

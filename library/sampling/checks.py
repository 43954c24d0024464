"""Checks of a generate command line before anything loads: every number within its rule (`values.py`),
the sizes on the variant's grid, the LoRA strengths finite, the guidance options consistent, the models a
run needs named. `check_arguments` returns the problems; the command reports them all and exits with 2.
"""

from __future__ import annotations

import logging
import re

from library.errors import UserError

from . import values as v

logger = logging.getLogger(__name__)


class ArgumentsError(UserError, ValueError):
    """A generate command line that cannot run; the message lists every problem."""


def _check(problems: list[str], flag: str, parse, value) -> object:
    if value is None:
        return None
    try:
        return parse(value)
    except ValueError as exc:
        problems.append(f"{flag} {exc}")
        return None


def _models(args, problems: list[str]) -> None:
    decode_only = bool(getattr(args, "latent_path", None))
    needed = ["vae"] if decode_only else ["dit", "vae", "t5"]
    if getattr(args, "save_merged_model", None):
        needed = ["dit"]
    for name in needed:
        if not getattr(args, name, None):
            problems.append(f"--{name} is required" + (" (or --ckpt_dir, an official release folder)"
                                                       if name != "dit" or not decode_only else ""))


def _numbers(args, variant, problems: list[str]) -> None:
    multiple = variant.vae_stride[1] * variant.patch_size[1]
    for name in ("width", "height"):
        size = _check(problems, f"--{name}", v.parse_size, getattr(args, name, None))
        problem = size and v.check_multiple(size, multiple, f"--{name}", variant.name)
        if problem:
            problems.append(problem)
    _check(problems, "--frames (--video_length)", v.parse_frames, getattr(args, "frames", None))
    _check(problems, "--steps (--infer_steps)", v.parse_steps, getattr(args, "steps", None))
    _check(problems, "--seed", v.parse_seed, getattr(args, "seed", None))
    for name in ("guidance_scale", "guidance_scale_high_noise"):
        _check(problems, f"--{name}", v.parse_scale, getattr(args, name, None))
    for name in ("flow_shift", "fps"):
        _check(problems, f"--{name}", v.parse_positive, getattr(args, name, None))
    boundary = _check(problems, "--timestep_boundary", v.as_float, getattr(args, "timestep_boundary", None))
    if boundary is not None and not 0.0 <= boundary <= 1.0:
        problems.append(f"--timestep_boundary must be between 0 and 1 (or 0 and 1000), got {boundary:g}")
    swap = getattr(args, "blocks_to_swap", 0) or 0
    if not 0 <= swap < variant.num_layers:
        problems.append(f"--blocks_to_swap must be between 0 and {variant.num_layers - 1} ({variant.name} has "
                        f"{variant.num_layers} blocks), got {swap}")
    for name in ("trim_tail_frames", "compile_cache_size_limit"):
        value = getattr(args, name, None)
        if value is not None and value < 0:
            problems.append(f"--{name} must be 0 or more, got {value}")


def _guidance(args, variant, problems: list[str]) -> None:
    ratio = _check(problems, "--cfg_apply_ratio", v.parse_ratio, getattr(args, "cfg_apply_ratio", None))
    mode = getattr(args, "cfg_skip_mode", "none")
    if (ratio is None) != (mode == "none"):  # musubi-tuner runs CFG on every step then; so do we, and say so
        logger.warning("--cfg_skip_mode and --cfg_apply_ratio work together; with only one of them CFG runs on "
                       "every step")
    if bool(getattr(args, "slg_mode", None)) != bool(getattr(args, "slg_layers", None)):
        logger.warning("--slg_mode and --slg_layers work together; with only one of them there is no "
                       "skip-layer guidance")
    _check(problems, "--slg_scale", v.parse_scale, getattr(args, "slg_scale", None))
    start = _check(problems, "--slg_start", v.parse_ratio, getattr(args, "slg_start", None))
    end = _check(problems, "--slg_end", v.parse_ratio, getattr(args, "slg_end", None))
    if start is not None and end is not None and start > end:
        problems.append(f"--slg_start {start:g} is after --slg_end {end:g}")
    layers = getattr(args, "slg_layers", None)
    if layers:
        try:
            indices = [int(x) for x in str(layers).split(",") if x.strip()]
        except ValueError:
            problems.append(f"--slg_layers must be block indices separated by commas (e.g. 4,5,6), got {layers!r}")
            return
        if not indices or any(not 0 <= i < variant.num_layers for i in indices):
            problems.append(f"--slg_layers {layers}: {variant.name} has blocks 0 to {variant.num_layers - 1}")


def _loras(args, problems: list[str]) -> None:
    for flag in ("lora_multiplier", "lora_multiplier_high_noise"):
        for value in getattr(args, flag, None) or []:
            _check(problems, f"--{flag}", v.parse_scale, value)
    for text in getattr(args, "lora", None) or []:
        head, sep, tail = text.rpartition(":")
        if sep and head and not re.fullmatch(r"[A-Za-z]", head) and re.fullmatch(r"[-+.\w]+", tail):
            _check(problems, f"--lora {text}: the strength", v.parse_scale, tail)
    for flag in ("include_patterns", "exclude_patterns"):
        for pattern in getattr(args, flag, None) or []:
            try:
                re.compile(pattern)
            except re.error as exc:
                problems.append(f"--{flag}: {pattern!r} is not a valid regex ({exc})")


def check_arguments(args, variant) -> list[str]:
    """Every problem of a (normalised) generate command line for `variant`, before any model loads."""
    problems: list[str] = []
    _models(args, problems)
    _numbers(args, variant, problems)
    _guidance(args, variant, problems)
    _loras(args, problems)
    return problems


def slg_layers(text: str | None) -> tuple[int, ...]:
    """`4,5,6` -> (4, 5, 6) (checked by `check_arguments`)."""
    return tuple(int(x) for x in str(text).split(",") if x.strip()) if text else ()

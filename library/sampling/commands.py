"""The bodies of `generate_video_wan.py` (and its musubi-named twin `wan_generate_video.py`) and
`tools/compare_checkpoints.py` (the entry scripts only parse).

A generate command line may be ours or musubi-tuner's (`musubi.py` turns its flags into ours); it is
checked as a whole before anything loads (`checks.py`). Then one of:
- `--latent_path FILE ...`: decode saved latents with the VAE alone (`--output_type video` or `images`);
- `--interactive`: prompts read from standard input, one per line, rendered as they come;
- otherwise every `--prompt` / `--from_file` prompt, or one grid for `--lora_strength_sweep` / `--compare_base`.
(`--save_merged_model` is `library.lora_tools.generation`, called by the entry script.)

Exit codes: 0 every prompt rendered; 1 some prompts failed (named in the log and the sidecars), the others
rendered; 2 nothing could run (a bad argument, a model or LoRA file that cannot be used).
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from .checks import ArgumentsError, check_arguments, slg_layers
from .cli import add_model_args, add_sampling_args, build_requests, encode_and_free, load_models, report_errors
from .evaluation import render_grid, strength_columns
from .generate import encode_requests, generate
from .guidance import GuidanceOptions
from .loras import attach_loras, check_lora_file
from .musubi import add_musubi_args, lora_specs, normalise
from .outputs import DECODED, OUTPUT_TYPES, save_outputs
from .prompts import PromptError, check_requests, parse_prompt_line
from .values import parse_scale

logger = logging.getLogger(__name__)


def generate_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="WAN text/image-to-video generation with LoRAs and strength sweeps; musubi-tuner's "
                    "wan_generate_video.py command lines are accepted")
    add_model_args(parser)
    add_sampling_args(parser)
    g = parser.add_argument_group("LoRA and evaluation")
    g.add_argument("--lora", action="append", default=[], metavar="FILE[:STRENGTH]",
                   help="LoRA file (repeat to stack); `NAME_high_noise` / `NAME_low_noise` pairs go to their experts")
    g.add_argument("--lora_strength_sweep", help="comma list, e.g. 0.5,0.7,0.9,1.0: one grid, a column per strength")
    g.add_argument("--compare_base", action="store_true", help="add the model without LoRA as the first column")
    g.add_argument("--save_merged_model", help="merge the LoRAs into the DiT, write it here and render nothing "
                   "(A14B with --dit_high_noise: NAME_high_noise / NAME_low_noise files)")
    o = parser.add_argument_group("output")
    o.add_argument("--output_dir", "--save_path", default="outputs", help="folder for everything written")
    o.add_argument("--output_name", help="file-name prefix (default: the start time)")
    o.add_argument("--output_type", default="video", choices=OUTPUT_TYPES,
                   help="video, images (PNG frames), latent (no decode), both (latent + video), latent_images")
    o.add_argument("--latent_path", nargs="*", help="decode these latent files (no DiT, no text encoder)")
    o.add_argument("--trim_tail_frames", type=int, default=0, help="drop this many frames from the end")
    o.add_argument("--no_metadata", action="store_true", help="no JSON sidecar, no latent metadata")
    o.add_argument("--interactive", action="store_true", help="read prompts from standard input, one per line")
    add_musubi_args(parser)
    return parser


def check_command(args):
    """musubi flags turned into ours and every argument checked; returns the variant. A ValueError lists
    every problem at once."""
    from library.wan.variants import get_variant

    if getattr(args, "_variant", None) is not None:
        return args._variant
    problems = normalise(args)
    try:
        variant = get_variant(args.task)
    except ValueError as exc:
        raise ArgumentsError("; ".join([*problems, str(exc)])) from None
    problems += check_arguments(args, variant)
    if getattr(args, "latent_path", None) and getattr(args, "output_type", "video") not in ("video", "images"):
        problems.append("--latent_path decodes latents: use --output_type video or images")
    if getattr(args, "interactive", False) and (args.prompt or args.from_file):
        problems.append("--interactive reads the prompts from standard input: drop --prompt / --from_file")
    if problems:
        raise ArgumentsError("invalid arguments:\n  " + "\n  ".join(problems))
    args._variant = variant
    return variant


def _strengths(text: str | None) -> list[float]:
    if not text:
        return []
    try:
        return [parse_scale(v) for v in text.split(",") if v.strip()]
    except ValueError as exc:
        raise ValueError(f"--lora_strength_sweep must be finite numbers separated by commas ({exc}), "
                         f"got {text!r}") from None


def prepare(args):
    """Requests (with parse errors) and models, prompts encoded and the text encoder freed (kept with
    --interactive)."""
    check_command(args)
    requests, errors = build_requests(args)
    report_errors(errors)
    interactive = getattr(args, "interactive", False)
    if not requests and not interactive:
        raise PromptError("no prompt to render: pass --prompt or --from_file" +
                          (f" ({len(errors)} prompts could not be read)" if errors else ""))
    models, files = load_models(args)
    return (requests if interactive else encode_and_free(models, requests)), errors, models, files


@dataclass
class Writer:
    """How each rendered sample is written (the output flags) and named."""

    args: argparse.Namespace
    extra: dict
    name: str

    def __post_init__(self):
        a = self.args
        self.out = Path(a.output_dir)
        self.guidance = GuidanceOptions(a.cfg_skip_mode, a.cfg_apply_ratio, a.slg_mode, slg_layers(a.slg_layers),
                                        a.slg_scale, a.slg_start, a.slg_end)

    def render(self, models, request, index: int) -> bool:
        a = self.args
        try:
            sample = generate(models, request, sampler=a.sampler, schedule=a.schedule, guidance=self.guidance,
                              fps=a.fps, decode=a.output_type in DECODED)
            stem = f"{self.name}_{index:02d}_seed{sample.settings['seed']}"
            paths = save_outputs(sample, self.out, stem, a.output_type, save_frames=a.save_frames,
                                 trim=a.trim_tail_frames, metadata=not a.no_metadata, extra=self.extra, fps=a.fps)
        except (ValueError, OSError) as exc:
            logger.error("%s", exc)
            return False
        logger.info("wrote %s", ", ".join(str(p) for k, p in paths.items() if k != "sidecar"))
        return True


def _interactive(models, writer: Writer) -> int:
    """Prompts from standard input (the prompt-line syntax), each rendered when its line arrives."""
    failed, index = 0, 0
    logger.info("interactive: one prompt per line (sample-prompt options allowed); end with Ctrl-D")
    for number, line in enumerate(sys.stdin, 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        try:
            request = parse_prompt_line(line, f"stdin line {number}").with_defaults(**_defaults(writer.args))
            good, bad = check_requests([request], models.variant, "stdin")
            if bad:
                raise bad[0]
            (request,) = encode_requests(models.text_encoder, good, models.variant)
        except PromptError as exc:
            logger.error("%s", exc)
            failed += 1
            continue
        failed += not writer.render(models, request, index)
        index += 1
    return 1 if failed else 0


def _defaults(args) -> dict:
    return dict(negative_prompt=args.negative_prompt, image=args.image, end_image=getattr(args, "end_image", None),
                one_frame=getattr(args, "one_frame_inference", None),
                control_images=tuple(getattr(args, "control_image_path", None) or ()) or None,
                width=args.width, height=args.height,
                frames=args.frames, steps=args.steps, seed=args.seed, guidance=args.guidance_scale,
                guidance_high=args.guidance_scale_high_noise, flow_shift=args.flow_shift, control=args.control_path,
                mask=args.mask_path, references=args.ref_image_path, vace_scale=args.vace_scale)


def run_generate(args) -> int:
    try:
        variant = check_command(args)
        if args.latent_path:
            from .decode import decode_latent_files

            return decode_latent_files(args, variant)
        strengths = _strengths(args.lora_strength_sweep)
        specs = lora_specs(args, variant.two_experts)
        if (strengths or args.compare_base) and not specs:
            raise ValueError("--lora_strength_sweep / --compare_base need at least one --lora")
        for spec in specs:  # fail before the models load
            check_lora_file(spec.path)
        requests, errors, models, files = prepare(args)
        loaded = attach_loras(specs, models.experts, models.variant)
        models.networks = [lo.network for lo in loaded]
    except (ValueError, OSError) as exc:  # LoraError, PromptError, CheckpointError, missing files
        logger.error("%s", exc)
        return 2
    name = args.output_name or time.strftime("%Y%m%d-%H%M%S")
    extra = {"models": files, "command": {k: v for k, v in vars(args).items() if not k.startswith("_")},
             "loras": [{"file": str(lo.spec.path), "strength": lo.spec.strength, "expert": lo.expert,
                        "report": lo.report.summary()} for lo in loaded]}
    writer = Writer(args, extra, name)
    if writer.guidance.skips_cfg or writer.guidance.uses_slg:
        logger.info("guidance per step (A: CFG, S: CFG skipped, L: CFG + skip-layer guidance): %s",
                    writer.guidance.pattern(requests[0].steps or variant.sample_steps) if requests else "")
    if args.interactive:
        return _interactive(models, writer)
    if strengths or args.compare_base:
        columns = strength_columns(loaded, strengths or [1.0], args.compare_base)
        sidecar = render_grid(models, requests, columns, writer.out, f"{name}_sweep", sampler=args.sampler,
                              schedule=args.schedule, extra={**extra, "prompt_errors": [str(e) for e in errors]},
                              guidance=writer.guidance, fps=args.fps)
        logger.info("wrote %s", writer.out / f"{name}_sweep.mp4")
        return 1 if errors or sidecar["errors"] else 0
    failed = len(errors) + sum(not writer.render(models, request, i) for i, request in enumerate(requests))
    return 1 if failed else 0

"""The bodies of `generate_video_wan.py` and `tools/compare_checkpoints.py` (the entry scripts only parse).

Exit codes: 0 every prompt rendered; 1 some prompts failed (named in the log and the sidecars), the others
rendered; 2 nothing could run (a bad argument, a model or LoRA file that cannot be used).
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

from .cli import add_model_args, add_sampling_args, build_requests, encode_and_free, load_models, report_errors
from .evaluation import render_grid, strength_columns
from .generate import generate
from .loras import attach_loras, check_lora_file, parse_lora_spec
from .prompts import PromptError
from .save import save_sample

logger = logging.getLogger(__name__)


def generate_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="WAN text/image-to-video generation with LoRAs and strength sweeps")
    add_model_args(parser)
    add_sampling_args(parser)
    g = parser.add_argument_group("LoRA and evaluation")
    g.add_argument("--lora", action="append", default=[], metavar="FILE[:STRENGTH]",
                   help="LoRA file (repeat to stack); `NAME_high_noise` / `NAME_low_noise` pairs go to their experts")
    g.add_argument("--lora_strength_sweep", help="comma list, e.g. 0.5,0.7,0.9,1.0: one grid, a column per strength")
    g.add_argument("--compare_base", action="store_true", help="add the model without LoRA as the first column")
    g.add_argument("--output_dir", default="outputs")
    g.add_argument("--output_name", help="file-name prefix (default: the start time)")
    return parser


def _strengths(text: str | None) -> list[float]:
    if not text:
        return []
    try:
        return [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ValueError(f"--lora_strength_sweep must be numbers separated by commas, got {text!r}") from None


def prepare(args):
    """Requests (with parse errors) and models, prompts encoded and the text encoder freed."""
    requests, errors = build_requests(args)
    report_errors(errors)
    if not requests:
        raise PromptError("no prompt to render: pass --prompt or --from_file" +
                          (f" ({len(errors)} lines could not be read)" if errors else ""))
    models, files = load_models(args)
    return encode_and_free(models, requests), errors, models, files


def run_generate(args) -> int:
    try:
        strengths = _strengths(args.lora_strength_sweep)
        if (strengths or args.compare_base) and not args.lora:
            raise ValueError("--lora_strength_sweep / --compare_base need at least one --lora")
        specs = [parse_lora_spec(text) for text in args.lora]
        for spec in specs:  # fail before the models load
            check_lora_file(spec.path)
        requests, errors, models, files = prepare(args)
        loaded = attach_loras(specs, models.experts, models.variant)
        models.networks = [lo.network for lo in loaded]
    except (ValueError, OSError) as exc:  # LoraError, PromptError, CheckpointError, missing files
        logger.error("%s", exc)
        return 2
    out, name = Path(args.output_dir), args.output_name or time.strftime("%Y%m%d-%H%M%S")
    extra = {"models": files, "command": vars(args),
             "loras": [{"file": str(lo.spec.path), "strength": lo.spec.strength, "expert": lo.expert,
                        "report": lo.report.summary()} for lo in loaded]}
    failed = len(errors)
    if strengths or args.compare_base:
        columns = strength_columns(loaded, strengths or [1.0], args.compare_base)
        sidecar = render_grid(models, requests, columns, out, f"{name}_sweep", sampler=args.sampler,
                              schedule=args.schedule, extra={**extra, "prompt_errors": [str(e) for e in errors]})
        failed += len(sidecar["errors"])
        logger.info("wrote %s", out / f"{name}_sweep.mp4")
        return 1 if failed else 0
    for index, request in enumerate(requests):
        try:
            sample = generate(models, request, sampler=args.sampler, schedule=args.schedule)
        except (ValueError, OSError) as exc:
            logger.error("%s", exc)
            failed += 1
            continue
        stem = f"{name}_{index:02d}_seed{sample.settings['seed']}"
        paths = save_sample(sample, out, stem, save_frames=args.save_frames, extra=extra)
        logger.info("wrote %s", paths["video"])
    return 1 if failed else 0

"""Every saved checkpoint of a run rendered with the same prompts and seeds, in one grid labelled by step:
LoRA files replace each other column by column; a whole-DiT checkpoint (full fine-tuning) replaces the
expert's weights instead, loaded like the base. Beside the grid's MP4 / PNG / JSON, STEM.html shows it as
a page in report.html's style, a video per cell."""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

from safetensors import safe_open

from library.sampling.cli import add_model_args, add_sampling_args
from library.sampling.commands import prepare
from library.sampling.evaluation import Column, render_grid
from library.sampling.generate import SamplingModels
from library.sampling.loras import LoadedLora, LoraError, LoraSpec, attach_loras, detach_loras, expert_of_name
from library.training.checkpoints import Checkpoint, find_checkpoints
from library.wan.dit_formats import describe_checkpoint
from library.wan.loading import load_dit

logger = logging.getLogger(__name__)


def is_whole_dit(path: Path) -> bool:
    """A checkpoint that is a whole DiT (a full fine-tune) rather than a LoRA: judged by its tensor names."""
    try:
        with safe_open(str(path), framework="pt") as fh:
            keys = list(fh.keys())
    except Exception:  # noqa: BLE001 - an unreadable file is reported when its column is set up
        return False
    return describe_checkpoint(keys) == "a WAN DiT"


def checkpoint_columns(models: SamplingModels, checkpoints: list[Checkpoint], strength: float = 1.0,
                       include_base: bool = False, base_files: dict[str, Path] | None = None) -> list[Column]:
    """One column per checkpoint: its LoRA file(s) replace the previous column's; a whole-DiT checkpoint
    (full fine-tuning) replaces the expert's weights instead, loaded like the base (`base_files` lets the
    base column come back after one)."""
    current: list[LoadedLora] = []
    swapped: set[str] = set()

    def load_expert(expert: str, path: Path) -> None:
        old = models.experts[expert]
        where = old.patch_embedding.weight  # never fp8: the device and dtype the expert runs in
        models.experts[expert] = None  # let the old weights go before the new ones load
        del old
        models.experts[expert] = load_dit(path, device=where.device, dtype=where.dtype, task=models.variant.name)

    def use(ckpt: Checkpoint | None):
        def setup():
            detach_loras(current)
            current.clear()
            if ckpt is None:
                for expert in sorted(swapped):
                    if not base_files or expert not in base_files:
                        raise ValueError("the base column after a whole-DiT checkpoint needs the base files")
                    load_expert(expert, base_files[expert])
                swapped.clear()
                return {"checkpoint": None}
            dits = [p for p in ckpt.files if is_whole_dit(p)]
            for path in dits:
                expert = expert_of_name(path) or ("dit" if "dit" in models.experts else "low_noise")
                load_expert(expert, path)
                swapped.add(expert)
            loras = [p for p in ckpt.files if p not in dits]
            if loras:
                current.extend(attach_loras([LoraSpec(p, strength) for p in loras], models.experts, models.variant))
            models.networks[:] = [lo.network for lo in current]
            return {"checkpoint": [str(p) for p in ckpt.files], "step": ckpt.step, "epoch": ckpt.epoch,
                    "experts": sorted({expert_of_name(p) or "all" for p in ckpt.files}),
                    "kind": "whole DiT" if dits else "LoRA"}
        return setup

    columns = [Column("base", use(None))] if include_base else []
    return columns + [Column(c.label, use(c)) for c in checkpoints]


def compare_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Render every saved checkpoint of a run (LoRA files, or whole "
                                                 "DiTs of a full fine-tune) with the same prompts and seeds into one "
                                                 "grid labelled by step")
    parser.add_argument("run_dir", help="the training OUTPUT_DIR holding the .safetensors checkpoints")
    add_model_args(parser)
    add_sampling_args(parser)
    parser.add_argument("--output_name", help="only checkpoints of this output_name")
    parser.add_argument("--strength", type=float, default=1.0)
    parser.add_argument("--include_base", action="store_true", help="add the model without LoRA as a column")
    parser.add_argument("--output_dir", help="default: RUN_DIR/compare")
    return parser


def run_compare(args) -> int:
    checkpoints = find_checkpoints(args.run_dir, args.output_name)
    if not checkpoints:
        logger.error("%s: no checkpoints (NAME.safetensors, NAME-000001.safetensors, "
                     "NAME-step00000100.safetensors, with _high_noise / _low_noise pairs)", args.run_dir)
        return 2
    try:
        requests, errors, models, files = prepare(args)
    except (ValueError, OSError) as exc:
        logger.error("%s", exc)
        return 2
    logger.info("comparing %d checkpoints: %s", len(checkpoints), ", ".join(c.label for c in checkpoints))
    two = models.variant.two_experts
    base = {"high_noise": args.dit_high_noise, "low_noise": args.dit} if two else {"dit": args.dit}
    columns = checkpoint_columns(models, checkpoints, args.strength, args.include_base,
                                 {k: Path(v) for k, v in base.items() if v})
    out = Path(args.output_dir) if args.output_dir else Path(args.run_dir) / "compare"
    stem = f"checkpoints_{time.strftime('%Y%m%d-%H%M%S')}"
    try:
        sidecar = render_grid(models, requests, columns, out, stem, sampler=args.sampler, schedule=args.schedule,
                              extra={"models": files, "run_dir": str(args.run_dir), "command": vars(args),
                                     "prompt_errors": [str(e) for e in errors]})
    except LoraError as exc:
        logger.error("%s", exc)
        return 2
    finally:
        for network in models.networks:
            network.remove()
    from .grid_page import write_grid_page

    page = write_grid_page(out / f"{stem}.json", f"checkpoints of {Path(args.run_dir).name}")
    logger.info("wrote %s and %s", out / f"{stem}.mp4", page)
    return 1 if errors or sidecar["errors"] else 0

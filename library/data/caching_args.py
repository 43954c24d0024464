"""Command-line pieces shared by the two caching tools: the musubi-compatible flags, the process split
under `accelerate launch`, and running a caching function with a summary and an exit status.

Every flag of musubi-tuner's `wan_cache_latents.py` / `wan_cache_text_encoder_outputs.py` (and the
HunyuanVideo VAE flags musubi-tuner-gui passes to them: `--vae_tiling`, `--vae_chunk_size`,
`--vae_spatial_tile_sample_min_size`) is accepted, and `musubi_flag_problems` says what each one does
here: used, skipped with a log line, or an error when it asks for something this tool cannot do. Sources:
kohya-ss/musubi-tuner 30c658c4 `cache_latents.py` / `cache_text_encoder_outputs.py` (setup_parser_common,
hv_setup_parser) and `wan_cache_latents.py`; bmaltais/musubi-tuner-gui 1b5a41ed `lora_gui.py` (train_model).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

import torch

from library.errors import EXIT_USER_ERROR, UserError, non_negative_int, positive_int, user_message
from library.wan.vae_tiling import DEFAULT_TILE

logger = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


def device_name(text: str) -> str:
    """An argparse type: a torch device this machine has ('cuda' without CUDA is a usage error)."""
    try:
        device = torch.device(text)
    except (RuntimeError, ValueError):
        raise argparse.ArgumentTypeError(f"{text!r} is not a device; use cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise argparse.ArgumentTypeError(f"{text!r}: this machine has no CUDA device that torch can use; "
                                         "use --device cpu")
    if device.type not in ("cpu", "cuda"):
        raise argparse.ArgumentTypeError(f"{text!r}: the caching tools run on cpu or cuda")
    return text


def common_parser(description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--dataset_config", required=True, help="dataset TOML (musubi-tuner schema)")
    parser.add_argument("--device", type=device_name, default=None,
                        help="cuda, cuda:1 or cpu (default: the process's accelerator, else cpu)")
    parser.add_argument("--batch_size", type=positive_int, default=None,
                        help="items (or captions) encoded together")
    parser.add_argument("--num_workers", type=non_negative_int, default=None,
                        help="threads decoding media ahead of the VAE (default 2)")
    parser.add_argument("--skip_existing", action="store_true",
                        help="accepted for musubi compatibility: fresh caches are always reused, stale ones rebuilt")
    parser.add_argument("--keep_cache", action="store_true",
                        help="accepted for musubi compatibility: this tool never deletes cache files (musubi-tuner "
                             "deletes those of items no longer in the dataset unless --keep_cache)")
    parser.add_argument("--debug_mode", default=None, choices=("image", "console", "video"),
                        help="musubi-tuner's dataset viewer instead of caching: not built in, an error that points "
                             "to tools/check_dataset.py")
    for flag in ("console_width", "console_back", "console_num_images"):
        parser.add_argument(f"--{flag}", default=None, help="a --debug_mode display setting: no effect here (logged)")
    parser.add_argument("--disable_cudnn_backend", action="store_true",
                        help="turn PyTorch's cuDNN backend off (can help on AMD GPUs)")
    parser.add_argument("--strict", action="store_true", help="fail on the first skipped file instead of reporting it")
    parser.add_argument("--task", default=None,
                        help="WAN task (t2v-A14B, i2v-A14B, ti2v-5B, ...): target fps and VAE checks")
    parser.add_argument("--no_progress", action="store_true", help="no tqdm progress bar")
    return parser


def add_vae_flags(parser: argparse.ArgumentParser) -> None:
    """The latent tool's VAE memory flags (musubi-tuner-gui passes them from its HunyuanVideo widgets)."""
    parser.add_argument("--vae_tiling", action="store_true",
                        help=f"encode frames larger than a tile ({DEFAULT_TILE} px unless "
                             "--vae_spatial_tile_sample_min_size) in overlapping tiles blended at the seams: less "
                             "memory, latents within a small tolerance of untiled ones")
    parser.add_argument("--vae_spatial_tile_sample_min_size", type=int, default=None,
                        help="VAE tile side in pixels; turns --vae_tiling on")
    parser.add_argument("--vae_chunk_size", type=int, default=None,
                        help="no effect here (logged): the WAN VAE already runs one time chunk at a time")
    parser.add_argument("--one_frame", action="store_true",
                        help="musubi-tuner's one-frame caching; datasets with fp_1f_* keys always cache that way")


def vae_tile_size(args: argparse.Namespace) -> int | None:
    """The tile side in pixels, as musubi-tuner reads its two flags; None: no tiling."""
    size = getattr(args, "vae_spatial_tile_sample_min_size", None)
    return size if size else (DEFAULT_TILE if getattr(args, "vae_tiling", False) else None)


def musubi_flag_problems(args: argparse.Namespace) -> str | None:
    """Say what each musubi-tuner flag given does here (logged once); the error message, when one asks for
    what this tool cannot do."""
    if args.debug_mode:
        return (f"--debug_mode {args.debug_mode}: musubi-tuner shows the dataset instead of caching it; this tool "
                "has no viewer: run `python tools/check_dataset.py --dataset_config ...` to list every item, bucket "
                "and problem, then cache without --debug_mode")
    if getattr(args, "one_frame", False):
        logger.info("--one_frame: datasets with fp_1f_* keys are cached for one-frame training (they always are)")
    size = getattr(args, "vae_spatial_tile_sample_min_size", None)
    if size is not None and size <= 0:
        return f"--vae_spatial_tile_sample_min_size {size}: give a tile side in pixels (e.g. 256)"
    if args.skip_existing:
        logger.info("--skip_existing: fresh caches are always reused here, stale ones rebuilt")
    if args.keep_cache:
        logger.info("--keep_cache: this tool never deletes cache files")
    shown = [f"--{f}" for f in ("console_width", "console_back", "console_num_images") if getattr(args, f) is not None]
    if shown:
        logger.info("skipping %s: display settings of musubi-tuner's --debug_mode, which is not given",
                    ", ".join(shown))
    if getattr(args, "vae_chunk_size", None):
        logger.info("skipping --vae_chunk_size %s: the WAN VAE already runs its causal convolutions one chunk at a "
                    "time (4 frames encoding, 1 latent frame decoding)", args.vae_chunk_size)
    if vae_tile_size(args):
        logger.info("VAE tiling: frames larger than %d px are encoded tile by tile", vae_tile_size(args))
    if args.disable_cudnn_backend:
        torch.backends.cudnn.enabled = False
        logger.info("--disable_cudnn_backend: cuDNN is off")
    return None


def process_split(device: str | None) -> tuple[int, int, str]:
    """(rank, world_size, device): from accelerate when launched with several processes, else (0, 1, ...)."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        from accelerate import PartialState

        # without CUDA (or with --device cpu) accelerate needs cpu=True for its multi-CPU mode, else every
        # process takes itself for rank 0 of 1 and caches everything
        state = PartialState(cpu=not torch.cuda.is_available() or (device or "").startswith("cpu"))
        return state.process_index, state.num_processes, device or str(state.device)
    return 0, 1, device or ("cuda" if torch.cuda.is_available() else "cpu")


def run_and_report(function, *args, **kwargs) -> int:
    """Run a caching function and print its summary. Exit status: 0 when every dataset has usable items,
    1 when the run finished but a dataset has none (its errors are in the summary), 2 when bad input
    stopped it (a dataset TOML, model file, setting or folder that cannot work: the message says which;
    every cache file written before that is complete and kept).

    With several processes, rank 0 gathers every process's summary and prints them in rank order in one
    write: processes printing at the same time on one unbuffered stdout (PYTHONUNBUFFERED, or a terminal)
    interleave their text and newlines and garble each other's lines."""
    from library.wan.checkpoint_files import CheckpointError

    try:
        summary = function(*args, **kwargs)
        report, code = summary.report(), 0 if summary.ok else 1
    except (UserError, CheckpointError, OSError) as exc:  # a dataset TOML, model file, setting or folder
        message = user_message(exc) or (str(exc) if isinstance(exc, CheckpointError) else None)
        if message is None:  # an OS error that is not the user's: our bug, with its traceback
            raise
        logger.error("%s", message)
        report, code = f"error: {message}", EXIT_USER_ERROR
    reports = _gather_reports(report, code)
    if reports is not None:
        sys.stdout.write("".join(f"{text}\n" for text, _ in reports))
        sys.stdout.flush()
        code = max(status for _, status in reports)
    return code


def _gather_reports(report: str, code: int) -> list[tuple[str, int]] | None:
    """Every process's (report, exit status) in rank order on rank 0, None on the others; [this one] alone."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return [(report, code)]
    gathered = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
    dist.gather_object((report, code), gathered, dst=0)
    # every process is done with the group: shut it down together, here, not in the interpreter's teardown,
    # where gloo's threads can still be running and abort a process ("terminate called without an active
    # exception") after its work is done
    dist.barrier()
    dist.destroy_process_group()
    return gathered

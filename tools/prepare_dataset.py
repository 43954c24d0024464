"""Prepare a training dataset from folders of raw images and videos (the training guide's steps 1-3 and 5).

    python tools/prepare_dataset.py raw_clips/ raw_photos/ --output_dir training_dataset \
        [--resolution 512] [--keep_aspect] [--frames 17] [--target_fps 24 | --task t2v-A14B] \
        [--keep_best 300] [--video_format mp4|mkv|png] [--color_normalize] [--min_sharpness 50 ...]

Writes images/, videos/ (cut-free clips of --frames frames at the target fps), captions/ (seeded from
sidecar .txt files, never overwritten), dataset.toml, report.json and report.html (every input, worst
first, with its scores and the reason it was dropped). Reruns skip unchanged sources.
"""

from __future__ import annotations

import argparse
import logging
import sys
from dataclasses import fields
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # our `library`, not sd-scripts' package

from library.prep.analysis import AnalysisSettings  # noqa: E402
from library.errors import non_negative_int, positive_float, positive_int  # noqa: E402
from library.prep.filters import FILTER_NAMES, Thresholds  # noqa: E402
from library.prep.pipeline import VIDEO_FORMATS, PrepConfig, prepare_dataset  # noqa: E402

THRESHOLD_HELP = {
    "min_sharpness": "drop when the variance of the Laplacian at the output size is below this (blur)",
    "max_motion_blur": "drop clips whose fine-detail structure-tensor coherence (0-1) is above this",
    "max_noise": "drop when the noise sigma (grey levels, native resolution) is above this",
    "max_blockiness": "drop when the 8x8 block-grid strength (1.0 = none) is above this",
    "max_shake": "drop clips whose camera-path jitter (%% of the frame width) is above this",
    "max_lighting_jump": "drop clips with a frame-to-frame mean-luma jump (%% of full scale) above this",
    "max_overlay": "drop clips where a fixed high-contrast region covers more than this %% of the frame",
    "min_resolution_scale": "drop sources smaller than this times the output size (1 = no upscaling)",
    "max_duplicate_distance": "perceptual-hash Hamming distance (of 64 bits) that counts as a near-duplicate",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("inputs", nargs="+", type=Path, help="folders (searched recursively) or files")
    parser.add_argument("--output_dir", type=Path, required=True)
    parser.add_argument("--resolution", type=positive_int, default=512,
                        help="square side, or the bucket area's side")
    parser.add_argument("--keep_aspect", action="store_true", help="keep the aspect (for bucketing), no square crop")
    parser.add_argument("--frames", type=positive_int, default=17,
                        help="frames per clip, 1 + 4k (17 or 21 suit 24 fps)")
    parser.add_argument("--target_fps", type=positive_float, default=None,
                        help="clip fps (default 24, or the model's)")
    parser.add_argument("--task", default=None, help="a WAN task (t2v-A14B, ti2v-5B, ...) whose fps to use")
    parser.add_argument("--no_crop_bars", action="store_true", help="keep letterbox / pillarbox bars")
    parser.add_argument("--color_normalize", action="store_true", help="white balance + luma stretch per item")
    parser.add_argument("--video_format", choices=VIDEO_FORMATS, default="mp4",
                        help="mp4 (mp4v), mkv (lossless FFV1) or png (a folder of frames per clip)")
    parser.add_argument("--cut_threshold", type=float, default=0.5, help="1 - correlation that counts as a cut")
    parser.add_argument("--cut_margin", type=non_negative_int, default=2, help="source frames kept away from a cut")
    parser.add_argument("--clip_gap", type=non_negative_int, default=0, help="source frames skipped between clips")
    parser.add_argument("--max_clips_per_video", type=non_negative_int, default=0, help="0 = as many as fit")
    parser.add_argument("--keep_best", type=non_negative_int, default=0, help="keep only the N best by combined score")
    parser.add_argument("--skip_filters", nargs="*", default=[], choices=FILTER_NAMES, help="filters to turn off")
    defaults = Thresholds()
    for f in fields(Thresholds):
        parser.add_argument(f"--{f.name}", type=type(getattr(defaults, f.name)), default=getattr(defaults, f.name),
                            help=THRESHOLD_HELP[f.name])
    parser.add_argument("--batch_size", type=positive_int, default=1, help="batch_size written to dataset.toml")
    parser.add_argument("--caption_extension", default=".txt")
    parser.add_argument("--force", action="store_true", help="analyse every source again, ignoring the cache")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    return parser


def resolve_fps(target_fps: float | None, task: str | None) -> float:
    """--target_fps, else the task's fps (16 for the 14B models, 24 for ti2v-5B), else the guide's 24."""
    if target_fps is not None:
        return target_fps
    if task:
        from library.wan.variants import get_variant

        return float(get_variant(task).fps)
    return 24.0


def check_resolution(resolution: int, task: str | None) -> None:
    """ValueError unless --resolution is a multiple of the bucket step (the task's, else 16): the dataset.toml
    written here would otherwise be refused by the caching tools."""
    from library.data.buckets import bucket_step

    step = 16
    if task:
        from library.wan.variants import get_variant

        step = bucket_step(get_variant(task).vae)
    if resolution % step:
        down, up = max(step, resolution // step * step), -(-resolution // step) * step
        raise ValueError(f"--resolution {resolution} is not a multiple of {step}, the bucket step of "
                         f"{task or 'the WAN 2.1 VAE (32 for the WAN 2.2 VAE of ti2v-5B)'}; use {down} or {up}")


def config_from_args(args: argparse.Namespace) -> PrepConfig:
    analysis = AnalysisSettings(
        resolution=args.resolution, square=not args.keep_aspect, frames=args.frames,
        target_fps=resolve_fps(args.target_fps, args.task), crop_bars=not args.no_crop_bars,
        cut_threshold=args.cut_threshold, cut_margin=args.cut_margin, clip_gap=args.clip_gap,
        max_clips_per_video=args.max_clips_per_video)
    thresholds = Thresholds(**{f.name: getattr(args, f.name) for f in fields(Thresholds)})
    return PrepConfig(inputs=tuple(args.inputs), output_dir=args.output_dir, analysis=analysis, thresholds=thresholds,
                      disabled_filters=tuple(args.skip_filters), keep_best=args.keep_best,
                      color_normalize=args.color_normalize, video_format=args.video_format,
                      batch_size=args.batch_size, caption_extension=args.caption_extension, force=args.force,
                      progress=not args.quiet)


def main(argv: list[str] | None = None) -> int:
    """Prepare the dataset; a flag it could not be trained with is an error before anything is read (exit 2).
    Under `run_cli`, a missing input, an unknown task or an output folder that cannot be written is one
    error line and exit 2 as well."""
    from library.prep.scenes import check_frame_count

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    try:
        check_resolution(args.resolution, args.task)
        check_frame_count(args.frames)
    except ValueError as error:  # an unknown task is one too
        print(f"error: {error}", file=sys.stderr)
        return 2
    result = prepare_dataset(config_from_args(args))
    s = result.summary
    print(f"{s['sources']} sources -> {s['items']} items: kept {s['kept']} ({s['kept_images']} images, "
          f"{s['kept_clips']} clips), dropped {s['dropped']} {s['drop_reasons']}; analysed {result.analysed}, "
          f"cached {result.reused}, written {result.written}, removed {result.removed}")
    print(f"dataset config: {args.output_dir / 'dataset.toml'}; report: {args.output_dir / 'report.html'}")
    return 0


if __name__ == "__main__":
    from library.errors import run_cli

    sys.exit(run_cli(main))

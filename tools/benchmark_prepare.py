"""Benchmark dataset preparation: clips processed per second on this machine.

Writes synthetic source videos (a textured pan with one hard cut each, FFV1 so they decode losslessly),
then times `prepare_dataset` on a fresh output folder (decode, cut detection, every quality score,
standardise and write the kept clips) and once more on the unchanged inputs (the cached rerun).

    python tools/benchmark_prepare.py [--videos 6] [--frames_per_video 96] [--width 960 --height 540]
        [--resolution 512] [--clip_frames 17] [--dir /tmp/prep_bench] [--keep]
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # our `library`, not sd-scripts' package

from library.prep.analysis import AnalysisSettings  # noqa: E402
from library.prep.pipeline import PrepConfig, prepare_dataset  # noqa: E402
from library.prep.synthetic import ClipSpec, make_clip, write_lossless_video  # noqa: E402


def make_sources(folder: Path, videos: int, frames: int, width: int, height: int) -> None:
    for i in range(videos):
        spec = ClipSpec(frames=frames, width=width, height=height, seed=100 + i, pan=(2.0, 1.0), cut_at=frames // 2)
        write_lossless_video(folder / f"source_{i:02d}.mkv", make_clip(spec), fps=24.0)


def main(argv: list[str] | None = None) -> int:
    from library.errors import positive_int

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--videos", type=positive_int, default=6)
    parser.add_argument("--frames_per_video", type=positive_int, default=96)
    parser.add_argument("--width", type=positive_int, default=960)
    parser.add_argument("--height", type=positive_int, default=540)
    parser.add_argument("--resolution", type=positive_int, default=512)
    parser.add_argument("--clip_frames", type=positive_int, default=17)
    parser.add_argument("--dir", type=Path, default=None, help="work folder (default: a temporary one)")
    parser.add_argument("--keep", action="store_true", help="keep the work folder")
    args = parser.parse_args(argv)

    work = args.dir or Path(tempfile.mkdtemp(prefix="prep_bench_"))
    raw, out = work / "raw", work / "out"
    shutil.rmtree(out, ignore_errors=True)
    if not raw.is_dir():
        make_sources(raw, args.videos, args.frames_per_video, args.width, args.height)
    config = PrepConfig(inputs=(raw,), output_dir=out, progress=False,
                        analysis=AnalysisSettings(resolution=args.resolution, frames=args.clip_frames))
    start = time.perf_counter()
    result = prepare_dataset(config)
    first = time.perf_counter() - start
    start = time.perf_counter()
    prepare_dataset(config)
    rerun = time.perf_counter() - start

    clips = [i for i in result.items if i["kind"] == "clip"]
    kept = sum(1 for i in clips if i["kept"])
    source_frames = args.videos * args.frames_per_video
    print(f"machine: {os.cpu_count()} CPU threads; sources: {args.videos} x {args.frames_per_video} frames "
          f"{args.width}x{args.height} FFV1, 1 cut each; output {args.resolution}px square, "
          f"{args.clip_frames}-frame clips")
    print(f"first run: {len(clips)} clips scored, {kept} kept and written in {first:.2f} s -> "
          f"{len(clips) / first:.2f} clips/s ({source_frames / first:.1f} source frames/s)")
    print(f"cached rerun: {rerun:.3f} s")
    if not args.keep and args.dir is None:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    from library.errors import run_cli

    sys.exit(run_cli(main))

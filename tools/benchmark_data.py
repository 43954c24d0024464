"""Data pipeline benchmark (issue 3 targets).

(a) Decode + resize + centre-crop of a synthetic 1280x720 clip to 832x480 with `library.data.video_io`,
    next to a bare OpenCV decode of the same file in the same run. Target: >= 0.8x the bare decode.
    The clip is written by OpenCV (MPEG-4 part 2, cheap to decode) and, when imageio-ffmpeg is
    installed, also transcoded to H.264 (what most clips are).
(b) Batches per second served from the latent cache for 832x480x81 items (latents [16, 21, 60, 104]
    bf16 for the WAN 2.1 VAE, a umT5 context [L, 4096]) through `build_train_datasets`, `make_batches`,
    `collate` and a torch DataLoader. Target: >= 20.

    python tools/benchmark_data.py [--frames 81] [--items 12] [--batches 200] [--num_workers 2]
"""

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # our `library`, not sd-scripts'


def synthetic_clip(path: Path, frames: int, size=(1280, 720), fps: float = 16.0) -> Path:
    """A moving gradient with noise (so the encoder cannot cheat) written with OpenCV's mp4v."""
    import cv2
    import numpy as np

    width, height = size
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    base = (np.add.outer(np.arange(height), np.arange(width)) % 256).astype(np.uint8)
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), fps, size)
    for i in range(frames):
        frame = np.stack([np.roll(base, 4 * i, axis=1), np.roll(base, 3 * i, axis=0), np.flipud(base)], axis=-1)
        writer.write(cv2.add(frame, rng.integers(0, 24, frame.shape, dtype=np.uint8)))
    writer.release()
    return path


def bare_decode(path: Path) -> int:
    import cv2

    capture = cv2.VideoCapture(str(path))
    count = 0
    while True:
        ok, _ = capture.read()
        if not ok:
            break
        count += 1
    capture.release()
    return count


def h264_copy(clip: Path) -> Path | None:
    """The same clip as H.264 (what most users' clips are), via imageio-ffmpeg's bundled ffmpeg; None
    when that package is missing."""
    try:
        import imageio_ffmpeg
    except ImportError:
        return None
    out = clip.with_name(clip.stem + "_h264.mp4")
    subprocess.run([imageio_ffmpeg.get_ffmpeg_exe(), "-loglevel", "error", "-y", "-i", str(clip), "-c:v", "libx264",
                    "-preset", "veryfast", "-crf", "18", "-pix_fmt", "yuv420p", str(out)], check=True)
    return out


def compare_decode(clip: Path, label: str, repeats: int) -> None:
    from library.data import video_pyav
    from library.data.video_io import read_video_frames

    bare, ours, pyav = [], [], []
    for _ in range(repeats):  # interleaved, so all see the same machine load
        start = time.perf_counter()
        count = bare_decode(clip)
        bare.append(time.perf_counter() - start)
        start = time.perf_counter()
        out = read_video_frames(clip, list(range(count)), (832, 480))
        ours.append(time.perf_counter() - start)
        if video_pyav.import_av() is not None:  # the optional decoder (WAN_VIDEO_DECODER=pyav), same work
            start = time.perf_counter()
            video_pyav.read_frames(clip, list(range(count)), (832, 480))
            pyav.append(time.perf_counter() - start)
    assert out.shape == (count, 480, 832, 3)
    b, o = min(bare), min(ours)
    median = sorted(x / y for x, y in zip(bare, ours))[repeats // 2]
    print(f"(a) 1280x720 {label} clip, {count} frames (best of {repeats}, interleaved)")
    print(f"    bare OpenCV decode:                {count / b:7.1f} frames/s")
    print(f"    decode + resize + crop to 832x480: {count / o:7.1f} frames/s")
    if pyav:
        print(f"    the same with PyAV:                {count / min(pyav):7.1f} frames/s")
    print(f"    ratio {b / o:.2f}x best-to-best, {median:.2f}x median pair (target >= 0.8x)")


def bench_decode(root: Path, frames: int, repeats: int = 11) -> None:
    clip = synthetic_clip(root / "clip720p.mp4", frames)
    compare_decode(clip, "MPEG-4 (OpenCV mp4v)", repeats)
    h264 = h264_copy(clip)
    if h264 is not None:
        compare_decode(h264, "H.264 (same frames)", repeats)


def _cached_items(root: Path, items: int, text_len: int):
    """A dataset TOML over tiny 81-frame clips in an 832x480 bucket, with fresh random caches."""
    import torch

    from library.data import cache
    from library.data.dataset_config import load_dataset_config
    from library.data.datasets import latent_settings, task_info
    from library.data.items import enumerate_dataset

    for i in range(items):
        synthetic_clip(root / f"videos/c{i:03d}.mp4", 81, size=(96, 56))
        (root / f"videos/c{i:03d}.txt").write_text(f"caption number {i}")
    (root / "d.toml").write_text("[general]\nresolution = [832, 480]\n[[datasets]]\nvideo_directory = 'videos'\n"
                                 "cache_directory = 'cache'\ntarget_frames = [81]\nnum_repeats = 1000\n")
    config = load_dataset_config(root / "d.toml")
    info = task_info("t2v-A14B")
    spec = config.datasets[0]
    for item in enumerate_dataset(spec, info.step, info.fps)[0]:
        latents = torch.randn(16, 21, 60, 104)
        meta = cache.latent_metadata(item, latent_settings(item, "2.1"), "benchmark",
                                     cache.source_fingerprint(item.media_path))
        cache.write_safetensors_atomic({"latents": latents.to(cache.STORE_DTYPE)},
                                       cache.latent_cache_path(spec.cache_directory, item.key, "2.1"), meta)
        context = torch.randn(text_len, 4096)
        cache.write_safetensors_atomic({"t5": context.to(cache.STORE_DTYPE)},
                                       cache.text_cache_path(spec.cache_directory, item.caption),
                                       cache.text_metadata(item.caption, "benchmark", text_len))
    return config


def bench_loader(root: Path, items: int, batches: int, num_workers: int, batch_size: int) -> None:
    from library.data.datasets import batch_loader, build_train_datasets

    config = _cached_items(root, items, text_len=120)
    datasets = build_train_datasets(config, "t2v-A14B")
    for dataset in datasets:
        dataset.check_caches()
        dataset.batch_size = batch_size
    loader = batch_loader(datasets, seed=0, epoch=0, num_workers=num_workers,
                          prefetch_factor=4 if num_workers else None)
    iterator = iter(loader)
    for _ in range(num_workers * 2 + 2):  # warm-up: worker start-up is paid once per run
        batch = next(iterator)
    start = time.perf_counter()
    for _ in range(batches):
        batch = next(iterator)
    elapsed = time.perf_counter() - start
    shape = list(batch["latents"].shape)
    print(f"(b) cached 832x480x81 items, batch {batch_size}, latents {shape} float32, {num_workers} workers")
    print(f"    {batches / elapsed:7.1f} batches/s ({batches} batches, {elapsed:.2f} s) (target >= 20)")


def main(argv=None) -> int:
    from library.errors import non_negative_int, positive_int

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--frames", type=positive_int, default=81, help="frames of the synthetic 720p clip")
    parser.add_argument("--items", type=positive_int, default=12, help="cached items for (b)")
    parser.add_argument("--batches", type=positive_int, default=200, help="batches timed in (b)")
    parser.add_argument("--num_workers", type=non_negative_int, default=2)
    parser.add_argument("--batch_size", type=positive_int, default=1)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        bench_decode(Path(tmp), args.frames)
        bench_loader(Path(tmp), args.items, args.batches, args.num_workers, args.batch_size)
    return 0


if __name__ == "__main__":
    from library.errors import run_cli

    sys.exit(run_cli(main))

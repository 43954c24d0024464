"""Benchmark `load_dit` against a raw sequential read of the same file.

Writes a random-weight checkpoint of a variant's shape (default: WAN 2.1 T2V-1.3B in bf16, about 2.8 GB)
in the official single-file format, then measures in fresh subprocesses, page cache warm for both:
  raw   read the file start to end in 16 MiB chunks into one reused buffer
  load  `load_dit(path, dtype=...)` to the CPU with the overlapped reader (`loading.STREAM_CASTS = True`,
        what WAN_OVERLAPPED_LOAD=1 selects)
  seq   (with --sequential) the same with `loading.STREAM_CASTS = False`, the default: casts read through
        the memory map one tensor after another
and prints wall time, peak RSS (and its growth over the post-import baseline) as a ratio of the file
size. Targets: peak RSS <= 1.15x the file size, time <= 1.5x the raw read. The modes take turns, each
`--repeats` times; the table shows each mode's median and the ratio line both the median and best runs
(a shared machine is noisy).

    python tools/benchmark_loading.py [--variant t2v-1.3B] [--dtype bf16] [--dir /tmp/wan_bench] [--keep]
    python tools/benchmark_loading.py --dtype fp32 --load_dtype bf16 --sequential --repeats 7
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # our `library`, never another package of that name (sd-scripts has one)

DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}


def write_checkpoint(variant_name: str, dtype_name: str, path: Path) -> None:
    """Random weights of the variant's shapes, written tensor by tensor into one safetensors file."""
    import torch
    from safetensors.torch import save_file

    from library.wan.vace import build_dit
    from library.wan.variants import get_variant

    dtype = getattr(torch, DTYPES[dtype_name])
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in build_dit(get_variant(variant_name)).state_dict().items()}
    gen = torch.Generator().manual_seed(0)
    state = {k: (torch.randn(s, generator=gen) * 0.02).to(dtype) for k, s in shapes.items()}
    tmp = path.with_suffix(".tmp")
    save_file(state, str(tmp))
    os.replace(tmp, path)


def _peak_rss_bytes() -> int:
    """This process's peak RSS (VmHWM). Not getrusage: ru_maxrss survives exec and would report the parent's."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _current_rss_bytes() -> int:
    import psutil

    return psutil.Process().memory_info().rss


def child_raw(path: str) -> dict:
    buf = bytearray(16 << 20)
    view = memoryview(buf)
    start = time.perf_counter()
    with open(path, "rb", buffering=0) as f:
        while f.readinto(view):
            pass
    return {"seconds": time.perf_counter() - start, "peak_rss": _peak_rss_bytes(), "baseline_rss": 0}


def child_load(path: str, dtype_name: str, stream: bool = True) -> dict:
    import torch

    from library.wan import loading
    from library.wan.loading import load_dit

    loading.STREAM_CASTS = stream

    baseline = _current_rss_bytes()
    start = time.perf_counter()
    model = load_dit(path, dtype=getattr(torch, DTYPES[dtype_name]))
    for p in model.parameters():  # touch every page so a lazily mapped load pays its reads here
        p.view(-1)[:: max(1, 4096 // p.element_size())].sum()
    seconds = time.perf_counter() - start
    params = sum(p.numel() for p in model.parameters())
    return {"seconds": seconds, "peak_rss": _peak_rss_bytes(), "baseline_rss": baseline, "params": params}


def run_child(mode: str, path: Path, dtype_name: str) -> dict:
    out = subprocess.run(
        [sys.executable, __file__, "--_child", mode, "--load_dtype", dtype_name, str(path)],
        check=True, capture_output=True, text=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    from library.errors import positive_int

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--variant", default="t2v-1.3B", help="variant whose shapes the checkpoint has")
    parser.add_argument("--dtype", default="bf16", choices=sorted(DTYPES), help="dtype on disk and in memory")
    parser.add_argument("--load_dtype", default=None, choices=sorted(DTYPES),
                        help="dtype to load into (default: the file's); fp32 -> bf16 is the official A14B case")
    parser.add_argument("--dir", default=None, help="folder for the checkpoint (default: a temp folder)")
    parser.add_argument("--keep", action="store_true", help="keep the checkpoint for later runs")
    parser.add_argument("--repeats", type=positive_int, default=3, help="measurements of each mode (median shown)")
    parser.add_argument("--sequential", action="store_true",
                        help="also time the sequential cast path (loading.STREAM_CASTS = False)")
    parser.add_argument("--_child", nargs=1, default=None, help=argparse.SUPPRESS)
    parser.add_argument("path", nargs="?", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args._child:
        mode = args._child[0]
        result = (child_raw(args.path) if mode == "raw" else
                  child_load(args.path, args.load_dtype or args.dtype, stream=mode != "seq"))
        print(json.dumps(result))
        return 0

    import tempfile

    folder = Path(args.dir or tempfile.mkdtemp(prefix="wan_load_bench_"))
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"wan_{args.variant}_{args.dtype}.safetensors"
    if not path.exists():
        t0 = time.perf_counter()
        write_checkpoint(args.variant, args.dtype, path)
        print(f"wrote {path} in {time.perf_counter() - t0:.1f} s")
    size = path.stat().st_size
    try:
        run_child("raw", path, args.dtype)  # warm the page cache so both modes read from memory
        modes = ("raw", "load", "seq") if args.sequential else ("raw", "load")
        runs = {mode: [] for mode in modes}
        for _ in range(args.repeats):  # the modes take turns, so a busy spell hits all of them
            for mode in modes:
                runs[mode].append(run_child(mode, path, args.load_dtype or args.dtype))
        median = {mode: sorted(rs, key=lambda r: r["seconds"])[len(rs) // 2] for mode, rs in runs.items()}
        best = {mode: min(r["seconds"] for r in rs) for mode, rs in runs.items()}
        raw, load = median["raw"], median["load"]
        gib = 1 << 30
        print(f"file: {size / gib:.2f} GiB ({args.variant}, {args.dtype} on disk, loaded as "
              f"{args.load_dtype or args.dtype}, {load['params'] / 1e9:.2f} B params)")
        print(f"{'mode':<6}{'seconds':>10}{'GiB/s':>8}{'peak RSS GiB':>14}{'RSS/file':>10}{'growth/file':>13}")
        for mode, r in median.items():
            growth = (r["peak_rss"] - r["baseline_rss"]) / size if r["baseline_rss"] else float("nan")
            print(f"{mode:<6}{r['seconds']:>10.2f}{size / gib / r['seconds']:>8.2f}{r['peak_rss'] / gib:>14.2f}"
                  f"{r['peak_rss'] / size:>10.3f}{growth:>13.3f}")
        for mode in modes[1:]:
            print(f"{mode} time / raw read: median {median[mode]['seconds'] / raw['seconds']:.2f}x, best "
                  f"{best[mode] / best['raw']:.2f}x (target <= 1.5x); peak RSS / file size: "
                  f"{median[mode]['peak_rss'] / size:.3f}x (target <= 1.15x)")
        print("seconds of every run: " + "; ".join(f"{m} " + " ".join(f"{r['seconds']:.2f}" for r in rs)
                                                   for m, rs in runs.items()))
    finally:
        if not args.keep:
            path.unlink(missing_ok=True)
    return 0


if __name__ == "__main__":
    from library.errors import run_cli

    sys.exit(run_cli(main))

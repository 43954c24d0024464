"""Benchmark `load_dit` against a raw sequential read of the same file.

Writes a random-weight checkpoint of a variant's shape (default: WAN 2.1 T2V-1.3B in bf16, about 2.8 GB)
in the official single-file format, then measures in fresh subprocesses, page cache warm for all:
  raw        read the file start to end in 16 MiB chunks into one reused buffer
  load       `load_dit(path, dtype=...)` to the CPU: tensors read through the memory map and cast one after
             another (the overlapped reader that `seq` was compared with until it was removed is gone)
  cuda       (--device cuda, instead of load) `load_dit(path, device="cuda")` through the page-locked
             staging buffers (`library/wan/staged_load.py`), timed up to `torch.cuda.synchronize()`
  cuda_to    (--device cuda) the same with `staged_load.ENABLED = False` (WAN_STAGED_LOAD=0): per-tensor
             `tensor.to("cuda", dtype)`, the path before the staging buffers
  fp8        (--device cuda --fp8, also) `load_dit(path, device="cuda", fp8=FP8Config())`, fp8_base: block
             Linear weights staged in the file's dtype and quantised (per-tensor scales) on the GPU
  fp8_to     (--device cuda --fp8) the same with per-tensor `.to("cuda")` (WAN_STAGED_LOAD=0)
  host       (--staged_host) the host side of the staged path on the CPU: every tensor read through the
             memory map and cast into the reused staging buffers; the copy to the device and the NaN screen
             (the GPU's work) excluded, so no destination memory is touched
  host_copy  (--staged_host) the same with the CPU stand-in's copy into CPU destination tensors included
             (fresh pages, as a model kept in host memory pays them; the screen still excluded)
  pages      (--pages) the fresh-page floor: new tensors of every shape the load makes, each filled as it
             is allocated (page faults, zeroing), then all filled again (memory bandwidth only), then
             screened for NaN / infinity (one sum each, as `loading.check_finite`)
and prints wall time, peak RSS (and its growth over the post-import baseline) as a ratio of the file
size. Targets: peak RSS <= 1.15x the file size, time <= 1.5x the raw read. The modes take turns, each
`--repeats` times; the table shows each mode's median and the ratio line both the median and best runs
(a shared machine is noisy). `--json FILE` writes the figures (what tools/gpu_check.sh reads).

    python tools/benchmark_loading.py [--variant t2v-1.3B] [--dtype bf16] [--dir /tmp/wan_bench] [--keep]
    python tools/benchmark_loading.py --dtype fp32 --load_dtype bf16 --repeats 7
    python tools/benchmark_loading.py --dtype fp32 --load_dtype bf16 --device cuda     # on a GPU machine
    python tools/benchmark_loading.py --dtype fp32 --load_dtype bf16 --device cuda --fp8
    python tools/benchmark_loading.py --dtype fp32 --load_dtype bf16 --staged_host --pages
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
DTYPE_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4}


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


def child_load(path: str, dtype_name: str, device: str = "cpu", staged: bool = True, fp8: bool = False) -> dict:
    import torch

    from library.wan import staged_load
    from library.wan.fp8 import FP8Config
    from library.wan.loading import load_dit

    staged_load.ENABLED = staged
    cuda = device == "cuda"
    if cuda:
        torch.zeros(1, device=device)  # the CUDA context, paid once per process, stays out of the time
    baseline = _current_rss_bytes()
    start = time.perf_counter()
    model = load_dit(path, device=device, dtype=getattr(torch, DTYPES[dtype_name]), fp8=FP8Config() if fp8 else None)
    if cuda:
        torch.cuda.synchronize()
    else:
        for p in model.parameters():  # touch every page so a lazily mapped load pays its reads here
            p.view(-1)[:: max(1, 4096 // p.element_size())].float().sum()  # fp8 has no sum kernel
    seconds = time.perf_counter() - start
    params = sum(p.numel() for p in model.parameters())
    result = {"seconds": seconds, "peak_rss": _peak_rss_bytes(), "baseline_rss": baseline, "params": params}
    if cuda:
        result["peak_vram"] = torch.cuda.max_memory_allocated()
    return result


def child_staged_host(path: str, dtype_name: str, copy: bool) -> dict:
    """The staged path's host-side work: read and cast into the reused buffers (`copy`: and copy into fresh
    CPU tensors, the stand-in transport's destination); the NaN screen, done on the GPU there, left out."""
    import torch

    from library.wan.checkpoint_files import open_checkpoint
    from library.wan.load_common import target_dtype as _target_dtype
    from library.wan.staged_load import HostTransport, StagedLoader

    class Transport(HostTransport):
        def empty(self, shape, dtype):
            return super().empty(shape, dtype) if copy else torch.empty(shape, dtype=dtype, device="meta")

        def copy(self, dst, src):
            if copy:
                super().copy(dst, src)

        def finite(self, tensor):
            return torch.ones((), dtype=torch.bool)

    dtype = getattr(torch, DTYPES[dtype_name])
    baseline = _current_rss_bytes()
    start = time.perf_counter()
    ckpt, kept = open_checkpoint(path), []
    with StagedLoader(Transport()) as loader:
        for key in ckpt.keys():
            kept.append(loader.load(key, ckpt.read(key), _target_dtype(key, dtype)))
            ckpt.release(key)
    seconds = time.perf_counter() - start
    params = sum(t.numel() for t in kept)
    return {"seconds": seconds, "peak_rss": _peak_rss_bytes(), "baseline_rss": baseline, "params": params}


def child_pages(path: str, dtype_name: str) -> dict:
    """The fresh-page floor of a load into new host tensors: a tensor of every shape the load makes (the file's
    tensors in the loaded dtypes) allocated and filled one after another, as a load allocates and writes them
    (the kernel faults in and zeroes every new page), then every tensor filled again (memory bandwidth only).
    The difference is what fresh pages cost; a load onto a GPU through reused staging buffers avoids it. Also
    times the finite screen over the tensors, which a CPU load runs too."""
    import torch

    from library.wan.checkpoint_files import open_checkpoint
    from library.wan.load_common import target_dtype as _target_dtype

    ckpt, dtype = open_checkpoint(path), getattr(torch, DTYPES[dtype_name])
    specs = [(ckpt.shape(k), _target_dtype(k, dtype)) for k in ckpt.keys()]
    baseline, tensors = _current_rss_bytes(), []
    start = time.perf_counter()
    for shape, target in specs:
        tensors.append(torch.empty(shape, dtype=target).fill_(1.0))
    fresh = time.perf_counter() - start
    start = time.perf_counter()
    for tensor in tensors:
        tensor.fill_(2.0)
    reused = time.perf_counter() - start
    start = time.perf_counter()
    for tensor in tensors:  # the NaN / infinity screen of `loading.check_finite`, one sum per tensor
        torch.isfinite(tensor.sum())
    screen = time.perf_counter() - start
    return {"seconds": fresh, "reused_seconds": reused, "screen_seconds": screen, "peak_rss": _peak_rss_bytes(),
            "baseline_rss": baseline}


def run_child(mode: str, path: Path, file_dtype: str, dtype_name: str) -> dict:
    out = subprocess.run(
        [sys.executable, __file__, "--_child", mode, "--dtype", file_dtype, "--load_dtype", dtype_name, str(path)],
        check=True, capture_output=True, text=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def child(mode: str, path: str, dtype_name: str) -> dict:
    """One measurement of `mode` in this (fresh) process."""
    if mode == "raw":
        return child_raw(path)
    if mode in ("host", "host_copy"):
        return child_staged_host(path, dtype_name, copy=mode == "host_copy")
    if mode == "pages":
        return child_pages(path, dtype_name)
    if mode in ("cuda", "cuda_to", "fp8", "fp8_to"):
        return child_load(path, dtype_name, device="cuda", staged=mode in ("cuda", "fp8"), fp8=mode.startswith("fp8"))
    return child_load(path, dtype_name)


def report(args, path: Path, size: int, runs: dict, load_avg: list) -> None:
    """The table, the ratio lines, every run's seconds and the load average; `--json` gets the same figures."""
    median = {mode: sorted(rs, key=lambda r: r["seconds"])[len(rs) // 2] for mode, rs in runs.items()}
    best = {mode: min(r["seconds"] for r in rs) for mode, rs in runs.items()}
    raw, gib = median["raw"], 1 << 30
    params = next((r["params"] for r in median.values() if "params" in r), 0)
    print(f"file: {size / gib:.2f} GiB ({args.variant}, {args.dtype} on disk, loaded as "
          f"{args.load_dtype or args.dtype}, {params / 1e9:.2f} B params)")
    print(f"{'mode':<10}{'seconds':>10}{'GiB/s':>8}{'peak RSS GiB':>14}{'RSS/file':>10}{'growth/file':>13}")
    for mode, r in median.items():
        growth = (r["peak_rss"] - r["baseline_rss"]) / size if r["baseline_rss"] else float("nan")
        print(f"{mode:<10}{r['seconds']:>10.2f}{size / gib / r['seconds']:>8.2f}{r['peak_rss'] / gib:>14.2f}"
              f"{r['peak_rss'] / size:>10.3f}{growth:>13.3f}")
    for mode in [m for m in median if m not in ("raw", "pages")]:
        print(f"{mode} time / raw read: median {median[mode]['seconds'] / raw['seconds']:.2f}x, best "
              f"{best[mode] / best['raw']:.2f}x (target <= 1.5x); peak RSS / file size: "
              f"{median[mode]['peak_rss'] / size:.3f}x (target <= 1.15x)")
    if "cuda" in median:
        vram = {m: median[m]["peak_vram"] / gib for m in ("cuda", "cuda_to")}
        print(f"staged load onto the GPU: {median['cuda_to']['seconds'] / median['cuda']['seconds']:.2f}x faster "
              f"than per-tensor .to() at the median; peak GPU memory {vram['cuda']:.2f} GiB staged, "
              f"{vram['cuda_to']:.2f} GiB .to()")
    if "fp8" in median:
        vram = {m: median[m]["peak_vram"] / gib for m in ("fp8", "fp8_to")}
        print(f"staged fp8 load (quantised on the GPU): {median['fp8_to']['seconds'] / median['fp8']['seconds']:.2f}x "
              f"faster than per-tensor .to() at the median; peak GPU memory {vram['fp8']:.2f} GiB staged, "
              f"{vram['fp8_to']:.2f} GiB .to()")
    if "pages" in median:
        pages, filled = median["pages"], size * DTYPE_BYTES[args.load_dtype or args.dtype] / DTYPE_BYTES[args.dtype]
        print(f"fresh pages: filling new tensors of the loaded model ({filled / gib:.2f} GiB) took "
              f"{pages['seconds']:.2f} s, filling them again {pages['reused_seconds']:.2f} s, the finite screen "
              f"{pages['screen_seconds']:.2f} s (median run); every run, fresh/reused/screen: "
              + " ".join(f"{r['seconds']:.2f}/{r['reused_seconds']:.2f}/{r['screen_seconds']:.2f}"
                         for r in runs["pages"]))
    print("seconds of every run: " + "; ".join(f"{m} " + " ".join(f"{r['seconds']:.2f}" for r in rs)
                                               for m, rs in runs.items()))
    print("load average (1, 5, 15 min) before / after: " + " / ".join(", ".join(f"{x:.2f}" for x in la)
                                                                       for la in load_avg))
    if args.json:
        modes = {}
        for mode, rs in runs.items():
            r = median[mode]
            modes[mode] = {"median_s": r["seconds"], "best_s": best[mode], "runs_s": [x["seconds"] for x in rs],
                           "peak_rss_gib": r["peak_rss"] / gib}
            if "peak_vram" in r:
                modes[mode]["peak_vram_gib"] = r["peak_vram"] / gib
            if "reused_seconds" in r:
                modes[mode]["reused_s"] = r["reused_seconds"]
                modes[mode]["reused_runs_s"] = [x["reused_seconds"] for x in rs]
                modes[mode]["screen_runs_s"] = [x["screen_seconds"] for x in rs]
        figures = {"device": args.device, "variant": args.variant, "file_gib": size / gib, "dtype": args.dtype,
                   "load_dtype": args.load_dtype or args.dtype, "params": params, "load_average": load_avg,
                   "modes": modes}
        Path(args.json).write_text(json.dumps(figures, indent=2))


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
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"),
                        help="cuda: time the load onto the GPU, staged (cuda) against per-tensor .to() (cuda_to)")
    parser.add_argument("--fp8", action="store_true",
                        help="with --device cuda: also time load_dit(fp8=...) onto the GPU, staged (fp8) and "
                             "per-tensor (fp8_to)")
    parser.add_argument("--staged_host", action="store_true",
                        help="also time the staged GPU path's host-side work on the CPU (host, host_copy)")
    parser.add_argument("--pages", action="store_true",
                        help="also time filling fresh against reused memory of the loaded model's size")
    parser.add_argument("--json", default=None, help="write the medians, best and every run to this file")
    parser.add_argument("--_child", nargs=1, default=None, help=argparse.SUPPRESS)
    parser.add_argument("path", nargs="?", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args._child:
        print(json.dumps(child(args._child[0], args.path, args.load_dtype or args.dtype)))
        return 0
    if args.fp8 and args.device != "cuda":
        from library.errors import UserError

        raise UserError("--fp8 times the fp8 load onto the GPU: pass --device cuda as well")
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            from library.errors import UserError

            raise UserError("--device cuda: no CUDA device here (torch.cuda.is_available() is False)")

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
        run_child("raw", path, args.dtype, args.dtype)  # warm the page cache so every mode reads from memory
        modes = ["raw", *(["cuda", "cuda_to"] if args.device == "cuda" else ["load"]),
                 *(["fp8", "fp8_to"] if args.fp8 else []), *(["host", "host_copy"] if args.staged_host else []),
                 *(["pages"] if args.pages else [])]
        runs, load_before = {mode: [] for mode in modes}, os.getloadavg()
        for _ in range(args.repeats):  # the modes take turns, so a busy spell hits all of them
            for mode in modes:
                runs[mode].append(run_child(mode, path, args.dtype, args.load_dtype or args.dtype))
        report(args, path, size, runs, [load_before, os.getloadavg()])
    finally:
        if not args.keep:
            path.unlink(missing_ok=True)
    return 0


if __name__ == "__main__":
    from library.errors import run_cli

    sys.exit(run_cli(main))

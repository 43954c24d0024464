"""The Python side of `tools/gpu_check.sh`: the environment probe, the sample render, and the one result
line per step (read from each step's JSON and log, never from its printed tables).

    python tools/gpu_check.py env --json env.json [--dry_run]       # torch, GPU, kernels, missing packages
    python tools/gpu_check.py render --device cuda --work DIR --json render.json
    python tools/gpu_check.py line STEP KIND --rc 0 --log step.log --json step.json [--baseline b.json]
    python tools/gpu_check.py summary results.txt --seconds 312
    python tools/gpu_check.py has flash_attn                          # exit 0 when the module is installed

A result line is `gpu_check <step> OK|FAIL|SKIP key=value ...`; values holding spaces are double-quoted,
so `shlex.split` reads a line back (`parse_line`). OK: the step ran and its figures are sane (finite
losses, parity and fp8 within their bounds); targets such as MFU >= 45% are printed beside the figures
(`met=yes|no`) and do not turn a line red. SKIP: an optional kernel that is not installed. This module
imports no torch unless a step needs it, so reporting stays instant.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # our `library`, never another package of that name (sd-scripts has one)

PREFIX = "gpu_check"
REQUIRED = ("diffusers", "ftfy", "imageio_ffmpeg")  # parity reference, prompt cleaning, MP4 writing
OPTIONAL = ("flash_attn", "flash_attn_interface", "xformers", "sageattention", "bitsandbytes")
TIMED_OUT = (124, 137)


# ---- result lines ----------------------------------------------------------------------------------------


def format_line(step: str, status: str, fields: dict) -> str:
    parts = [PREFIX, step, status]
    for key, value in fields.items():
        text = str(value).replace('"', "'").replace("\n", " ")
        parts.append(f'{key}="{text}"' if (not text or re.search(r"\s", text)) else f"{key}={text}")
    return " ".join(parts)


def parse_line(line: str) -> tuple[str, str, dict]:
    """(step, status, fields) of a result line."""
    words = shlex.split(line)
    if len(words) < 3 or words[0] != PREFIX:
        raise ValueError(f"not a {PREFIX} result line: {line!r}")
    return words[1], words[2], dict(w.split("=", 1) for w in words[3:])


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}%"


def _gib(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.2f}"


# ---- reading a step's outcome ----------------------------------------------------------------------------


def failure_reason(rc: int, limit: float | None, log: Path | None) -> str:
    """Why a step failed: its timeout, else the last error-looking line of its log."""
    if rc in TIMED_OUT:
        return f"timed out after {limit:g} s" if limit else "timed out"
    lines = [] if log is None or not log.exists() else log.read_text(errors="replace").splitlines()
    lines = [s.strip() for s in lines if s.strip()]
    errors = [s for s in lines if re.search(r"error|exception|failed|not installed|needs", s, re.IGNORECASE)]
    last = (errors or lines or [f"exit code {rc}, no output"])[-1]
    return f"exit {rc}: {last[:200]}"


def _settings(setup: str) -> str:
    """A compact name for the memory setup string of a benchmark run."""
    parts = ["fp8" if "fp8" in setup else "bf16"]
    if "checkpointing on" in setup:
        parts.append("ckpt")
    if "activations offloaded" in setup:
        parts.append("offload")
    swap = re.search(r"(\d+) blocks swapped", setup)
    if swap:
        parts.append(f"swap{swap.group(1)}")
    return "+".join(parts)


def bench_fields(r: dict, args) -> tuple[str, dict]:
    """Status and fields of a `tools/benchmark_wan.py --json` result."""
    peak, planned = r.get("peak_vram_gib"), r.get("planned_gib")
    fields = {"s_step": f"{r['seconds_per_step']:.3f}", "mfu": _pct(r.get("mfu")), "peak_gib": _gib(peak),
              "planned_gib": _gib(planned),
              "planner_err": "n/a" if not (peak and planned) else f"{100 * (planned / peak - 1):+.1f}%",
              "host_peak_gib": _gib(r.get("host_peak_rss_gib")), "settings": _settings(r.get("setup", ""))}
    status = "OK"
    if not all(math.isfinite(x) for x in r.get("losses", [])) or not r["seconds_per_step"] > 0:
        status, fields["reason"] = "FAIL", "non-finite loss or step time"
    if args.target_mfu is not None:
        mfu = r.get("mfu")
        fields["target"] = f"mfu>={100 * args.target_mfu:g}%"
        fields["met"] = "n/a" if mfu is None else ("yes" if mfu >= args.target_mfu else "no")
    if args.cap is not None:
        fields["cap_gib"] = f"{args.cap:g}"
        if peak is not None and peak > args.cap:
            status, fields["reason"] = "FAIL", f"peak {peak:.2f} GiB over the {args.cap:g} GiB cap"
    if args.baseline:
        base = _load(Path(args.baseline))
        if base is None:
            fields["ratio"] = "n/a (no uncapped baseline)"
        else:
            ratio = r["seconds_per_step"] / base["seconds_per_step"]
            fields.update(ratio=f"{ratio:.2f}x", target="ratio<=2x", met="yes" if ratio <= 2 else "no")
    return status, fields


def parity_fields(r: dict, args) -> tuple[str, dict]:
    kernels = ",".join(f"{name}:{k['err']:.1e}" if "err" in k else f"{name}:{'n/a' if 'skipped' in k else 'error'}"
                       for name, k in r["kernels"].items())
    fields = {"fp32_err": f"{r['fp32_err']:.2e}", "fp32_tol": f"{r['fp32_tol']:.0e}",
              "bf16_ours_vs_diffusers": f"{r['bf16_ours_vs_diffusers']:.2e}",
              "bf16_ours_vs_fp32": f"{r['bf16_ours_vs_fp32']:.2e}",
              "bf16_diffusers_vs_fp32": f"{r['bf16_diffusers_vs_fp32']:.2e}", "bf16_tol": f"{r['bf16_bound']:.2e}",
              "shape": f"{r['dim']}x{r['heads']}h,ffn{r['ffn_dim']},{r['blocks']}blocks,{r['tokens']}tok"}
    if kernels:
        fields["kernels"] = kernels
    over = (["fp32"] if r["fp32_err"] > r["fp32_tol"] else []) + \
        (["bf16"] if r["bf16_ours_vs_fp32"] > r["bf16_bound"] else []) + \
        [name for name, k in r["kernels"].items() if not k.get("ok", True)]
    if over:
        fields["reason"] = f"over its bound or failed: {', '.join(over)}"
    return ("OK" if r["ok"] else "FAIL"), fields


def fp8_fields(r: dict, args) -> tuple[str, dict]:
    rows = r["rows"]

    def worst(key: str) -> float:
        return max(row[key] for row in rows if key in row)

    fields = {"weight_err": f"{worst('per_tensor_weight_err'):.4f}",
              "out_err": f"{worst('per_tensor_out_err'):.4f}",
              "out_err_per_channel": f"{worst('per_channel_out_err'):.4f}",
              "out_err_unscaled": f"{worst('unscaled_out_err'):.4f}", "bound": r["bound"],
              "scaled_mm": "yes" if r["scaled_mm"] else "n/a"}
    if any("per_tensor_scaled_mm_out_err" in row for row in rows):
        fields["out_err_scaled_mm"] = f"{worst('per_tensor_scaled_mm_out_err'):.4f}"
        fields["mm_ms_bf16_vs_fp8"] = "/".join(f"{row['bf16_ms']:.2f}:{row['per_tensor_scaled_mm_ms']:.2f}"
                                               for row in rows)
    if r["scaled_mm_fell_back"]:
        fields["reason"] = "torch._scaled_mm failed and fell back to dequantising"
    return ("OK" if r["ok"] else "FAIL"), fields


def env_fields(r: dict, args) -> tuple[str, dict]:
    fields = {"torch": r["torch"], "device": r["device_name"], "capability": r["capability"],
              "memory_gib": _gib(r["memory_gib"]), "optional": ",".join(r["optional"]) or "none",
              "missing": ",".join(r["missing"]) or "none"}
    reasons = []
    if not r["dry_run"] and not r["cuda"]:
        reasons.append("no CUDA device (use --dry-run on a CPU machine)")
    if r["missing"]:
        reasons.append(f"missing {', '.join(r['missing'])}: carry their wheels (bash tools/gpu_check.sh "
                       "--fetch-wheels .whl on a machine with a registry, then --wheels .whl here)")
    if reasons:
        fields["reason"] = "; ".join(reasons)
    return ("FAIL" if reasons else "OK"), fields


def render_fields(r: dict, args) -> tuple[str, dict]:
    return "OK", {"device": r["device"], "model": r["model"], "seconds": f"{r['seconds']:.1f}",
                  "files": ",".join(r["files"])}


def load_fields(r: dict, args) -> tuple[str, dict]:
    """`tools/benchmark_loading.py --json`: the medians of every mode, the main load against the raw read of the
    same file (target <= 1.5x) and, on a GPU, the staged load against per-tensor `.to()`."""
    modes = r["modes"]
    main = next(m for m in ("cuda", "load") if m in modes)
    fields = {"file_gib": f"{r['file_gib']:.2f}", "cast": f"{r['dtype']}->{r['load_dtype']}",
              **{f"{m}_s": f"{v['median_s']:.3f}" for m, v in modes.items()}}
    if "cuda_to" in modes:
        fields["staged_speedup"] = f"{modes['cuda_to']['median_s'] / modes['cuda']['median_s']:.2f}x"
        fields["peak_vram_gib"] = _gib(modes["cuda"].get("peak_vram_gib"))
    ratio = modes[main]["median_s"] / modes["raw"]["median_s"]
    fields.update(ratio=f"{ratio:.2f}x({main})", target="ratio<=1.5x", met="yes" if ratio <= 1.5 else "no")
    if not all(v["median_s"] > 0 and math.isfinite(v["median_s"]) for v in modes.values()):
        return "FAIL", {**fields, "reason": "a mode has no positive time"}
    return "OK", fields


KINDS = {"bench": bench_fields, "parity": parity_fields, "fp8": fp8_fields, "env": env_fields,
         "render": render_fields, "load": load_fields}


def _load(path: Path | None) -> dict | None:
    try:
        return json.loads(path.read_text()) if path else None
    except (OSError, ValueError):
        return None


def result_line(args) -> str:
    fields = dict(f.split("=", 1) for f in args.field)
    if args.status:  # decided by the script (SKIP, or no time left)
        return format_line(args.step, args.status, {**fields, "reason": args.reason or "none given"})
    result = _load(Path(args.json)) if args.json else None
    log = Path(args.log) if args.log else None
    if args.rc != 0 and not (args.rc == 1 and result is not None and args.kind in ("parity", "fp8")):
        return format_line(args.step, "FAIL", {**fields, "reason": failure_reason(args.rc, args.limit, log)})
    if result is None:
        return format_line(args.step, "FAIL", {**fields, "reason": f"no result file {args.json}"})
    try:
        status, more = KINDS[args.kind](result, args)
    except (KeyError, TypeError, ValueError) as exc:
        return format_line(args.step, "FAIL", {**fields, "reason": f"unreadable result {args.json}: {exc!r}"})
    if args.seconds is not None:
        more["wall_s"] = f"{args.seconds:g}"
    return format_line(args.step, status, {**fields, **more})


# ---- the steps done here ---------------------------------------------------------------------------------


def probe_env(dry_run: bool) -> dict:
    """torch, the GPU, the optional packages installed (attention kernels, bitsandbytes) and the packages
    the other steps need."""
    import torch

    cuda = torch.cuda.is_available()
    props = torch.cuda.get_device_properties(0) if cuda else None
    return {
        "torch": torch.__version__, "cuda": cuda, "dry_run": dry_run,
        "device_name": props.name if cuda else "cpu",
        "capability": ".".join(map(str, torch.cuda.get_device_capability(0))) if cuda else "n/a",
        "memory_gib": props.total_memory / 2**30 if cuda else None,
        "optional": [m for m in OPTIONAL if importlib.util.find_spec(m) is not None],
        "missing": [m for m in REQUIRED if importlib.util.find_spec(m) is None],
    }


def render(device: str, work: Path, task: str = "t2v-tiny") -> dict:
    """One video through `generate_video_wan.py` from a tiny random-weight model set (no real weights
    exist on the machine), checking that the MP4, the contact sheet and the sidecar were written."""
    from library.wan.tiny import write_tiny_model_set

    models = write_tiny_model_set(work / "models", task)
    out = work / "render"
    cmd = [sys.executable, str(REPO / "generate_video_wan.py"), "--task", task, "--dit", str(models.dit),
           "--vae", str(models.vae), "--t5", str(models.t5), "--device", device, "--seed", "1",
           "--prompt", "a red car drives along a river at sunset", "--output_dir", str(out),
           "--output_name", "gpu_check"]
    if models.dit_high_noise:
        cmd[6:6] = ["--dit_high_noise", str(models.dit_high_noise)]
    print("$", " ".join(shlex.quote(c) for c in cmd), flush=True)
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    seconds = time.perf_counter() - start
    print(proc.stdout + proc.stderr, flush=True)
    if proc.returncode:
        last = [s for s in proc.stderr.splitlines() if s.strip()][-1:] or ["no output"]
        raise RuntimeError(f"generate_video_wan.py failed (exit {proc.returncode}): {last[0][:200]}")
    files = sorted(p.suffix.lstrip(".") for p in out.glob("gpu_check_*") if p.stat().st_size > 0)
    missing = {"mp4", "png", "json"} - set(files)
    if missing:
        raise RuntimeError(f"the render wrote no {', '.join(sorted(missing))} file in {out}")
    sidecar = json.loads(next(out.glob("gpu_check_*.json")).read_text())
    if sidecar["models"]["device"] != device:
        raise RuntimeError(f"the render ran on {sidecar['models']['device']}, not on {device}")
    return {"device": device, "model": f"{task} random weights", "seconds": seconds, "files": files}


def summary(results: Path, seconds: float | None) -> tuple[str, int]:
    """The last line: counts, the figures the targets need, and the exit code (1 when a step failed)."""
    rows = [parse_line(s) for s in results.read_text().splitlines() if s.startswith(PREFIX + " ")]
    counts = {s: sum(1 for _, st, _ in rows if st == s) for s in ("OK", "FAIL", "SKIP")}
    errs = [float(f["planner_err"].rstrip("%")) for _, _, f in rows if f.get("planner_err", "n/a") != "n/a"]
    mfus = [(float(f["mfu"].rstrip("%")), s) for s, _, f in rows  # the steps judged by the MFU target
            if f.get("target", "").startswith("mfu") and f.get("mfu", "n/a") != "n/a"]
    fields = {"ok": counts["OK"], "fail": counts["FAIL"], "skip": counts["SKIP"],
              "planner_max_abs_err": f"{max(errs, key=abs):+.1f}%" if errs else "n/a",
              "best_mfu": f"{max(mfus)[0]:.1f}%({max(mfus)[1]})" if mfus else "n/a"}
    if counts["FAIL"]:
        fields["failed"] = ",".join(s for s, st, _ in rows if st == "FAIL")
    if seconds is not None:
        fields["wall_s"] = f"{seconds:g}"
    return format_line("summary", "FAIL" if counts["FAIL"] else "OK", fields), 1 if counts["FAIL"] else 0


# ---- command line ----------------------------------------------------------------------------------------


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    e = sub.add_parser("env", help="probe torch, the GPU and the packages the steps need")
    e.add_argument("--json", required=True)
    e.add_argument("--dry_run", action="store_true")
    r = sub.add_parser("render", help="render one video from a tiny random model set")
    r.add_argument("--device", default="cuda")
    r.add_argument("--work", required=True, help="folder for the model set and the video")
    r.add_argument("--json", required=True)
    ln = sub.add_parser("line", help="print a step's result line")
    ln.add_argument("step")
    ln.add_argument("kind", nargs="?", default="bench", choices=sorted(KINDS))
    ln.add_argument("--rc", type=int, default=0, help="the step's exit code")
    ln.add_argument("--log", help="the step's output")
    ln.add_argument("--json", help="the step's result file")
    ln.add_argument("--seconds", type=float, help="wall time of the step")
    ln.add_argument("--limit", type=float, help="the step's timeout in seconds")
    ln.add_argument("--status", choices=("SKIP", "FAIL"), help="decided without running (with --reason)")
    ln.add_argument("--reason")
    ln.add_argument("--baseline", help="bench: uncapped result to compare the step time with (target <= 2x)")
    ln.add_argument("--cap", type=float, help="bench: the GiB cap the peak must stay under")
    ln.add_argument("--target_mfu", type=float, help="bench: MFU target as a fraction (0.45)")
    ln.add_argument("--field", action="append", default=[], metavar="KEY=VALUE", help="extra field to print")
    s = sub.add_parser("summary", help="the summary line of a results file; exit 1 when a step failed")
    s.add_argument("results")
    s.add_argument("--seconds", type=float)
    h = sub.add_parser("has", help="exit 0 when a Python module is installed")
    h.add_argument("module")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.command == "has":
        try:
            return 0 if importlib.util.find_spec(args.module) is not None else 1
        except (ImportError, ValueError):
            return 1
    if args.command == "line":
        bad = [f for f in args.field if "=" not in f]
        if bad:
            print(f"--field {bad[0]}: write KEY=VALUE", file=sys.stderr)
            return 2
        print(result_line(args))
        return 0
    if args.command == "summary":
        if not Path(args.results).is_file():
            print(f"{args.results}: no such results file", file=sys.stderr)
            return 2
        line, code = summary(Path(args.results), args.seconds)
        print(line)
        return code
    if args.command == "env":
        result = probe_env(args.dry_run)
    else:
        try:
            result = render(args.device, Path(args.work))
        except RuntimeError as exc:  # the step failed: say why in one line (the output is above)
            print(exc, file=sys.stderr)
            return 1
    print(json.dumps(result, indent=2))
    Path(args.json).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

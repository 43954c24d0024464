"""The step estimate beside the measurement: for every `tools/benchmark_wan.py --json` result in the given
files or folders (what `tools/gpu_check.sh --out DIR` leaves in DIR), the roofline estimate of the same step
(`estimate_argv` in the result: the shapes, attention, compilation and memory settings the run applied) on the
rates of the GPU it ran on, and the estimate's error. Runs on the CPU, after the GPU run, so the device's time
goes to measuring; the table goes into docs/benchmarks.md and the errors say which rates
(`library/training/gpu_rates.py`) to correct.

    python tools/estimate_error.py gpu_check_out/            # every result in the folder
    python tools/estimate_error.py run.json --gpu h100       # rates of another GPU (or for a CPU test run)
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import sys
import tempfile
from pathlib import Path


def _results(paths: list[str]) -> list[tuple[Path, dict]]:
    found = []
    for path in map(Path, paths):
        for file in sorted(path.glob("*.json")) if path.is_dir() else [path]:
            try:
                result = json.loads(file.read_text())
            except (OSError, ValueError) as exc:
                raise SystemExit(f"estimate_error: cannot read {file}: {exc}") from None
            if isinstance(result, dict) and "estimate_argv" in result and "seconds_per_step" in result:
                found.append((file, result))
    return found


def compare(result: dict, gpu: str | None) -> dict:
    """The estimate of `result`'s step on `gpu` (default: the GPU it ran on) and the estimate's error."""
    import benchmark_wan

    key = gpu or result.get("gpu")
    if key is None:
        return {"error": f"no rates for {result.get('device_name', 'this device')} (pass --gpu)"}
    with tempfile.TemporaryDirectory() as tmp, contextlib.redirect_stdout(io.StringIO()):
        code = benchmark_wan.main(["--estimate", "--gpu", key, "--json", f"{tmp}/e.json", *result["estimate_argv"]])
        estimate = json.loads(Path(f"{tmp}/e.json").read_text()) if code == 0 else None
    if estimate is None:
        return {"error": f"the estimate refused these settings (exit {code})"}
    measured, estimated = result["seconds_per_step"], estimate["seconds_per_step"]
    return {"gpu": key, "measured_s": measured, "estimated_s": estimated,
            "error": f"{100 * (estimated / measured - 1):+.1f}%", "measured_mfu": result.get("mfu"),
            "estimated_mfu": estimate["mfu"], "setup": result.get("setup", "")}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("paths", nargs="+", help="benchmark_wan --json results, or folders of them")
    p.add_argument("--gpu", choices=("h100", "h200", "a100", "4090", "5090"), help="rates to use (default: the run's)")
    p.add_argument("--json", help="write the rows here too")
    args = p.parse_args(argv)
    results = _results(args.paths)
    if not results:
        print("estimate_error: no benchmark_wan --json result with estimate_argv found", file=sys.stderr)
        return 2
    rows = []
    print("| result | GPU | measured s/step | estimated s/step | estimate's error | MFU measured / estimated |")
    print("|---|---|---|---|---|---|")
    for file, result in results:
        row = {"file": file.name, **compare(result, args.gpu)}
        rows.append(row)
        if "estimated_s" not in row:
            print(f"| {file.name} | - | {result['seconds_per_step']:.3f} | - | {row['error']} | - |")
            continue
        mfu = "n/a" if row["measured_mfu"] is None else f"{100 * row['measured_mfu']:.1f}%"
        print(f"| {file.name} | {row['gpu']} | {row['measured_s']:.3f} | {row['estimated_s']:.3g} | {row['error']} "
              f"| {mfu} / {100 * row['estimated_mfu']:.1f}% |")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""tools/gpu_check.sh: its CPU dry run runs every step on the tiny variants and prints one OK line each (SKIP
for optional kernels, with a reason); a failed step is a FAIL line and the run goes on; the exit code says
whether any step failed; bad arguments are clear errors. Also the result lines a GPU run makes, from result
files shaped like a GPU run's, and `tools/benchmark_wan.py --sdpa_kernel`, which the script uses."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tools.gpu_check import format_line, parse_args, parse_line, result_line

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "tools" / "gpu_check.sh"
STEPS = ["env", "parity", "lora_sdpa", "lora_cap24", "ti2v_cap24", "fp8", "render", "load", "full_ti2v",
         "lora_cudnn", "two_experts", "lora_compile"]
OPTIONAL = ["lora_flash_attn", "lora_flash3", "lora_xformers"]

pytestmark = pytest.mark.skipif(shutil.which("bash") is None or shutil.which("timeout") is None,
                                reason="needs bash and coreutils' timeout")


def run_check(*args: str, env: dict | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(SCRIPT), *args], check=False, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "PYTHON": sys.executable, **(env or {})}, cwd=REPO)


def result_lines(text: str) -> dict[str, tuple[str, dict]]:
    rows = [parse_line(s) for s in text.splitlines() if s.startswith("gpu_check ")]
    return {step: (status, fields) for step, status, fields in rows}


@pytest.mark.slow
def test_dry_run_runs_every_step(tmp_path):
    out = tmp_path / "out"
    proc = run_check("--dry-run", "--out", str(out))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = result_lines(proc.stdout)
    for step in STEPS:
        status, fields = lines[step]
        assert status == "OK", f"{step}: {status} {fields}"
    for step in OPTIONAL:
        status, fields = lines[step]
        assert status in ("OK", "SKIP") and (status == "OK" or fields["reason"]), (step, fields)
    assert lines["summary"][0] == "OK" and lines["summary"][1]["fail"] == "0"
    # the figures each target needs are there
    assert float(lines["parity"][1]["fp32_err"]) <= float(lines["parity"][1]["fp32_tol"])
    assert lines["lora_cap24"][1]["ratio"].endswith("x") and lines["lora_cap24"][1]["settings"].startswith("fp8")
    assert lines["ti2v_cap24"][1]["settings"].startswith("fp8") and lines["lora_cudnn"][1]["sdpa_kernel"] == "math"
    assert float(lines["fp8"][1]["out_err"]) < float(lines["fp8"][1]["bound"])
    assert lines["render"][1]["files"] == "json,mp4,png" and lines["render"][1]["device"] == "cpu"
    assert float(lines["load"][1]["host_s"]) > 0 and lines["load"][1]["ratio"].endswith("x(load)")
    assert float(lines["two_experts"][1]["host_peak_gib"]) > 0 and lines["lora_compile"][1]["backend"] == "aot_eager"
    # --out holds the same lines and every step's full output
    saved = (out / "results.txt").read_text()
    assert result_lines(saved) == lines
    log = (out / "steps.log").read_text()
    assert all(f"===== gpu_check {step} OK" in log for step in STEPS)
    assert "tools/benchmark_wan.py --cpu --vram_cap_gb 0.2 --plan" in log


def test_failed_step_is_reported_and_the_run_goes_on(tmp_path):
    fake = tmp_path / "site"  # a diffusers that cannot be imported: parity fails, fp8 still runs
    fake.mkdir()
    (fake / "diffusers.py").write_text("raise ImportError('diffusers is blocked by this test')\n")
    env = {"PYTHONPATH": f"{fake}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    proc = run_check("--dry-run", "--only", "parity,fp8", "--out", str(tmp_path / "out"), env=env)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    lines = result_lines(proc.stdout)
    assert set(lines) == {"parity", "fp8", "summary"}
    assert lines["parity"][0] == "FAIL" and "needs diffusers" in lines["parity"][1]["reason"]
    assert lines["parity"][1]["reason"].startswith("exit 2:")
    assert lines["fp8"][0] == "OK"
    assert lines["summary"][0] == "FAIL" and lines["summary"][1]["failed"] == "parity"


def test_no_time_left_is_a_failure(tmp_path):
    proc = run_check("--dry-run", "--only", "env,fp8", "--budget", "1")
    assert proc.returncode == 1
    lines = result_lines(proc.stdout)
    assert lines["env"][0] == lines["fp8"][0] == "FAIL"
    assert "no time left of the 1 s budget" in lines["fp8"][1]["reason"]


@pytest.mark.parametrize("args, message", [
    (["--only", "lora_sdpa,warp"], "--only: unknown step 'warp'"),
    (["--budget", "soon"], "--budget soon: give whole seconds"),
    (["--frobnicate"], "unknown argument '--frobnicate'"),
])
def test_bad_arguments_are_clear_errors(args, message):
    proc = run_check("--dry-run", *args, timeout=60)
    assert proc.returncode == 2 and message in proc.stderr and "Traceback" not in proc.stderr
    assert "gpu_check " not in proc.stdout


def test_result_lines_round_trip_and_timeouts_are_named(tmp_path):
    line = format_line("x", "FAIL", {"reason": 'a "quoted" reason', "n": 3, "empty": ""})
    assert parse_line(line) == ("x", "FAIL", {"reason": "a 'quoted' reason", "n": "3", "empty": ""})
    log = tmp_path / "x.log"
    log.write_text("step 1\n")
    args = parse_args(["line", "lora_sdpa", "bench", "--rc", "124", "--limit", "150", "--log", str(log),
                       "--json", str(tmp_path / "none.json")])
    assert parse_line(result_line(args))[2]["reason"] == "timed out after 150 s"
    log.write_text("Traceback (most recent call last):\ntorch.OutOfMemoryError: CUDA out of memory.\n")
    args = parse_args(["line", "lora_sdpa", "bench", "--rc", "1", "--log", str(log)])
    assert parse_line(result_line(args))[2]["reason"] == "exit 1: torch.OutOfMemoryError: CUDA out of memory."


def test_gpu_figures_targets_and_summary(tmp_path):
    """The branches only a GPU run reaches, on result files shaped like a GPU run's."""
    import json

    from tools.gpu_check import summary

    def bench(name, seconds, peak, planned, mfu):
        path = tmp_path / f"{name}.json"
        path.write_text(json.dumps({"seconds_per_step": seconds, "peak_vram_gib": peak, "planned_gib": planned,
                                    "mfu": mfu, "host_peak_rss_gib": 40.0, "losses": [1.0, 0.9],
                                    "setup": "memory on cuda:0: fp8 (per-tensor scaled): 280 Linear layers; "
                                             "checkpointing on (activations offloaded); 34 blocks swapped"}))
        return str(path)

    base = bench("base", 10.0, 60.0, 69.0, 0.47)
    sdpa = ["line", "lora_sdpa", "--json", base, "--target_mfu", "0.45"]
    line = result_line(parse_args(sdpa))
    _, status, f = parse_line(line)
    assert status == "OK" and f["mfu"] == "47.0%" and f["met"] == "yes" and f["planner_err"] == "+15.0%"
    capped = bench("capped", 25.0, 21.0, 22.0, 0.19)
    args = ["line", "lora_cap24", "--json", capped, "--cap", "24", "--baseline", base]
    _, status, f = parse_line(result_line(parse_args(args)))
    assert status == "OK" and f["ratio"] == "2.50x" and f["met"] == "no" and f["settings"] == "fp8+ckpt+offload+swap34"
    over = bench("over", 25.0, 24.5, 22.0, 0.19)
    _, status, f = parse_line(result_line(parse_args(["line", "ti2v_cap24", "--json", over, "--cap", "24"])))
    assert status == "FAIL" and f["reason"] == "peak 24.50 GiB over the 24 GiB cap"
    results = tmp_path / "results.txt"
    results.write_text("# header\n" + "\n".join(result_line(parse_args(a)) for a in (
        sdpa, ["line", "lora_cap24", "--json", capped],
        ["line", "ti2v_cap24", "--json", over, "--cap", "24"],
        ["line", "lora_flash3", "--status", "SKIP", "--reason", "absent"])))
    line, code = summary(results, 300)
    _, status, f = parse_line(line)
    assert code == 1 and status == "FAIL" and f["failed"] == "ti2v_cap24" and f["skip"] == "1"
    assert f["planner_max_abs_err"] == "+15.0%" and f["best_mfu"] == "47.0%(lora_sdpa)"


def test_benchmark_sdpa_kernel_needs_sdpa(capsys):
    from tools.benchmark_wan import main

    assert main(["--cpu", "--sdpa_kernel", "cudnn", "--attention", "flash_attn"]) == 2
    assert "cannot be combined with --attention flash_attn" in capsys.readouterr().err


def test_load_line_of_a_gpu_run(tmp_path):
    """The `load` line from a result shaped like `benchmark_loading.py --device cuda --staged_host --json`."""
    import json

    def mode(seconds, **more):
        return {"median_s": seconds, "best_s": seconds, "runs_s": [seconds], "peak_rss_gib": 1.0, **more}

    path = tmp_path / "load.json"
    path.write_text(json.dumps({"device": "cuda", "variant": "t2v-1.3B", "file_gib": 5.29, "dtype": "fp32",
                                "load_dtype": "bf16", "params": 1.42e9, "load_average": [[1, 1, 1], [1, 1, 1]],
                                "modes": {"raw": mode(0.5), "cuda": mode(0.7, peak_vram_gib=2.65),
                                          "cuda_to": mode(2.1, peak_vram_gib=2.65), "host": mode(0.3),
                                          "host_copy": mode(0.9)}}))
    _, status, f = parse_line(result_line(parse_args(["line", "load", "load", "--json", str(path)])))
    assert status == "OK" and f["staged_speedup"] == "3.00x" and f["ratio"] == "1.40x(cuda)" and f["met"] == "yes"
    assert f["cuda_to_s"] == "2.100" and f["peak_vram_gib"] == "2.65" and f["cast"] == "fp32->bf16"


def test_loading_benchmark_fresh_pages_and_no_cuda(tmp_path):
    import torch

    from library.errors import UserError
    from tools.benchmark_loading import child_pages, main, write_checkpoint

    write_checkpoint("t2v-tiny", "fp32", tmp_path / "tiny.safetensors")
    pages = child_pages(str(tmp_path / "tiny.safetensors"), "bf16")
    assert pages["seconds"] > 0 and pages["reused_seconds"] > 0 and pages["peak_rss"] > 0
    if not torch.cuda.is_available():
        with pytest.raises(UserError, match="--device cuda: no CUDA device here"):
            main(["--device", "cuda", "--dir", str(tmp_path)])

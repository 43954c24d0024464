"""Entry scripts run from a fresh clone and always import this repo's `library`, even when another
package named `library` (sd-scripts installs one) comes first on the path."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.helpers import REPO


@pytest.fixture()
def impostor_env(tmp_path):
    """PYTHONPATH with a foreign `library` package first, as after `pip install sd-scripts`."""
    fake = tmp_path / "site" / "library"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("raise ImportError('the wrong library package was imported')\n")
    env = dict(os.environ, PYTHONPATH=str(tmp_path / "site"))
    return env


def run(args, env, cwd):
    out = subprocess.run([sys.executable, *args], env=env, cwd=cwd, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout


def test_library_resolves_inside_the_repo(impostor_env, tmp_path):
    code = ("import runpy, sys; sys.argv = ['x', '--help']; "
            f"runpy.run_path({str(REPO / 'demo.py')!r}, run_name='not_main'); "
            "import library; print(library.__file__)")
    printed = run(["-c", code], impostor_env, tmp_path).strip().splitlines()[-1]
    assert printed.startswith(str(REPO)), printed


@pytest.mark.slow
def test_demo_trains_a_lora_end_to_end(impostor_env, tmp_path):
    """README command 1: tiny models, synthetic data, the real caching tools and train_network_wan.py."""
    out = run([str(REPO / "demo.py"), "--output", str(tmp_path / "demo"), "--steps", "6"], impostor_env, tmp_path)
    assert "done in" in out
    train = tmp_path / "demo" / "train"
    for expert in ("high_noise", "low_noise"):
        assert (train / f"demo_lora_{expert}.safetensors").stat().st_size > 1000
    assert (train / "loss.png").exists() and (train / "demo_lora_config.toml").exists()
    report = (train / "report.html").read_text()  # with the strength sweep, added after training
    assert "before the first step (baseline)" in report and "strength_sweep/demo_sweep_cells/" in report
    sweep = (tmp_path / "demo" / "sweep" / "sweep.html").read_text()
    assert sweep.count("/report.html'>learning_rate-") == 3 and "ranked by best validation loss" in sweep
    assert "2 WARN, 0 ERROR" in out  # check_lora: a 6-step LoRA is "too few steps", nothing wrong
    assert "<- test first" in out  # pick_checkpoint
    notes = list((tmp_path / "demo" / "registry").rglob("training_notes.md"))
    assert len(notes) == 1 and "v1" in notes[0].read_text()


def test_loading_benchmark_runs_on_a_tiny_variant(impostor_env, tmp_path):
    out = run([str(REPO / "tools" / "benchmark_loading.py"), "--variant", "t2v-tiny", "--repeats", "1",
               "--dir", str(tmp_path)], impostor_env, tmp_path)
    assert "load time / raw read" in out and "peak RSS / file size" in out

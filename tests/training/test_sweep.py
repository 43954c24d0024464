"""tools/sweep.py: the plan (the guide's A/B variants, --vary grids, --set winning, a bad key refused before
any training) and a 3-variant sweep of the tiny model killed in the middle of its second variant: run
again, the first variant is skipped untouched, the second resumes from its state, the third trains."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from library.config import ConfigError
from library.evaluation.sweep import DONE_FILE, grid_variants, make_plan, preset_variants
from library.guide import AB_TEST
from tests.helpers import REPO


def test_preset_variants_are_the_guides_table():
    variants = preset_variants([], base_dim=32, base_alpha=32)
    assert [v.name for v in variants] == ["conservative", "standard", "aggressive"]
    assert variants[0].overrides == {"learning_rate": "8e-05", "network_dim": "64", "max_train_epochs": "12",
                                     "network_alpha": "64"}
    assert {v.name: float(v.overrides["learning_rate"]) for v in variants} == {
        k: v["learning_rate"] for k, v in AB_TEST.items()}
    assert "network_alpha" not in preset_variants(["aggressive"], base_dim=32, base_alpha=16)[0].overrides
    with pytest.raises(ConfigError, match="unknown variant"):
        preset_variants(["bold"], 32, 32)


def test_grid_is_every_combination():
    variants = grid_variants(["learning_rate=5e-5,1e-4", "network_dim=16,32"])
    assert [v.name for v in variants] == ["learning_rate-5e-5_network_dim-16", "learning_rate-5e-5_network_dim-32",
                                          "learning_rate-1e-4_network_dim-16", "learning_rate-1e-4_network_dim-32"]
    assert variants[1].flags() == ["--learning_rate", "5e-5", "--network_dim", "32"]
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        grid_variants(["learning_rate"])


@pytest.fixture(scope="module")
def base_toml(tmp_path_factory):
    from library.data.dataset_config import load_dataset_config
    from library.data.latent_caching import cache_latents
    from library.data.text_caching import cache_text_encoder_outputs
    from library.prep.demo_dataset import write_demo_dataset
    from library.wan.tiny import write_tiny_model_set

    root = tmp_path_factory.mktemp("sweep")
    models = write_tiny_model_set(root / "models", "t2v-tiny")
    toml = write_demo_dataset(root / "data", clips=2, images=2, width=32, height=32, frames=9)
    config = load_dataset_config(toml)
    cache_latents(config, models.vae, task="t2v-tiny", progress=False)
    cache_text_encoder_outputs(config, models.t5, tokenizer=models.tokenizer, dtype=torch.float32, progress=False)
    settings = {"task": "t2v-tiny", "dit": str(models.dit), "dit_high_noise": str(models.dit_high_noise),
                "dataset_config": str(toml), "output_dir": str(root / "out"), "output_name": "lora",
                "network_dim": 4, "network_alpha": 4, "learning_rate": 1e-3, "optimizer_type": "AdamW",
                "max_train_steps": 10, "save_every_n_steps": 2, "seed": 3, "max_data_loader_n_workers": 0}
    base = root / "base.toml"
    base.write_text("".join(f"{k} = {json.dumps(v)}\n" for k, v in settings.items()))
    return base


def test_plan_checks_every_variant_before_training(base_toml):
    plan = make_plan(str(base_toml), None, None, ["learning_rate=1e-3,2e-3"], ["max_train_steps=3"])
    assert plan.root == base_toml.parent / "out" and [v.name for v in plan.variants] == [
        "learning_rate-1e-3", "learning_rate-2e-3"]
    assert plan.variant_args(plan.variants[0])[:4] == ["--config_file", str(base_toml), "--max_train_steps", "3"]
    a = make_plan(str(base_toml), None, [], [], ["max_train_epochs=1"])  # --set wins over the preset's epochs
    assert all("max_train_epochs" not in v.overrides for v in a.variants)
    with pytest.raises(ConfigError, match="learning_rat"):
        make_plan(str(base_toml), None, None, ["learning_rat=1e-3"], [])
    with pytest.raises(ConfigError, match="sweep variant learning_rate-fast"):
        make_plan(str(base_toml), None, None, ["learning_rate=fast"], [])


def _files(folder: Path) -> dict[str, float]:
    return {str(p.relative_to(folder)): p.stat().st_mtime_ns for p in folder.rglob("*") if p.is_file()}


@pytest.mark.slow
def test_a_killed_sweep_resumes_where_it_stopped(base_toml, tmp_path):
    root = tmp_path / "sweep"
    cmd = [sys.executable, str(REPO / "tools" / "sweep.py"), "--config_file", str(base_toml), "--output_dir",
           str(root), "--vary", "learning_rate=1e-3,2e-3,4e-3"]
    first = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    second_state = root / "learning_rate-2e-3" / "lora-step00000002-state"
    deadline = time.monotonic() + 240
    try:
        while not (second_state / "training_state.pt").exists() and first.poll() is None:
            assert time.monotonic() < deadline, "the sweep did not reach the second variant's first save"
            time.sleep(0.02)
    finally:
        os.killpg(first.pid, signal.SIGKILL)  # the sweep and its training, mid-run
        first.wait()
    assert (root / "learning_rate-1e-3" / DONE_FILE).is_file()
    assert not (root / "learning_rate-2e-3" / DONE_FILE).exists(), "the second variant finished before the kill"
    untouched = _files(root / "learning_rate-1e-3")

    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "learning_rate-1e-3 is finished; skipped" in out.stderr
    assert _files(root / "learning_rate-1e-3") == untouched  # not one file of the finished variant rewritten
    resumed = [line for line in out.stderr.splitlines() if "resumed at step" in line]
    assert len(resumed) == 1 and "resuming learning_rate-2e-3" in out.stderr
    step = int(resumed[0].split("resumed at step ")[1].split()[0])
    assert 2 <= step < 10
    for name in ("learning_rate-2e-3", "learning_rate-4e-3"):
        folder = root / name
        assert (folder / DONE_FILE).is_file() and (folder / "lora_low_noise.safetensors").is_file()
        steps = [int(line.split(",")[0]) for line in (folder / "loss.csv").read_text().splitlines()[1:]]
        assert steps == list(range(1, 11))  # every step once, across the kill
    page = (root / "sweep.html").read_text()
    assert all(f"{name}/report.html" in page for name in ("learning_rate-1e-3", "learning_rate-2e-3",
                                                          "learning_rate-4e-3"))


FAKE_TRAINER = """import os, sys, time
out = sys.argv[sys.argv.index("--output_dir") + 1]
open(os.path.join(out, "gpu.txt"), "w").write(os.environ.get("CUDA_VISIBLE_DEVICES", ""))
print("training in", out, "resume" if "--resume" in sys.argv else "fresh")
time.sleep(0.3)
sys.exit(3 if "fail" in out and not os.path.exists(os.path.join(out, "fixed")) else 0)
"""


def test_one_variant_per_gpu_and_a_failed_one_rerun(tmp_path):
    """--gpus: each training sees one GPU (CUDA_VISIBLE_DEVICES), side by side, output in its train.log; a
    variant that fails is reported and, on the next run, trained again while the finished ones are skipped."""
    from library.evaluation.sweep import LOG_FILE, SweepPlan, Variant, run_sweep

    fake = tmp_path / "fake_trainer.py"
    fake.write_text(FAKE_TRAINER)
    plan = SweepPlan(tmp_path / "sweep", [], [Variant(n, {}) for n in ("a", "b", "fail", "c")], "lora")
    results = run_sweep(plan, [sys.executable, str(fake)], gpus=["0", "1"])
    assert results == {"a": 0, "b": 0, "fail": 3, "c": 0}
    for name in ("a", "b", "c"):
        folder = plan.root / name
        assert (folder / DONE_FILE).is_file() and (folder / "gpu.txt").read_text() in ("0", "1")
        assert "fresh" in (folder / LOG_FILE).read_text()
    assert not (plan.root / "fail" / DONE_FILE).exists()
    (plan.root / "fail" / "fixed").write_text("")
    before = (plan.root / "a" / DONE_FILE).stat().st_mtime_ns
    assert run_sweep(plan, [sys.executable, str(fake)], gpus=["0", "1"]) == {"a": 0, "b": 0, "c": 0, "fail": 0}
    assert (plan.root / "fail" / DONE_FILE).is_file() and (plan.root / "a" / DONE_FILE).stat().st_mtime_ns == before

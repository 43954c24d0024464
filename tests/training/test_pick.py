"""tools/pick_checkpoint.py: ranking a run's saves by validation loss, the overfitting note, the guide's
60-80% rule without validation, and the clear error for a folder without checkpoints."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_file

from library.evaluation.pick import format_report, rank_checkpoints
from tests.helpers import REPO


def _run_dir(tmp_path, steps=(200, 400, 600, 800, 1000), val: dict | None = None):
    for step in steps:
        for expert in ("high_noise", "low_noise"):
            save_file({"x.lora_down.weight": torch.zeros(1, 1)}, tmp_path / f"lo_{expert}-step{step:08d}.safetensors")
    rows = ["step,epoch,loss,avg_loss,lr,kind"]
    if val and 0 in val:
        rows.append(f"0,0,{val[0]},{val[0]},0.0001,val")
    for step in range(1, 1001):
        rows.append(f"{step},0,{1.0 - step / 2000:.6f},{1.0 - step / 2000:.6f},0.0001,train")
        if val and step in val and step:
            rows.append(f"{step},0,{val[step]},{val[step]},0.0001,val")
    (tmp_path / "loss.csv").write_text("\n".join(rows) + "\n")
    return tmp_path


def test_lowest_validation_loss_first_and_overfitting_reported(tmp_path):
    run = _run_dir(tmp_path, val={200: 0.50, 400: 0.45, 600: 0.40, 800: 0.44, 1000: 0.48})
    report = rank_checkpoints(run)
    assert [c.label for c in report.checkpoints] == [f"step {s}" for s in (200, 400, 600, 800, 1000)]
    assert report.recommended[0] == "step 600" and report.checkpoints[2].val_loss == 0.40
    assert report.checkpoints[2].files == ["lo_high_noise-step00000600.safetensors",
                                           "lo_low_noise-step00000600.safetensors"]
    assert any("rose 20% after step 600 while the training loss kept falling" in r for r in report.reasons)
    text = format_report(report)
    assert "<- test first" in text.splitlines()[3] and "compare_checkpoints.py" in text


def test_without_validation_the_60_to_80_percent_saves(tmp_path):
    report = rank_checkpoints(_run_dir(tmp_path))
    assert report.recommended == ["step 600", "step 800"]
    assert any("60-80% of training" in r for r in report.reasons)
    (tmp_path / "few").mkdir()
    few = rank_checkpoints(_run_dir(tmp_path / "few", steps=(500, 1000)))
    assert few.recommended == ["step 500", "step 1000"] and any("save more often" in r for r in few.reasons)


def test_cli(tmp_path):
    run = _run_dir(tmp_path, val={600: 0.3, 1000: 0.2})
    out = subprocess.run([sys.executable, str(REPO / "tools" / "pick_checkpoint.py"), str(run), "--json",
                          str(tmp_path / "r.json")], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert json.loads((tmp_path / "r.json").read_text())["recommended"][0] == "step 1000"
    empty = tmp_path / "empty"
    empty.mkdir()
    out = subprocess.run([sys.executable, str(REPO / "tools" / "pick_checkpoint.py"), str(empty)],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "no checkpoints" in out.stderr
    with pytest.raises(FileNotFoundError):
        rank_checkpoints(empty)


def test_the_drop_from_the_validation_baseline(tmp_path):
    """The validation loss before the first step (step 0) is the baseline every save reads against."""
    run = _run_dir(tmp_path, steps=(200, 400), val={0: 0.80, 200: 0.50, 400: 0.40})
    report = rank_checkpoints(run)
    assert report.baseline == 0.80
    assert report.checkpoints[1].val_drop == pytest.approx(0.5) and report.checkpoints[0].val_drop == pytest.approx(
        0.375)
    assert any("validation loss before training: 0.8000; step 400 is 50.0% lower" in r for r in report.reasons)
    assert "50.0%" in format_report(report).splitlines()[2]

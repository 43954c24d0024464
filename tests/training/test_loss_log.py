"""loss.csv and loss.png against resumes, kills and bad numbers: integer steps however often a run is
resumed (also when reading the float steps older versions wrote), a half-written last row left out with
one warning, appends that never leave half a line, non-finite losses outside averages and plots, and
checkpoint picking on such folders."""

from __future__ import annotations

import csv
import errno
import logging
import math
import os

import pytest
import torch
from safetensors.torch import save_file

from library.evaluation.pick import rank_checkpoints
from library.training import files
from library.training.files import DiskFullError
from library.training.logs import LossLog, read_loss_csv


def _rows(folder):
    with open(folder / "loss.csv", newline="") as f:
        return list(csv.DictReader(f))


def test_resumed_twice_keeps_integer_steps(tmp_path):
    log = LossLog(tmp_path, plot_seconds=0)
    for step in range(1, 11):
        log.add(step, step // 4, 1.0 / step, 1e-4)
    log.add(10, 2, 0.3, 1e-4, kind="val")
    first = LossLog(tmp_path, resume_step=8)
    for step in range(9, 13):
        first.add(step, 2, 1.0 / step, 1e-4)
    first.flush()
    second = LossLog(tmp_path, resume_step=12)  # crashed here before (int("1.0"))
    second.add(13, 3, 0.05, 1e-4)
    second.flush()
    rows = _rows(tmp_path)
    assert [r["step"] for r in rows] == [str(s) for s in range(1, 14)]  # the val row of step 10 was redone
    assert all(r["epoch"].isdigit() for r in rows)
    # the moving average continues from the last training row, not from a validation row
    assert second.rows[-1]["avg_loss"] == pytest.approx(0.98 * second.rows[-2]["avg_loss"] + 0.02 * 0.05)


def test_float_steps_of_older_versions_are_read(tmp_path):
    (tmp_path / "loss.csv").write_text("step,epoch,loss,avg_loss,lr,kind\n1.0,0.0,0.5,0.5,0.0001,train\n"
                                       "2.0,0.0,0.4,0.45,0.0001,train\n")
    rows, bad = read_loss_csv(tmp_path / "loss.csv")
    assert [r["step"] for r in rows] == [1, 2] and not bad
    LossLog(tmp_path, resume_step=2)
    assert [r["step"] for r in _rows(tmp_path)] == ["1", "2"]


@pytest.mark.parametrize("tail", ["5,1,0.21", "5,1,0.21,0.3,0.0001,tra", "5,1,0.21,0.3,0.0001,", "5,1,\x00\x00"])
def test_a_half_written_last_row_is_left_out_with_one_warning(tmp_path, caplog, tail):
    log = LossLog(tmp_path, plot_seconds=1e9)
    for step in range(1, 5):
        log.add(step, 0, 1.0 / step, 1e-4)
    log.flush()
    with open(tmp_path / "loss.csv", "a") as f:
        f.write(tail)  # killed in the middle of an append
    with caplog.at_level(logging.WARNING):
        resumed = LossLog(tmp_path, resume_step=5)
    warnings = [r for r in caplog.records if "unreadable row" in r.getMessage()]
    assert len(warnings) == 1 and "line(s) 6" in warnings[0].getMessage() and "the last one" in warnings[0].getMessage()
    assert [r["step"] for r in resumed.rows] == [1, 2, 3, 4]
    assert [r["step"] for r in _rows(tmp_path)] == ["1", "2", "3", "4"]
    assert (tmp_path / "loss.csv.bak").read_text().endswith(tail)  # what was there is kept


def test_a_failed_append_leaves_whole_lines(tmp_path, monkeypatch):
    log = LossLog(tmp_path, plot_seconds=1e9)
    log.add(1, 0, 0.5, 1e-4)
    log.flush()
    before = (tmp_path / "loss.csv").read_bytes()
    real_write = os.write

    def half_then_full(fd, data):  # the disk fills in the middle of the write
        real_write(fd, bytes(data[: len(data) // 2]))
        raise OSError(errno.ENOSPC, "No space left on device")

    log.add(2, 0, 0.4, 1e-4)
    monkeypatch.setattr(files.os, "write", half_then_full)
    with pytest.raises(DiskFullError, match=r"no space left on .*writing loss.csv needs about 1 KB"):
        log.flush()
    monkeypatch.undo()
    assert (tmp_path / "loss.csv").read_bytes() == before
    log.flush()  # the row is still pending and goes in once there is space
    assert [r["step"] for r in _rows(tmp_path)] == ["1", "2"]


def test_non_finite_losses_enter_no_average_and_no_plot(tmp_path):
    log = LossLog(tmp_path, plot_seconds=0)
    assert math.isnan(log.add(1, 0, float("nan"), 1e-4))  # no finite loss yet: the average is not a number
    assert not (tmp_path / "loss.png").exists()  # nothing to draw, and no error
    assert log.add(2, 0, 0.5, 1e-4) == 0.5
    assert log.add(3, 0, float("inf"), 1e-4) == 0.5
    assert log.add(4, 0, 0.5, 1e-4) == pytest.approx(0.5)
    log.add(4, 0, float("nan"), 1e-4, kind="val")
    log.add(5, 0, 1e308, 1e-4)  # finite, but the plot's range is not
    log.plot()
    assert (tmp_path / "loss.png").stat().st_size > 1000
    rows = _rows(tmp_path)
    assert [r["loss"] for r in rows][:3] == ["nan", "0.5", "inf"]  # the skipped steps are on record
    resumed = LossLog(tmp_path, resume_step=4)
    assert resumed.add(5, 0, 0.5, 1e-4) == pytest.approx(0.5)
    LossLog(tmp_path / "empty").plot()


def test_pick_checkpoint_reads_resumed_and_killed_runs(tmp_path):
    for step in (2, 4):
        save_file({"x.lora_down.weight": torch.zeros(1, 1)}, tmp_path / f"lo-step{step:08d}.safetensors")
    (tmp_path / "loss.csv").write_text(  # float steps (an older resumed run), a skipped step, a cut last row
        "step,epoch,loss,avg_loss,lr,kind\n1.0,0.0,0.5,0.5,0.0001,train\n2.0,0.0,nan,nan,0.0001,train\n"
        "3,0,0.4,0.45,0.0001,train\n3,0,0.6,0.6,0.0001,val\n4,0,0.3,0.4,0.0001,train\n5,0,0.")
    report = rank_checkpoints(tmp_path)
    assert [(c.step, c.train_loss, c.val_loss) for c in report.checkpoints] == [(2, 0.5, None), (4, 0.4, 0.6)]

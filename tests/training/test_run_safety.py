"""Whole training runs that are stopped, resumed, poisoned with NaN, crowded by a second trainer or run out
of disk: nothing done is lost, every stop is resumable, and each error says what was kept."""

from __future__ import annotations

import csv
import shutil

import pytest
import torch

from library.config import config_from_dict, validate
from library.training.files import DiskFullError
from library.training.lock import LOCK_NAME, OutputLockedError
from library.training.trainer import NonFiniteLossError, Trainer
from tests.helpers import REPO
from tests.training.test_trainer import lora, settings, train, workspace  # noqa: F401 - the module's fixture

EXPERTS = ("high_noise", "low_noise")


def rows(out) -> list[dict]:
    with open(out / "loss.csv", newline="") as f:
        return list(csv.DictReader(f))


def same_run(a, b) -> None:
    """Two runs ended with the same LoRA files and the same loss.csv (steps, epochs, losses, averages)."""
    ra, rb = rows(a), rows(b)
    assert [(r["step"], r["epoch"], r["kind"]) for r in ra] == [(r["step"], r["epoch"], r["kind"]) for r in rb]
    for key in ("loss", "avg_loss"):
        assert [float(r[key]) for r in ra] == pytest.approx([float(r[key]) for r in rb], rel=1e-6)
    for expert in EXPERTS:
        x, y = lora(a / f"lora_{expert}.safetensors"), lora(b / f"lora_{expert}.safetensors")
        assert x.keys() == y.keys()
        for key in x:
            torch.testing.assert_close(x[key], y[key], rtol=1e-5, atol=1e-7)


def stop_at(monkeypatch, step: int, error: type = KeyboardInterrupt):
    original = Trainer.after_step

    def after_step(self, loss, bar):
        original(self, loss, bar)
        if self.state.global_step == step:
            raise error

    monkeypatch.setattr(Trainer, "after_step", after_step)


def test_resumed_twice_equals_uninterrupted(workspace, tmp_path, monkeypatch):
    run = dict(max_train_steps=8, gradient_accumulation_steps=2)
    train(workspace, tmp_path / "full", **run)
    part = tmp_path / "part"
    for stop, resume in ((3, None), (6, "latest")):
        stop_at(monkeypatch, stop)
        trainer = Trainer(validate(config_from_dict(settings(workspace, part, resume=resume, **run))))
        assert trainer.run() == 130
        monkeypatch.undo()
        assert (part / f"lora-step{stop:08d}-state").is_dir() and not (part / LOCK_NAME).exists()
    train(workspace, part, resume="latest", **run)
    same_run(tmp_path / "full", part)
    assert [r["step"] for r in rows(part)] == [str(s) for s in range(1, 9)]


def test_a_state_of_the_previous_version_resumes(workspace, tmp_path):
    """tests/fixtures/previous_version_state: step 4 of this run, saved by the version before states were
    read with weights_only (the same plain payload)."""
    run = dict(max_train_steps=8, network_dim=1, network_alpha=1)
    train(workspace, tmp_path / "full", **run)
    part = tmp_path / "part"
    shutil.copytree(REPO / "tests" / "fixtures" / "previous_version_state", part)
    train(workspace, part, resume="latest", **run)
    same_run(tmp_path / "full", part)


def nan_at(monkeypatch, steps):
    """The loss of every batch of the given optimizer steps is NaN."""
    original = Trainer.loss

    def loss(self, batch, expert, pos, sigma=None):
        value = original(self, batch, expert, pos, sigma)
        return value * float("nan") if sigma is None and pos[1] in steps else value

    monkeypatch.setattr(Trainer, "loss", loss)


def test_one_nan_loss_is_skipped_and_the_run_finishes(workspace, tmp_path, monkeypatch):
    nan_at(monkeypatch, {2})
    train(workspace, tmp_path, max_train_steps=6, save_every_n_steps=2, save_state=True)
    log = rows(tmp_path)
    assert log[2]["step"] == "3" and log[2]["loss"] == "nan"  # the skipped step is on record
    averages = [float(r["avg_loss"]) for r in log]
    assert all(a == a for a in averages) and averages[2] == averages[1]  # no NaN entered the average
    assert (tmp_path / "loss.png").is_file()
    for expert in EXPERTS:
        assert all(t.isfinite().all() for t in lora(tmp_path / f"lora_{expert}.safetensors").values())
    monkeypatch.undo()
    train(workspace, tmp_path, max_train_steps=8, resume="latest")  # and the run resumes


def test_non_finite_losses_in_a_row_stop_with_the_last_good_state(workspace, tmp_path, monkeypatch):
    nan_at(monkeypatch, set(range(3, 100)))
    trainer = Trainer(validate(config_from_dict(settings(workspace, tmp_path, max_train_steps=8))))
    with pytest.raises(NonFiniteLossError) as error:
        trainer.run()
    saved = tmp_path / "lora-step00000005-state"  # two skipped steps (3, 4) were counted, the third stopped
    assert str(error.value).startswith("3 non-finite losses (NaN or infinite) in a row, the last at step 5 on ")
    assert f"The training state of the last optimizer step (weights still finite) is saved in {saved}" in \
        str(error.value)
    assert (saved / "training_state.pt").is_file() and not (tmp_path / LOCK_NAME).exists()
    monkeypatch.undo()
    train(workspace, tmp_path, max_train_steps=8, resume="latest")
    assert [r["step"] for r in rows(tmp_path)] == [str(s) for s in range(1, 9)]


def test_diverged_weights_are_never_saved(workspace, tmp_path, monkeypatch):
    original = Trainer.optimizer_step

    def optimizer_step(self):
        original(self)
        if self.state.global_step == 3:
            with torch.no_grad():
                self.opt.trainable[0].fill_(float("inf"))

    monkeypatch.setattr(Trainer, "optimizer_step", optimizer_step)
    trainer = Trainer(validate(config_from_dict(settings(workspace, tmp_path, max_train_steps=8,
                                                         save_every_n_steps=2, save_state=True))))
    with pytest.raises(NonFiniteLossError, match=r"at step 4 the trained weights are no longer finite .*nothing was "
                                                 r"saved over the earlier saves.*the newest earlier state is "
                                                 r".*lora-step00000002-state"):
        trainer.run()
    names = sorted(p.name for p in tmp_path.iterdir() if "step" in p.name)
    assert names == ["lora-step00000002-state", "lora_high_noise-step00000002.safetensors",
                     "lora_low_noise-step00000002.safetensors"]


def test_a_second_trainer_on_the_same_folder_stops_at_once(workspace, tmp_path):
    leftovers = [tmp_path / ".lora_low_noise.safetensors.k2j4_x9.tmp", tmp_path / "loss.csv.tmp"]
    tmp_path.mkdir(exist_ok=True)
    for path in leftovers:  # what a killed run left
        path.write_bytes(b"half")
    (tmp_path / "lora-step00000002-state.tmp").mkdir()
    first = Trainer(validate(config_from_dict(settings(workspace, tmp_path, max_train_steps=2))))
    first.setup()
    try:
        assert not any(p.exists() for p in leftovers) and not (tmp_path / "lora-step00000002-state.tmp").exists()
        second = Trainer(validate(config_from_dict(settings(workspace, tmp_path, max_train_steps=2))))
        with pytest.raises(OutputLockedError, match=r"is in use by another training run \(pid \d+ on "):
            second.run()
        assert (tmp_path / LOCK_NAME).exists()  # the first one's lock stays
        first.train()
    finally:
        first.cleanup()
    assert not (tmp_path / LOCK_NAME).exists()
    train(workspace, tmp_path, max_train_steps=2)  # free again


def test_disk_full_during_a_save_keeps_the_previous_one(workspace, tmp_path, monkeypatch):
    """Injected: the safetensors writer failing with the error a full disk gives it, at the step-4 save.
    A real full disk is tested in tests/hostile/test_training_cli.py."""
    import safetensors.torch

    real = safetensors.torch.save_file

    def save_file(tensors, filename, metadata=None):
        if "step00000004" in str(filename):
            open(filename, "wb").write(b"partial")
            raise safetensors.SafetensorError("Error while serializing: IoError(Os { code: 28, kind: StorageFull, "
                                              'message: "No space left on device" })')
        return real(tensors, filename, metadata=metadata)

    monkeypatch.setattr(safetensors.torch, "save_file", save_file)
    trainer = Trainer(validate(config_from_dict(settings(workspace, tmp_path, max_train_steps=6,
                                                         save_every_n_steps=2, save_state=True))))
    with pytest.raises(DiskFullError, match=r"no space left on /.*: writing lora_(low|high)_noise-step00000004"
                                            r".safetensors needs about \d+ KB.*the newest training state is "
                                            r".*lora-step00000002-state: resume from it"):
        trainer.run()
    names = sorted(p.name for p in tmp_path.iterdir() if "step" in p.name)
    assert names == ["lora-step00000002-state", "lora_high_noise-step00000002.safetensors",
                     "lora_low_noise-step00000002.safetensors"]  # the step-4 temp file is gone
    monkeypatch.undo()
    train(workspace, tmp_path, max_train_steps=6, save_every_n_steps=2, save_state=True, resume="latest")

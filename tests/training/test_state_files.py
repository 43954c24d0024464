"""The training state and the output folder against planted, damaged and half-written files: a state is
read with weights_only (a pickle that would run code is refused and runs nothing), damaged states and
summaries are clear errors, what killed saves left is settled at the next start, a full disk during a
save is a clear error that keeps the previous state, and one run at a time holds an output folder."""

from __future__ import annotations

import errno
import json
import logging
import os
import socket
import subprocess
import sys

import pytest
import torch

from library.training import checkpoints as ckpt
from library.training import lock as lock_module
from library.training.checkpoints import state as state_module
from library.training.checkpoints.state import StateError, restore_payload, state_payload
from library.training.files import DiskFullError
from library.training.lock import LOCK_NAME, OutputLockedError, lock_folder


class _Expert:
    def __init__(self, name="dit"):
        self.name, self.network = name, torch.nn.Linear(3, 2)


def _payload(step=4, scheduler=None):
    expert = _Expert()
    opt = torch.optim.AdamW(expert.network.parameters(), lr=1e-3)
    sched = scheduler(opt) if scheduler else torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (s + 1))
    expert.network(torch.ones(1, 3)).sum().backward()
    opt.step()
    sched.step()
    run = {"seed": 7, "global_step": step, "epoch": 0, "batch_in_epoch": step, "started_at": 1.0}
    return state_payload([expert], opt, sched, run, sharded=False), expert, opt, sched


def _save(tmp_path, step=4, **kw):
    payload = _payload(step, **kw)[0]
    folder = ckpt.state_dir(tmp_path, "run", step=step)
    ckpt.save_state(folder, payload, {"global_step": step})
    return folder


class _Planted:
    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_a_state_that_would_run_code_is_refused_and_runs_nothing(tmp_path):
    folder = _save(tmp_path)
    planted = _Planted()
    planted.marker = tmp_path / "pwned"
    payload = torch.load(folder / "training_state.pt", weights_only=True)
    payload["run_state"]["evil"] = planted
    torch.save(payload, folder / "training_state.pt")
    with pytest.raises(StateError, match=r"refused to load .*run-step00000004-state/training_state.pt: it holds "
                                         r"Python objects.* \(it asks for posix.system\).*could run code"):
        ckpt.load_state("latest", tmp_path, "run")
    assert not planted.marker.exists()


@pytest.mark.parametrize("damage,message", [
    (lambda f: (f / "training_state.pt").write_bytes((f / "training_state.pt").read_bytes()[:200]), "is damaged"),
    (lambda f: torch.save({"run_state": {"global_step": 1}}, f / "training_state.pt"), "not a training state of"),
    (lambda f: (f / "training_state.json").write_text("{not json"), "training_state.json is damaged"),
])
def test_damaged_states_are_clear_errors(tmp_path, damage, message):
    folder = _save(tmp_path)
    damage(folder)
    with pytest.raises(StateError, match=message):
        ckpt.load_state(folder)


def test_latest_passes_over_other_runs_and_unreadable_summaries(tmp_path, caplog):
    _save(tmp_path, step=4)
    newer = _save(tmp_path, step=8)
    (newer / "training_state.json").write_text("[")
    other = ckpt.state_dir(tmp_path, "run_v2", step=20)  # another output name that starts like this one
    ckpt.save_state(other, _payload(20)[0], {"global_step": 20})
    with caplog.at_level(logging.WARNING):
        assert ckpt.find_latest_state(tmp_path, "run").name == "run-step00000004-state"
    assert any("passed over" in r.getMessage() for r in caplog.records)


class _FunctionScheduler(torch.optim.lr_scheduler.LambdaLR):
    """A custom schedule that keeps a plain function in its state (what weights_only cannot load)."""

    def __init__(self, optimizer):
        super().__init__(optimizer, lambda s: 0.5)
        self.warp = os.path.join


def test_plain_entries_of_a_schedule_are_saved_and_restored(tmp_path):
    folder = _save(tmp_path, scheduler=_FunctionScheduler)
    payload = ckpt.load_state(folder)
    assert "warp" not in payload["scheduler"] and payload["scheduler"]["last_epoch"] == 1
    _, expert, opt, sched = _payload(0, scheduler=_FunctionScheduler)
    restore_payload(payload, [expert], opt, sched, sharded=False)
    assert sched.last_epoch == 1 and sched.warp is os.path.join


def test_state_that_is_not_plain_data_is_refused_when_saved(tmp_path):
    payload = _payload()[0]
    payload["optimizer"]["state"][0]["hook"] = print
    with pytest.raises(StateError, match=r"would hold payload\['optimizer'\]\['state'\]\[0\]\['hook'\]"):
        ckpt.save_state(ckpt.state_dir(tmp_path, "run", step=4), payload, {"global_step": 4})


def test_a_state_of_another_run_is_a_clear_error(tmp_path):
    payload = ckpt.load_state(_save(tmp_path))
    expert, opt = _Expert("high_noise"), None
    with pytest.raises(StateError, match=r"run-step00000004-state does not fit this run \(it has no weights for the "
                                         r"high_noise expert\)"):
        restore_payload(payload, [expert], opt, None, sharded=False)


def test_disk_full_while_saving_a_state_keeps_the_previous_one(tmp_path, monkeypatch):
    """Injected: torch.save's writer failing as it does on a full disk (its message names no disk) while
    the disk reports no free space. A real full disk is tested in tests/hostile/test_training_cli.py."""
    previous = _save(tmp_path, step=4)
    before = (previous / "training_state.pt").read_bytes()

    def full(obj, f):
        f.write(b"PK" * 100)
        raise RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 8576 vs 8470")

    monkeypatch.setattr(state_module.torch, "save", full)
    monkeypatch.setattr(state_module, "out_of_space", lambda exc, folder, need: True)
    with pytest.raises(DiskFullError, match=r"no space left on /.* \(the disk holding .*\): writing the training "
                                            r"state run-step00000008-state needs about \d KB.*the newest training "
                                            r"state is .*run-step00000004-state: resume from it"):
        _save(tmp_path, step=8)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run-step00000004-state"]
    assert (previous / "training_state.pt").read_bytes() == before


def test_disk_full_is_judged_by_errno_words_or_free_space(tmp_path, monkeypatch):
    from library.training import files

    assert files.out_of_space(OSError(errno.ENOSPC, "No space left on device"), tmp_path, 1)
    assert files.out_of_space(RuntimeError("Error while serializing: IoError(Os { code: 28, kind: StorageFull })"),
                              tmp_path, 1)
    torch_words = RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 8576 vs 8470")
    assert not files.out_of_space(torch_words, tmp_path, 1)  # the disk has room: another failure
    monkeypatch.setattr(files, "free_bytes", lambda path: 10)
    assert files.out_of_space(torch_words, tmp_path, 1000)
    assert not files.out_of_space(RuntimeError("something else"), tmp_path, 1000)


def test_leftovers_of_killed_saves_are_settled(tmp_path):
    complete = _save(tmp_path, step=4)
    os.replace(complete, tmp_path / "run-step00000004-state.tmp")  # killed before publishing a complete state
    unfinished = tmp_path / "run-step00000008-state.tmp"
    unfinished.mkdir()
    (unfinished / "training_state.pt").write_bytes(b"half")
    replaced = _save(tmp_path, step=12)
    os.replace(replaced, tmp_path / "run-step00000012-state.old")  # killed between the two renames
    _save(tmp_path, step=16)
    (tmp_path / "run-step00000016-state.old").mkdir()  # its replacement was published
    temps = [".run_high_noise-step00000004.safetensors.a1b2c3d4.tmp", ".run.safetensors.4242.tmp",
             ".run_config.toml.x_y9.tmp", "loss.csv.tmp", "loss.png.tmp"]
    kept = [".other.safetensors.a1b2c3d4.tmp", ".run_v2-step00000004.safetensors.abc.tmp", "notes.tmp",
            "other-step00000004-state.tmp"]
    for name in temps + kept[:3]:
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / kept[3]).mkdir()
    done = ckpt.clean_leftovers(tmp_path, "run")
    assert len(done) == 4 + len(temps)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["run-step00000004-state", "run-step00000012-state", "run-step00000016-state", *kept])
    assert ckpt.load_state(tmp_path / "run-step00000004-state")["run_state"]["global_step"] == 4
    assert ckpt.load_state(tmp_path / "run-step00000012-state")["run_state"]["global_step"] == 12


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_one_run_per_output_folder(tmp_path, caplog):
    held = lock_folder(tmp_path)
    owner = json.loads((tmp_path / LOCK_NAME).read_text())
    assert owner["pid"] == os.getpid() and owner["host"] == socket.gethostname()
    with pytest.raises(OutputLockedError, match=rf"in use by another training run \(pid {os.getpid()} on "):
        lock_folder(tmp_path)
    held.release()
    assert not (tmp_path / LOCK_NAME).exists()
    # a stale lock (its process is gone) is reported and taken over
    (tmp_path / LOCK_NAME).write_text(json.dumps({"pid": _dead_pid(), "host": socket.gethostname(),
                                                  "started": "2025-01-01 10:00:00"}))
    with caplog.at_level(logging.WARNING):
        taken = lock_folder(tmp_path)
    assert any("taking over a stale lock" in r.getMessage() and "no longer running" in r.getMessage()
               for r in caplog.records)
    assert json.loads((tmp_path / LOCK_NAME).read_text())["pid"] == os.getpid()
    # a release removes only its own lock
    (tmp_path / LOCK_NAME).write_text(json.dumps({"pid": 1, "host": "elsewhere"}))
    taken.release()
    assert (tmp_path / LOCK_NAME).exists()


def test_a_lock_from_another_machine_is_never_broken(tmp_path):
    (tmp_path / LOCK_NAME).write_text(json.dumps({"pid": _dead_pid(), "host": "gpu-node-7", "started": "today"}))
    with pytest.raises(OutputLockedError, match=r"locked by a training run on another machine \(pid \d+ on "
                                                r"gpu-node-7.*If it is no longer running, delete the lock file"):
        lock_folder(tmp_path)


def test_an_unreadable_lock_is_respected_while_new_then_taken_over(tmp_path, monkeypatch):
    (tmp_path / LOCK_NAME).write_text("")
    with pytest.raises(OutputLockedError, match="being locked by another training run right now"):
        lock_folder(tmp_path)
    monkeypatch.setattr(lock_module, "UNREADABLE_GRACE_S", -1.0)
    lock_folder(tmp_path).release()

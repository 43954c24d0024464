"""train_network_wan.py against what a run meets on disk and in its numbers: a second trainer on the same
output folder, a lock from another machine or from a killed run, a planted training state that would run
code, losses that turn to NaN, a disk that fills up in the middle of a save. Each is one message naming
the file or folder and what to do (exit status 2, no traceback), and nothing already saved is lost."""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from library.training import checkpoints as ckpt

from .conftest import REPO, assert_refused

LOCK = "training.lock"


def train_args(models, demo: Path, out: Path, **over) -> list[str]:
    flags = {"task": "t2v-tiny", "dit": models.dit, "dit_high_noise": models.dit_high_noise,
             "dataset_config": demo / "dataset.toml", "output_dir": out, "output_name": "lora", "network_dim": 4,
             "network_alpha": 4, "learning_rate": 5e-3, "optimizer_type": "AdamW", "max_train_steps": 2, "seed": 7,
             "max_data_loader_n_workers": 0, "timestep_sampling": "uniform", **over}
    return [str(REPO / "train_network_wan.py"), *sum(([f"--{k}", str(v)] for k, v in flags.items()), [])]


def run_train(args: list[str], cwd: Path, prefix: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    return subprocess.run([*prefix, sys.executable, *args], cwd=cwd, capture_output=True, text=True, timeout=300)


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def _write_lock(out: Path, pid: int, host: str) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / LOCK).write_text(json.dumps({"pid": pid, "host": host, "started": "2025-06-01 09:30:00"}))


@pytest.mark.parametrize("host,message", [
    ("here", "is in use by another training run (pid {pid} on {host}, started 2025-06-01 09:30:00; lock file "
             "{out}/training.lock). Two runs in one output_dir would mix their saves, states and loss.csv: wait for "
             "it to finish, or set another output_dir"),
    ("gpu-node-7", "is locked by a training run on another machine (pid {pid} on gpu-node-7, started 2025-06-01 "
                   "09:30:00; lock file {out}/training.lock). Whether it still runs cannot be checked from here. If it "
                   "is no longer running, delete the lock file and start again"),
])
def test_a_locked_output_folder_is_refused(tiny_models, cached_demo, tmp_path, host, message):
    out, pid = tmp_path / "out", os.getpid()  # this test's own process: alive
    host = socket.gethostname() if host == "here" else host
    _write_lock(out, pid, host)
    result = run_train(train_args(tiny_models, cached_demo, out), tmp_path)
    assert_refused(result, message.format(pid=pid, host=host, out=out))
    assert sorted(p.name for p in out.iterdir()) == [LOCK]  # nothing of the other run was touched


def test_the_lock_of_a_killed_run_is_taken_over(tiny_models, cached_demo, tmp_path):
    out = tmp_path / "out"
    _write_lock(out, _dead_pid(), socket.gethostname())
    (out / ".lora_low_noise.safetensors.ab12cd34.tmp").write_bytes(b"half a LoRA")  # the killed run's save
    result = run_train(train_args(tiny_models, cached_demo, out), tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "taking over a stale lock" in result.stderr and "is no longer running" in result.stderr
    assert not (out / LOCK).exists() and not list(out.glob("*.tmp"))
    assert (out / "lora_low_noise.safetensors").is_file()


def test_a_planted_training_state_is_refused_and_runs_nothing(tiny_models, cached_demo, tmp_path):
    out, marker = tmp_path / "out", tmp_path / "pwned"
    state = out / "lora-step00000100-state"
    state.mkdir(parents=True)

    class Payload:
        def __reduce__(self):
            return os.system, (f"touch {marker}",)

    torch.save({"run_state": Payload()}, state / "training_state.pt")
    (state / "training_state.json").write_text(json.dumps({"global_step": 100}))
    result = run_train(train_args(tiny_models, cached_demo, out, resume="latest"), tmp_path)
    assert_refused(result, f"resume: refused to load {state}/training_state.pt: it holds Python objects, not only "
                           "tensors and plain data (it asks for posix.system), and loading those could run code")
    assert not marker.exists() and not (out / LOCK).exists()


def test_a_diverging_run_stops_with_a_true_message(tiny_models, cached_demo, tmp_path):
    out = tmp_path / "out"
    result = run_train(train_args(tiny_models, cached_demo, out, learning_rate=1e30, max_train_steps=8), tmp_path)
    output = assert_refused(result, "3 non-finite losses (NaN or infinite) in a row, the last at step ")
    saved = sorted(out.glob("*-state"))
    if saved:  # weights huge but finite: the state of the last optimizer step is kept, and named
        assert f"is saved in {saved[0]}" in output
    else:
        assert "No training state was saved now: the trained weights themselves are no longer finite" in output
    assert not (out / LOCK).exists()


def _unshare_works() -> bool:
    if not shutil.which("unshare") or sys.platform != "linux":
        return False
    probe = subprocess.run(["unshare", "-rm", "sh", "-c", "mount -t tmpfs -o size=64k none /tmp"],
                           capture_output=True, timeout=30)
    return probe.returncode == 0


@pytest.mark.skipif(not _unshare_works(), reason="needs user namespaces (unshare -rm) to mount a small tmpfs")
def test_a_full_disk_keeps_the_previous_save(tiny_models, cached_demo, tmp_path):
    """A real full disk: the output folder is a tmpfs that holds the step-2 save but not the step-4 one."""
    disk, copy = tmp_path / "disk", tmp_path / "copy"
    disk.mkdir()
    args = train_args(tiny_models, cached_demo, disk, max_train_steps=6, save_every_n_steps=2, save_state=True)
    script = ('mount -t tmpfs -o size=380k none "$1" && shift && "$@"; status=$?; cp -a "$DISK/." "$COPY/"; '
              'exit $status')
    copy.mkdir()
    result = subprocess.run(["unshare", "-rm", "sh", "-c", script, "sh", str(disk), sys.executable, *args],
                            cwd=tmp_path, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "DISK": str(disk), "COPY": str(copy)})
    output = assert_refused(result, f"no space left on {disk}: writing ")
    assert re.search(r"needs about \d+ KB, \d+ KB free\. Earlier saves are untouched; the newest training state is "
                     rf"{disk}/lora-step00000002-state: resume from it", output), output
    names = {p.name for p in copy.iterdir() if "step" in p.name or "tmp" in p.name}
    previous = {"lora-step00000002-state", "lora_high_noise-step00000002.safetensors",
                "lora_low_noise-step00000002.safetensors"}
    # the previous save is kept; of the step-4 save at most its complete LoRA files: no state, nothing half-written
    assert previous <= names, output
    assert names - previous <= {"lora_high_noise-step00000004.safetensors",
                                "lora_low_noise-step00000004.safetensors"}, output
    assert ckpt.load_state(copy / "lora-step00000002-state")["run_state"]["global_step"] == 2
    resumed = run_train(train_args(tiny_models, cached_demo, copy, max_train_steps=6, save_every_n_steps=2,
                                   save_state=True, resume="latest"), tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed at step 2" in resumed.stderr and (copy / "lora_low_noise.safetensors").is_file()


def test_pick_checkpoint_reads_a_resumed_and_killed_run(tmp_path):
    from safetensors.torch import save_file

    for step in (2, 4):
        save_file({"x.lora_down.weight": torch.zeros(1, 1)}, tmp_path / f"lo-step{step:08d}.safetensors")
    (tmp_path / "loss.csv").write_text("step,epoch,loss,avg_loss,lr,kind\n1.0,0.0,0.5,0.5,0.0001,train\n"
                                       "2.0,0.0,0.4,0.45,0.0001,train\n3,0,nan,0.45,0.0001,train\n"
                                       "4,0,0.3,0.4,0.0001,train\n5,0,0.2")
    result = subprocess.run([sys.executable, str(REPO / "tools" / "pick_checkpoint.py"), str(tmp_path)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr
    assert "step 4" in result.stdout and "0.4000" in result.stdout

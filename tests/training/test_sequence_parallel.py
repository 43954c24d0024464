"""Sequence parallelism (`sequence_parallel_size`) and runs over several nodes, on the CPU with gloo: one
sample's tokens split over 2 or 4 processes give the loss and gradients of one process (LoRA with both
attention modes, and full fine-tuning sharded with fsdp); a split run over 2 'nodes' x 1 process on this
machine saves once, and stopped and resumed equals one process's uninterrupted run; the settings' errors;
the slices; the planner's split, the estimate's rows and auto_memory's choice."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from library.config import ConfigError, config_from_dict, validate
from library.runtime.sequence_parallel import SequenceParallelError, all_to_all_bytes
from library.training.checkpoints.state import StateError
from library.training.parallel import setup_parallel
from library.training.planning.lora import Settings, Workload, estimate, plan_memory
from library.wan.variants import get_variant
from tests.helpers import REPO, torchrun
from tests.training.test_trainer import lora, losses, settings, train, workspace  # noqa: F401

WORKER = REPO / "tests" / "training" / "sequence_parallel_worker.py"
ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))


def _split_run(tmp_path: Path, processes: int, *flags: str) -> dict:
    out = tmp_path / f"report{processes}.json"
    done = subprocess.run([*torchrun(processes), str(WORKER), str(out), *flags], capture_output=True, text=True,
                          timeout=300, env=ENV)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    return json.loads(out.read_text())


def _assert_same(report: dict) -> None:
    # per-frame timesteps (TI2V-style modulation groups) on 75 tokens (padded) and 90, one timestep + checkpointing
    for name, r in report.items():
        assert r["loss"] <= 1e-5 * r["expected_loss"], (name, r)
        assert r["grad"] <= 1e-5 * max(r["grad_scale"], 1e-3), (name, r)


def test_two_processes_split_one_sample_like_one_process(tmp_path):
    """2 processes, each attention mode with a LoRA, then full fine-tuning sharded with fsdp: the loss and
    gradients of one process."""
    report = _split_run(tmp_path, 2, "--modes", "ulysses", "all_gather", "--fsdp")
    assert len(report) == 9
    _assert_same(report)


@pytest.mark.slow
def test_four_processes_split_one_sample_like_one_process(tmp_path):
    """4 processes: a LoRA and fsdp on one sample, then 2 data-parallel groups x 2 processes per sample (a
    2-D mesh) against one process's gradients of the mean loss over the two samples."""
    report = _split_run(tmp_path, 4, "--fsdp", "--data_groups", "2")
    assert len(report) == 7 and "lora 2x2 per_frame_90" in report
    _assert_same(report)


def test_each_process_takes_its_slice_with_its_own_modulation_groups():
    from library.runtime.sequence_parallel import SequenceParallel

    x = torch.arange(90.0).view(1, 90, 1).expand(1, 90, 4)  # 3 frames of 30 tokens
    e = torch.arange(3.0).view(1, 3, 1).expand(1, 3, 4)  # one modulation group per frame
    e0 = e[:, :, None].expand(1, 3, 6, 4)
    rope = (torch.arange(90.0).view(90, 1, 1, 1).expand(90, 1, 2, 2),) * 2
    lx, le, le0, lrope = SequenceParallel(None, 2, 1).split(x, e, e0, rope)  # tokens 45..89
    assert lx[0, :, 0].tolist() == list(range(45, 90)) and lrope[0][:, 0, 0, 0].tolist() == list(range(45, 90))
    assert le[0, :, 0].tolist() == [1.0, 2.0, 2.0] and le0.shape == (1, 3, 6, 4)  # groups of 15: 45-59, 60-74, 75-89
    lx, le, _, lrope = SequenceParallel(None, 4, 3).split(x, e, e0, rope)  # 23 a process: 69..89 and 2 of padding
    assert lx.shape[1] == 23 and lx[0, -3:, 0].tolist() == [89.0, 0.0, 0.0] and lrope[1][-1].abs().sum() == 0
    assert le.shape[1] == 23 and le[0, -1, 0] == 2.0


# ---- settings -------------------------------------------------------------------------------------------


class _Accelerator:
    def __init__(self, processes: int):
        self.num_processes, self.process_index, self.device = processes, 0, torch.device("cpu")


def _config(**over) -> dict:
    """Settings that validate without any file being read (no workspace needed)."""
    return {"task": "t2v-tiny", "dit": "dit.safetensors", "dataset_config": "dataset.toml", **over}


def test_a_size_that_does_not_divide_the_heads_or_the_processes_is_a_clear_error():
    cfg = _config(sequence_parallel_size=4)
    with pytest.raises(ConfigError, match="does not divide this model's 2 heads.*all_gather"):
        validate(config_from_dict(cfg))
    ok = validate(config_from_dict({**cfg, "sequence_parallel_attention": "all_gather"}))
    with pytest.raises(SequenceParallelError, match="but 6 process.*launch a multiple of 4"):
        setup_parallel(ok, get_variant("t2v-tiny"), _Accelerator(6), None)
    with pytest.raises(StateError, match="saved with sequence_parallel_size = 2, this run has 4"):
        setup_parallel(ok, get_variant("t2v-tiny"), _Accelerator(4), None,
                       {"folder": "x-state", "run_state": {"sequence_parallel": 2}})


def test_the_planner_splits_activations_and_counts_the_traffic():
    w = Workload(get_variant("t2v-A14B"), 1280, 720, 81)
    one, four = (estimate(Workload(w.variant, 1280, 720, 81, sequence_parallel=n), Settings(checkpointing=True))
                 for n in (1, 4))
    assert w.tokens == 75600 and one.weights == four.weights
    assert 3.5 < one.activations / four.activations < 4.1  # a quarter of the tokens per GPU
    plan = plan_memory(80, "t2v-A14B", 1280, 720, 81, sequence_parallel=8)
    assert "9450 per process, split over 8" in plan.table()
    gathered = estimate(Workload(w.variant, 1280, 720, 81, sequence_parallel=4, gather_kv=True),
                        Settings(checkpointing=True))
    assert gathered.activations - four.activations == pytest.approx(4 * 5120 * 75600 / 2**30)  # all keys, values
    # Ulysses: (N-1)/N of the local q, k, v and output per block, forward and backward
    assert all_to_all_bytes(75600, 5120, 2, 40) == pytest.approx(2 * 40 * 4 * 37800 * 5120 * 2 / 2)
    assert all_to_all_bytes(75600, 5120, 1, 40) == 0


def test_the_estimate_adds_split_rows_with_link_rates():
    from library.training.estimate import StepSetup, estimate_step
    from library.training.estimate_parallel import split_rows, split_table

    result = estimate_step(StepSetup(get_variant("t2v-tiny"), 64, 64, 9), "h100")
    one, two = split_rows(result, (1, 2))
    assert one.traffic_gb == 0 and one.nvlink_s == one.infiniband_s == pytest.approx(result.seconds)
    assert two.compute_s == pytest.approx(result.seconds / 2) and two.tokens_per_gpu == 24
    assert two.traffic_gb == pytest.approx(all_to_all_bytes(48, 32, 2, 2, passes=3) / 1e9)
    assert one.nvlink_s > two.nvlink_s and two.infiniband_s > two.nvlink_s
    table = split_table(result, (1, 2))
    assert "NVLink 4 (360 GB/s)" in table and "InfiniBand NDR 400 Gb/s (40 GB/s)" in table


def test_auto_memory_splits_long_clips_over_the_launched_processes(monkeypatch):
    from types import SimpleNamespace

    from library.training.planning import auto, lora as planner

    cfg = validate(config_from_dict(_config(task="t2v-A14B", auto_memory=True, network_dim=32)))
    clip = SimpleNamespace(bucket=(1280, 720, 81))
    data = SimpleNamespace(datasets=[SimpleNamespace(items=[clip], batch_size=1)])
    variant = get_variant("t2v-A14B")
    monkeypatch.setattr(auto, "detect_host_ram_gb", lambda: 1024.0)  # this machine's free RAM must not decide
    monkeypatch.setattr(planner, "detect_vram_gb", lambda device=None: 24.0)
    chosen = auto.auto_sequence_parallel(cfg, variant, data, None, 8)
    assert chosen.attention.sequence_parallel_size == 8  # fp8 + checkpointing fit without block swap
    assert auto.auto_sequence_parallel(cfg, variant, data, None, 4) is cfg  # 4 would still swap blocks
    monkeypatch.setattr(planner, "detect_vram_gb", lambda device=None: 80.0)
    assert auto.auto_sequence_parallel(cfg, variant, data, None, 8) is cfg  # one GPU holds it


# ---- training over two nodes -------------------------------------------------------------------------------


# SGD: linear in the gradient, so rounding noise is not amplified as Adam's normalisation amplifies it
SGD = {"max_train_steps": 4, "optimizer_type": "torch.optim.SGD", "learning_rate": 0.5}
SPLIT = {"sequence_parallel_size": 2, "gradient_checkpointing": True}


def _flags(ws, out: Path, **over) -> list[str]:
    return sum(([f"--{k}", str(v)] for k, v in settings(ws, out, **{**SGD, **over}).items()), [])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _two_nodes(ws, out: Path, **over) -> list[subprocess.CompletedProcess]:
    """torchrun --nnodes 2 on this machine: one process per 'node', a c10d rendezvous on localhost."""
    endpoint = f"127.0.0.1:{_free_port()}"
    nodes = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node_rank", str(r),
                               "--nproc_per_node", "1", "--rdzv_backend", "c10d", "--rdzv_endpoint", endpoint,
                               "--rdzv_id", "w19", str(REPO / "train_network_wan.py"), *_flags(ws, out, **over)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV) for r in (0, 1)]
    done = []
    for node in nodes:
        stdout, stderr = node.communicate(timeout=300)
        done.append(subprocess.CompletedProcess(node.args, node.returncode, stdout, stderr))
    assert [n.returncode for n in done] == [0, 0], done[0].stderr[-3000:] + done[1].stderr[-3000:]
    return done


@pytest.mark.slow
def test_a_split_run_over_two_nodes_saves_once_and_resumes_like_one_process(workspace, tmp_path):
    """2 'nodes' x 1 process sharing each sample (sequence_parallel_size = 2, checkpointed blocks), stopped
    after step 2 and resumed: the main process alone writes (one file per expert, one state, one loss log), and
    the losses and LoRAs are those of one process training the 4 steps without a stop."""
    train(workspace, tmp_path / "a", **SGD)
    _two_nodes(workspace, tmp_path / "b", **{**SPLIT, "max_train_steps": 2, "save_state_on_train_end": True})
    first = sorted(p.name for p in (tmp_path / "b").iterdir() if p.suffix in (".safetensors", ".csv") or
                   p.name.endswith("-state"))
    assert first == ["lora-state", "lora_high_noise.safetensors", "lora_low_noise.safetensors", "loss.csv"]
    resumed = _two_nodes(workspace, tmp_path / "b", **SPLIT, resume="latest")
    assert "resumed at step 2" in resumed[0].stderr + resumed[1].stderr
    assert losses(tmp_path / "b") == pytest.approx(losses(tmp_path / "a"), rel=1e-5)
    for expert in ("high_noise", "low_noise"):
        x, y = lora(tmp_path / "a" / f"lora_{expert}.safetensors"), lora(tmp_path / "b" / f"lora_{expert}.safetensors")
        for key in x:
            torch.testing.assert_close(y[key], x[key], rtol=1e-5, atol=1e-7)


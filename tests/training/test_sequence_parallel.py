"""Sequence parallelism (`sequence_parallel_size`) and runs over several nodes, on the CPU with gloo: one
sample's tokens split over 2 or 4 processes give the loss and gradients of one process (LoRA, and full
fine-tuning sharded with fsdp); trained, stopped and resumed runs equal one process; a 2-node x 1-process
run on this machine trains, saves once and resumes; the settings' errors; the planner's split."""

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
    out = tmp_path / f"report{processes}{''.join(flags)}.json"
    done = subprocess.run([*torchrun(processes), str(WORKER), str(out), *flags], capture_output=True, text=True,
                          timeout=300, env=ENV)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(out.read_text())


def _assert_same(report: dict) -> None:
    for name, r in report.items():  # per-frame timesteps (TI2V-style modulation groups) and one timestep
        assert r["loss"] <= 1e-5 * r["expected_loss"], (name, r)
        assert r["grad"] <= 1e-5 * max(r["grad_scale"], 1e-3), (name, r)


def test_two_processes_split_one_sample_like_one_process(tmp_path):
    """Ulysses over 2 processes, 75 tokens (one padding token), LoRA: same loss and LoRA gradients."""
    _assert_same(_split_run(tmp_path, 2))


@pytest.mark.slow
@pytest.mark.parametrize("processes,flags", [
    (4, ()), (4, ("--mode", "all_gather", "--heads", "2")), (2, ("--fsdp",)), (4, ("--fsdp",)),
], ids=["ulysses4", "all_gather4", "fsdp2", "fsdp4"])
def test_split_over_more_processes_and_with_fsdp(tmp_path, processes, flags):
    _assert_same(_split_run(tmp_path, processes, *flags))


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


@pytest.mark.slow
def test_the_benchmark_runs_split_under_torchrun(tmp_path):
    out = tmp_path / "bench.json"
    done = subprocess.run([*torchrun(2), str(REPO / "tools" / "benchmark_wan.py"), "--cpu", "--sequence_parallel", "2",
                           "--json", str(out)], capture_output=True, text=True, timeout=300, env=ENV)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["sequence_parallel"] == 2 and result["tokens"] == 48
    assert "tokens per sample               48, split over 2 GPUs" in done.stdout


def test_auto_memory_splits_long_clips_over_the_launched_processes(monkeypatch):
    from types import SimpleNamespace

    from library.training.planning import auto, lora as planner

    cfg = validate(config_from_dict(_config(task="t2v-A14B", auto_memory=True, network_dim=32)))
    clip = SimpleNamespace(bucket=(1280, 720, 81))
    data = SimpleNamespace(datasets=[SimpleNamespace(items=[clip], batch_size=1)])
    variant = get_variant("t2v-A14B")
    monkeypatch.setattr(planner, "detect_vram_gb", lambda device=None: 24.0)
    chosen = auto.auto_sequence_parallel(cfg, variant, data, None, 8)
    assert chosen.attention.sequence_parallel_size == 8  # fp8 + checkpointing fit without block swap
    assert auto.auto_sequence_parallel(cfg, variant, data, None, 4) is cfg  # 4 would still swap blocks
    monkeypatch.setattr(planner, "detect_vram_gb", lambda device=None: 80.0)
    assert auto.auto_sequence_parallel(cfg, variant, data, None, 8) is cfg  # one GPU holds it


# ---- training -------------------------------------------------------------------------------------------


def _flags(ws, out: Path, **over) -> list[str]:
    # SGD: linear in the gradient, so rounding noise is not amplified as Adam's normalisation amplifies it
    s = settings(ws, out, **{"max_train_steps": 4, "optimizer_type": "torch.optim.SGD", "learning_rate": 0.5, **over})
    return sum(([f"--{k}", str(v)] for k, v in s.items()), [])


def _same_loras(a: Path, b: Path) -> None:
    for expert in ("high_noise", "low_noise"):
        x, y = lora(a / f"lora_{expert}.safetensors"), lora(b / f"lora_{expert}.safetensors")
        for key in x:
            torch.testing.assert_close(y[key], x[key], rtol=1e-5, atol=1e-7)


@pytest.mark.slow
def test_a_split_run_trains_like_one_process_and_resumes_exactly(workspace, tmp_path):
    script = str(REPO / "train_network_wan.py")
    single = subprocess.run([sys.executable, script, *_flags(workspace, tmp_path / "a")], capture_output=True,
                            text=True, timeout=300, env=ENV)
    assert single.returncode == 0, single.stderr[-3000:]
    split = subprocess.run([*torchrun(2), script, *_flags(workspace, tmp_path / "b", sequence_parallel_size=2,
                                                          gradient_checkpointing=True)],
                           capture_output=True, text=True, timeout=300, env=ENV)
    assert split.returncode == 0, split.stderr[-3000:]
    assert "1 data-parallel group(s) x 2 processes per sample" in split.stderr
    assert losses(tmp_path / "b") == pytest.approx(losses(tmp_path / "a"), rel=1e-5)
    _same_loras(tmp_path / "a", tmp_path / "b")
    for steps, extra in ((2, {"save_state_on_train_end": True}), (4, {"resume": "latest"})):
        part = subprocess.run([*torchrun(2), script, *_flags(workspace, tmp_path / "c", max_train_steps=steps,
                                                             sequence_parallel_size=2, **extra)],
                              capture_output=True, text=True, timeout=300, env=ENV)
        assert part.returncode == 0, part.stderr[-3000:]
    _same_loras(tmp_path / "b", tmp_path / "c")


@pytest.mark.slow
def test_a_split_fsdp_fine_tune_trains_like_one_process(workspace, tmp_path):
    """Full fine-tuning, sharded with fsdp over the 2 processes that also split each sample."""
    from tests.training.test_full_finetune import ft_settings, tensors

    def flags(out, **over):
        s = ft_settings(workspace, out, optimizer_type="torch.optim.SGD", learning_rate=0.1, max_train_steps=2, **over)
        return sum(([f"--{k}", str(v)] for k, v in s.items()), [])

    script = str(REPO / "train_network_wan.py")
    single = subprocess.run([sys.executable, script, *flags(tmp_path / "a")], capture_output=True, text=True,
                            timeout=300, env=ENV)
    assert single.returncode == 0, single.stderr[-3000:]
    split = subprocess.run([*torchrun(2), script, *flags(tmp_path / "b", fsdp=True, sequence_parallel_size=2)],
                           capture_output=True, text=True, timeout=300, env=ENV)
    assert split.returncode == 0, split.stderr[-3000:]
    assert "sharded over 2 processes" in split.stderr and "x 2 processes per sample" in split.stderr
    a, _ = tensors(tmp_path / "a" / "ft_low_noise.safetensors")
    b, _ = tensors(tmp_path / "b" / "ft_low_noise.safetensors")
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=1e-5, atol=1e-7)


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
    return done


@pytest.mark.slow
def test_two_nodes_train_save_once_and_resume(workspace, tmp_path):
    """2 'nodes' x 1 process, data parallel: the main process alone writes (one set of files, one loss log);
    the state saved at step 2 resumes to the run of 4 steps without a stop."""
    whole = _two_nodes(workspace, tmp_path / "a", save_every_n_steps=2)
    assert [n.returncode for n in whole] == [0, 0], whole[0].stderr[-3000:] + whole[1].stderr[-3000:]
    names = sorted(p.name for p in (tmp_path / "a").glob("*.safetensors"))
    experts = ("high_noise", "low_noise")
    assert names == sorted(f"lora_{e}{s}.safetensors" for e in experts for s in ("", "-step00000002", "-step00000004"))
    assert len(losses(tmp_path / "a")) == 4
    for steps, extra in ((2, {"save_state_on_train_end": True}), (4, {"resume": "latest"})):
        part = _two_nodes(workspace, tmp_path / "b", max_train_steps=steps, **extra)
        assert [n.returncode for n in part] == [0, 0], part[0].stderr[-3000:] + part[1].stderr[-3000:]
    assert "resumed at step 2" in part[0].stderr
    _same_loras(tmp_path / "a", tmp_path / "b")

"""The full fine-tuning planner's host RAM check (issue 17): rungs whose offloaded activations or
fsdp_cpu_offload shards do not fit the host are skipped, the verdict names host RAM, `auto_full_settings` and
`tools/plan_memory.py --host_ram_gb` pass it on; the offloaded block inputs are L - 1."""

from __future__ import annotations

import logging
from types import SimpleNamespace

import pytest
import torch

from library.config import config_from_dict, validate
from library.training.planning import auto, host as host_ram, lora as planner
from library.training.planning.full import FullSettings, FullWorkload, estimate_full, plan_full, state_bytes
from library.training.planning.lora import GIB
from library.wan.variants import get_variant
from tests.helpers import tool

A14B = ("t2v-A14B", 832, 480, 81)
CPU_OFFLOAD = FullSettings(True, True, True, fsdp=True, fsdp_cpu_offload=True)
OFFLOAD_FSDP = FullSettings(True, True, True, fsdp=True)


@pytest.mark.parametrize("vram,processes,optimizer", [(80, 8, "AdamW"), (80, 2, "AdamW"), (40, 8, "AdamW"),
                                                      (80, 1, "Adafactor"), (48, 4, "AdamW8bit"), (24, 8, "AdamW")])
def test_a_big_host_changes_no_plan(vram, processes, optimizer):
    unchecked = plan_full(vram, *A14B, optimizer=optimizer, processes=processes)
    roomy = plan_full(vram, *A14B, optimizer=optimizer, processes=processes, host_ram_gb=1024)
    assert (roomy.settings, roomy.fits) == (unchecked.settings, unchecked.fits)
    assert "921.6 GiB of host RAM usable" in roomy.table() and "no: host RAM" not in roomy.table()


def test_a_small_host_skips_the_cpu_offload_rung_and_says_why():
    big = plan_full(80, *A14B, processes=2, host_ram_gb=1024)  # two 80 GiB GPUs: only cpu offload fits the card
    assert big.fits and big.settings == CPU_OFFLOAD and 90 < big.estimate.host < 96
    small = plan_full(80, *A14B, processes=2, host_ram_gb=64)  # e.g. a 128 GiB node, two processes
    assert not small.fits and small.host_gb == pytest.approx(57.6)
    assert small.settings == OFFLOAD_FSDP  # the most frugal rung the host holds: a GPU OOM, not a killed process
    lines = small.table().splitlines()
    assert "57.6 GiB of host RAM usable" in lines[0]
    rows = dict(zip((s for s, _ in small.candidates), lines[2:]))
    assert rows[CPU_OFFLOAD].endswith("no: host RAM") and rows[OFFLOAD_FSDP].rstrip().endswith("no")
    verdict = lines[-1]
    assert verdict.startswith("does not fit: bf16, ckpt+offload, fsdp + cpu offload fits the GPU")
    assert f"needs {big.estimate.host:.1f} GiB of host RAM per process > 57.6 usable" in verdict
    for advice in ("fewer processes on each node", "more nodes", "more host RAM", "train a LoRA"):
        assert advice in verdict
    # rungs with offloaded activations only: eight 48 GiB GPUs fit with offload, which 16 GiB of host cannot hold
    eight = plan_full(48, *A14B, processes=8, host_ram_gb=16)
    assert not eight.fits and "no: host RAM" in eight.table() and "of host RAM per process > 14.4" in eight.table()
    assert plan_full(48, *A14B, processes=8, host_ram_gb=32).settings == OFFLOAD_FSDP


def test_fsdp_cpu_offload_holds_each_process_its_own_pinned_shards():
    w = lambda n: FullWorkload(get_variant("t2v-A14B"), 832, 480, 81, optimizer="AdamW", processes=n)  # noqa: E731
    two, eight = estimate_full(w(2), CPU_OFFLOAD), estimate_full(w(8), CPU_OFFLOAD)
    activations = 39 * 4 * 5120 * 32760 / GIB  # the offloaded block inputs: not sharded
    shards = lambda e: e.host - activations  # noqa: E731
    assert 3.9 < shards(two) / shards(eight) < 4.1  # each process holds 1 / N
    sb = state_bytes(w(8), CPU_OFFLOAD)
    assert 1.45 < sb.pinned_weights / (sb.weights / 8) < 1.6  # page-locked shards rounded up to powers of two
    assert sb.pinned_grads == sb.pinned_weights  # every weight trains


def test_offload_keeps_the_last_block_input_on_the_gpu():
    w = FullWorkload(get_variant("t2v-A14B"), 832, 480, 81, optimizer="AdaFactor")
    block_input = 4 * 5120 * 32760 / GIB
    fused = FullSettings(True, True, fused_backward_pass=True)
    offloaded = estimate_full(w, FullSettings(True, True, True, True))
    kept = estimate_full(w, fused)
    assert offloaded.host == pytest.approx(39 * block_input)  # every block input but the last one's
    assert offloaded.peak == kept.peak == "backward"
    # on the GPU, two block inputs remain (the last one's and the one coming back) of the 40 kept without offload
    assert kept.activations - offloaded.activations == pytest.approx(38 * block_input)


def _data(bucket=(832, 480, 81)):
    clip = SimpleNamespace(bucket=bucket)
    return SimpleNamespace(datasets=[SimpleNamespace(items=[clip], batch_size=1)])


def test_auto_full_settings_checks_this_process_host_ram(monkeypatch, caplog):
    cfg = validate(config_from_dict({"task": "t2v-A14B", "dit": "dit.safetensors", "dataset_config": "dataset.toml",
                                     "full_fine_tune": True, "auto_memory": True, "mixed_precision": "bf16"}))
    monkeypatch.setattr(planner, "detect_vram_gb", lambda device=None: 80.0)
    monkeypatch.setattr(auto, "detect_host_ram_gb", lambda: 1024.0)
    roomy = auto.auto_full_settings(cfg, get_variant("t2v-A14B"), _data(), None, 2)
    assert roomy.finetune.fsdp_cpu_offload and roomy.finetune.fsdp and roomy.memory.gradient_checkpointing_cpu_offload
    monkeypatch.setattr(auto, "detect_host_ram_gb", lambda: 64.0)
    with caplog.at_level(logging.WARNING, logger=auto.__name__):
        tight = auto.auto_full_settings(cfg, get_variant("t2v-A14B"), _data(), None, 2)
    assert tight.finetune.fsdp and not tight.finetune.fsdp_cpu_offload
    assert "no: host RAM" in caplog.text and "GiB of host RAM per process > 57.6 usable" in caplog.text


def _cli():
    cli = tool("plan_memory")
    return cli


def test_plan_memory_cli_checks_host_ram_for_full_fine_tuning(capsys, monkeypatch):
    cli = _cli()
    full = ["--full", "--task", "t2v-A14B", "--processes", "2", "--vram_gb", "80"]
    assert cli.main([*full, "--host_ram_gb", "64"]) == 1
    out = capsys.readouterr().out
    assert "57.6 GiB of host RAM usable" in out and "no: host RAM" in out and "of host RAM per process" in out
    assert cli.main([*full, "--host_ram_gb", "1024"]) == 0
    assert "plan: bf16, ckpt+offload, fsdp + cpu offload" in capsys.readouterr().out
    # by default: MemAvailable, outside a launcher shared among the --processes this node's GPUs run
    monkeypatch.setattr(host_ram, "mem_available_gb", lambda meminfo="/proc/meminfo": 160.0)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 8)
    assert cli.main(full) == 1 and "72.0 GiB of host RAM usable" in capsys.readouterr().out
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")  # a launcher says how many share this node
    assert cli.main(full) == 0 and "144.0 GiB of host RAM usable" in capsys.readouterr().out

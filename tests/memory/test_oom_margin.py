"""auto_memory learning from a GPU out-of-memory error (library/training/planning/margin.py): the margin read
from PyTorch's own out-of-memory messages, the record in the output folder (several processes writing it:
the largest margin wins), and the planners holding it back (a more frugal rung); resolve_memory and
auto_full_settings read it from the config's output_dir."""

from __future__ import annotations

import json
import logging
from types import SimpleNamespace

import pytest

from library.config import config_from_dict, validate
from library.training.planning import auto, margin
from library.training.planning import lora as planner
from library.training.planning.full import plan_full
from library.training.planning.lora import plan_memory
from library.wan.variants import get_variant

# the message of c10/cuda/CUDACachingAllocator.cpp (torch >= 2.2), and the one of older releases
CUDA_OOM = ("CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity of 79.19 GiB of which 1.02 GiB "
            "is free. Including non-PyTorch memory, this process has 78.16 GiB memory in use. Of the allocated memory "
            "75.40 GiB is allocated by PyTorch, and 1.31 GiB is reserved by PyTorch but unallocated. If reserved but "
            "unallocated memory is large try setting PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True to avoid "
            "fragmentation.  See documentation for Memory Management  (https://pytorch.org/docs/stable/notes/cuda.html"
            "#environment-variables)")
OLD_OOM = ("CUDA out of memory. Tried to allocate 36.00 MiB (GPU 0; 7.93 GiB total capacity; 130.35 MiB already "
           "allocated; 47.06 MiB free; 188.00 MiB reserved in total by PyTorch)")


def test_the_shortfall_is_read_from_torch_messages():
    assert margin.shortfall_gib(CUDA_OOM) == pytest.approx(0.98)
    assert margin.shortfall_gib(CUDA_OOM.replace("2.00 GiB", "12.50 GiB")) == pytest.approx(11.48)
    assert margin.shortfall_gib(CUDA_OOM.replace("2.00 GiB", "512.00 MiB")) == 0.0  # fragmentation: free > asked
    assert margin.shortfall_gib(OLD_OOM) == 0.0
    assert margin.shortfall_gib("CUDA out of memory. Tried to allocate 3.50 GiB") == pytest.approx(3.5)
    assert margin.shortfall_gib("CUDA error: out of memory") is None  # cuBLAS / NCCL: no size


def test_each_error_adds_the_shortfall_or_the_floor():
    assert margin.next_margin(0.0, CUDA_OOM) == 2.0  # 0.98 GiB short: the 2 GiB floor
    assert margin.next_margin(0.0, CUDA_OOM, card_gib=141.0) == pytest.approx(4.23)  # 3 % of an H200
    assert margin.next_margin(2.0, CUDA_OOM.replace("2.00 GiB", "12.50 GiB"), 79.19) == pytest.approx(13.48)
    assert margin.next_margin(4.0, "CUDA error: out of memory", 79.19) == pytest.approx(6.38)


def test_the_record_takes_the_largest_margin_of_a_run(tmp_path):
    assert margin.load_margin(tmp_path) == 0.0 and margin.read_record(tmp_path) is None
    first = margin.record_out_of_memory(tmp_path, 0.0, CUDA_OOM + "\nmore", "NVIDIA H100", 79.19, "bf16")
    record = json.loads((tmp_path / "auto_memory_margin.json").read_text())
    assert first == record["margin_gib"] == pytest.approx(2.38)
    assert record["card"] == "NVIDIA H100" and record["settings"] == "bf16" and record["error"] == CUDA_OOM
    # another rank of the same run (planned with 0) failing too: counted once, the larger shortfall wins
    assert margin.record_out_of_memory(tmp_path, 0.0, CUDA_OOM, "NVIDIA H100", 79.19) == pytest.approx(2.38)
    bigger = CUDA_OOM.replace("2.00 GiB", "5.00 GiB")
    assert margin.record_out_of_memory(tmp_path, 0.0, bigger, "NVIDIA H100", 79.19) == pytest.approx(3.98)
    assert margin.record_out_of_memory(tmp_path, 3.98, CUDA_OOM, None, None) == pytest.approx(5.98)  # next start
    assert margin.load_margin(tmp_path) == pytest.approx(5.98) and not list(tmp_path.glob("*.tmp"))
    (tmp_path / "auto_memory_margin.json").write_text("{broken")
    with pytest.raises(margin.MarginFileError, match="auto_memory_margin.json cannot be read .*delete it"):
        margin.load_margin(tmp_path)


def test_a_margin_makes_the_planners_more_frugal():
    h100 = plan_memory(80, "t2v-A14B", 832, 480, 81)
    held = plan_memory(80, "t2v-A14B", 832, 480, 81, margin_gb=5)
    assert held.budget_gb == pytest.approx(h100.budget_gb - 5) and held.estimate.total <= held.budget_gb
    assert h100.settings.skip_blocks == 3 and held.settings.skip_blocks == 2  # the next rung of the skip stage
    assert h100.estimate.total > held.budget_gb
    assert "(5 GiB held back after an out-of-memory error)" in held.table()
    assert "held back" not in h100.table()
    assert plan_memory(80, "t2v-A14B", 832, 480, 81, margin_gb=20).rung.attention_on_host  # a later rung
    full = plan_full(80, "t2v-A14B", 832, 480, 81, processes=8)
    frugal = plan_full(80, "t2v-A14B", 832, 480, 81, processes=8, margin_gb=10)
    assert frugal.settings != full.settings and frugal.settings.full_bf16 and not full.settings.full_bf16
    assert "(10 GiB held back" in frugal.table()


def _data(bucket=(832, 480, 81)):
    return SimpleNamespace(datasets=[SimpleNamespace(items=[SimpleNamespace(bucket=bucket)], batch_size=1)])


def test_resolve_memory_reads_the_record_of_the_output_dir(tmp_path, monkeypatch, caplog):
    cfg = validate(config_from_dict({"task": "t2v-A14B", "dit": "dit.safetensors", "dataset_config": "dataset.toml",
                                     "auto_memory": True, "output_dir": str(tmp_path)}))
    monkeypatch.setattr(planner, "detect_vram_gb", lambda device=None: 80.0)
    monkeypatch.setattr(auto, "detect_host_ram_gb", lambda: None)
    variant = get_variant("t2v-A14B")
    assert auto.resolve_memory(cfg, variant, _data(), None, 1).gradient_checkpointing_skip_blocks == 3
    margin.record_out_of_memory(tmp_path, 3.0, CUDA_OOM)  # 5 GiB
    with caplog.at_level(logging.WARNING, logger=auto.__name__):
        memory = auto.resolve_memory(cfg, variant, _data(), None, 1)
    assert memory.gradient_checkpointing_skip_blocks == 2
    assert (f"5 GiB held back after an out-of-memory error ({tmp_path / 'auto_memory_margin.json'}; delete it to "
            "plan without)") in caplog.text
    assert auto.PLANNED["settings"].endswith("skipping the last 2 blocks")


def test_plan_memory_tool_shows_the_plan_of_the_next_start(tmp_path, capsys, monkeypatch):

    from tests.helpers import tool

    tool = tool("plan_memory")
    out = tmp_path / "out"
    margin.record_out_of_memory(out, 3.0, CUDA_OOM)  # 5 GiB
    config = tmp_path / "lora.toml"
    config.write_text(f'task = "t2v-A14B"\nauto_memory = true\noutput_dir = "{out}"\n')
    args = ["--config_file", str(config), "--vram_gb", "80", "--host_ram_gb", "1024"]
    assert tool.main(args) == 0
    shown = capsys.readouterr().out
    assert "(5 GiB held back after an out-of-memory error)" in shown and "skipping the last 2 blocks (" in shown
    assert tool.main([*args, "--margin_gb", "0"]) == 0
    shown = capsys.readouterr().out
    assert "held back" not in shown and "skipping the last 3 blocks (" in shown

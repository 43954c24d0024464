"""A GPU out-of-memory error under `auto_memory` (library/training/cli.py, planning/margin.py): exit status 2, no
traceback, a message saying how much less memory the next start plans with and to run the same command
again (and where to resume from, when saves exist); the margin recorded in the output folder, larger after
each error. Without auto_memory the message points to the planner and nothing is written."""

from __future__ import annotations

import json

import torch

from library.training import cli
from library.training.checkpoints.state import STATE_FILE, STATE_INFO
from library.training.planning import auto

from .test_training_setup_cli import flags

OOM = ("CUDA out of memory. Tried to allocate 6.00 GiB. GPU 0 has a total capacity of 79.19 GiB of which 1.00 GiB is "
       "free. Of the allocated memory 75.40 GiB is allocated by PyTorch, and 1.31 GiB is reserved by PyTorch but "
       "unallocated.\nsecond line")


def test_auto_memory_learns_from_an_out_of_memory_error(tiny_models, cached_demo, tmp_path, monkeypatch, capsys):
    from library.training.trainer import Trainer

    out = tmp_path / "out"
    messages = [OOM, "CUDA error: out of memory"]

    def out_of_memory(self):
        auto.PLANNED["settings"] = "bf16, ckpt keeping attention"  # what resolve_memory would have chosen
        raise torch.cuda.OutOfMemoryError(messages.pop(0))

    monkeypatch.setattr(Trainer, "run", out_of_memory)
    argv = flags(tiny_models, cached_demo, out, auto_memory="true")
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    record_path = out / "auto_memory_margin.json"
    assert "Traceback" not in err
    assert err == (f"error: the GPU ran out of memory ({OOM.splitlines()[0]}) with the settings auto_memory planned "
                   "(bf16, ckpt keeping attention): auto_memory will plan with 5 GiB less next time (recorded in "
                   f"{record_path}; delete it to plan without): run the same command again\n")
    record = json.loads(record_path.read_text())
    assert record["margin_gib"] == 5.0 and record["settings"] == "bf16, ckpt keeping attention"
    assert record["error"] == OOM.splitlines()[0] and record["time"].endswith("Z")
    # a save exists, and the next start runs out again (no size in the message): the floor is added
    state = out / "lora-step00000001-state"
    state.mkdir()
    (state / STATE_FILE).write_bytes(b"")
    (state / STATE_INFO).write_text('{"global_step": 1}')
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert "auto_memory will plan with 7 GiB less next time" in err
    assert err.endswith(f"run the same command again; saves made before are kept (resume = 'latest' continues from "
                        f"{state})\n")
    assert json.loads(record_path.read_text())["margin_gib"] == 7.0


def test_without_auto_memory_nothing_is_recorded(tiny_models, cached_demo, tmp_path, monkeypatch, capsys):
    from library.training.trainer import Trainer

    def out_of_memory(self):
        raise torch.cuda.OutOfMemoryError(OOM)

    monkeypatch.setattr(Trainer, "run", out_of_memory)
    assert cli.main(flags(tiny_models, cached_demo, tmp_path / "out")) == 2
    assert "tools/plan_memory.py" in capsys.readouterr().err
    assert not (tmp_path / "out" / "auto_memory_margin.json").exists()

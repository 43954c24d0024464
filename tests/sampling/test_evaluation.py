"""Strength-sweep grids and checkpoint comparison, in process (the CLIs are tested in tests/test_generate.py)."""

from __future__ import annotations

import json

import pytest

from library.evaluation.compare import checkpoint_columns
from library.sampling.evaluation import render_grid, strength_columns
from library.training.checkpoints import find_checkpoints
from library.sampling.loras import LoraSpec, attach_loras, detach_loras
from library.sampling.prompts import SampleRequest
from tests.sampling.conftest import load_models, write_lora

FAST = dict(steps=2, frames=5, width=32, height=32)


@pytest.fixture(scope="module")
def t2v(tiny_sets):
    return load_models(tiny_sets["t2v-tiny"])


def read_video(path):
    import imageio_ffmpeg

    reader = imageio_ffmpeg.read_frames(str(path))
    meta = next(reader)
    return meta, sum(1 for _ in reader)


def test_strength_sweep_grid(t2v, tmp_path):
    path = write_lora(t2v.experts["high_noise"], tmp_path / "s_high_noise.safetensors", t2v.variant, "high_noise")
    write_lora(t2v.experts["low_noise"], tmp_path / "s_low_noise.safetensors", t2v.variant, "low_noise")
    loaded = attach_loras([LoraSpec(path)], t2v.experts, t2v.variant)
    requests = [SampleRequest("a cat", seed=1, **FAST), SampleRequest("a dog", **FAST)]
    try:
        sidecar = render_grid(t2v, requests, strength_columns(loaded, [0.5, 1.0], True), tmp_path / "out", "grid")
    finally:
        detach_loras(loaded)
    assert [c["label"] for c in sidecar["columns"]] == ["base", "strength 0.5", "strength 1"]
    assert [c["strength"] for c in sidecar["columns"]] == [0.0, 0.5, 1.0]
    assert [r["prompt"] for r in sidecar["rows"]] == ["a cat", "a dog"] and sidecar["errors"] == []
    assert sidecar["rows"][1]["seed"] is not None  # drawn once, shared by every column
    meta, frames = read_video(tmp_path / "out" / "grid.mp4")
    assert meta["size"] == (3 * 32, 2 * (14 + 32)) and frames == 5 and meta["codec"].startswith("h264")
    assert (tmp_path / "out" / "grid.png").stat().st_size > 0
    assert len(list((tmp_path / "out" / "grid_cells").glob("*.mp4"))) == 6
    assert json.loads((tmp_path / "out" / "grid.json").read_text())["files"]["video"] == "grid.mp4"


def test_compare_checkpoints_by_step(t2v, tmp_path):
    run = tmp_path / "run"
    for step in (10, 20, None):
        tail = f"-step{step:08d}" if step else ""
        for expert in ("high_noise", "low_noise"):
            write_lora(t2v.experts[expert], run / f"my_{expert}{tail}.safetensors", t2v.variant, expert,
                       seed=step or 30, steps=step or 30)
    (run / "my_high_noise-step00000015.safetensors").write_bytes(b"garbage")
    (run / "notes.txt").write_text("not a checkpoint")
    found = find_checkpoints(run)
    assert [c.label for c in found] == ["step 10", "step 15", "step 20", "final (step 30)"]
    assert [len(c.files) for c in found] == [2, 1, 2, 2]
    columns = checkpoint_columns(t2v, found, include_base=True)
    try:
        request = SampleRequest("a cat", seed=3, **{**FAST, "frames": 1})
        sidecar = render_grid(t2v, [request], columns, tmp_path / "cmp", "ck", save_cells=False)
    finally:
        for network in t2v.networks:
            network.remove()
        t2v.networks = []
    labels = [c["label"] for c in sidecar["columns"]]
    assert labels == ["base", "step 10", "step 15", "step 20", "final (step 30)"]
    assert len(sidecar["errors"]) == 1 and "column 'step 15'" in sidecar["errors"][0]
    assert "not a readable .safetensors LoRA file" in sidecar["errors"][0]
    meta, _ = read_video(tmp_path / "cmp" / "ck.mp4")
    assert meta["size"][0] == 4 * 32  # the broken checkpoint's column is left out, the others rendered

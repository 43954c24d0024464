"""The overlapped read-and-cast of safetensors tensors (issue 17, loading): `load_dit` from an fp32 file into bf16
or fp16 gives the same tensors, bit for bit, as the sequential path through the memory map; chunk boundaries
inside and across tensors, sharded files, a NaN, a file cut short while open, and the thread count."""

from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors.torch import save_file

from library.wan import cast_read, loading
from library.wan.checkpoint_files import CheckpointError, open_checkpoint
from library.wan.loading import load_dit
from library.wan.variants import get_variant
from tests.helpers import random_official_dit_state


@pytest.fixture(scope="module")
def fp32_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("cast") / "dit_fp32.safetensors"
    save_file(random_official_dit_state(get_variant("t2v-tiny"), 3), str(path))
    return path


def _load(path, dtype, stream: bool, monkeypatch):
    monkeypatch.setattr(loading, "STREAM_CASTS", stream)
    return load_dit(path, dtype=dtype).state_dict()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("chunk", [40, 4096, 8 << 20])  # chunks inside tensors, across them, whole tensors
def test_streamed_cast_equals_the_sequential_path_bit_for_bit(fp32_file, dtype, chunk, monkeypatch):
    monkeypatch.setattr(cast_read, "CHUNK_BYTES", chunk)
    streamed, sequential = _load(fp32_file, dtype, True, monkeypatch), _load(fp32_file, dtype, False, monkeypatch)
    assert streamed.keys() == sequential.keys()
    for key, tensor in sequential.items():
        assert streamed[key].dtype == tensor.dtype and torch.equal(streamed[key].view(torch.uint8),
                                                                   tensor.view(torch.uint8)), key
    assert any(t.dtype == dtype for t in streamed.values()) and any(t.dtype == torch.float32
                                                                    for t in streamed.values())


def test_threads_are_restored_and_reads_overlap(fp32_file, monkeypatch):
    seen = []
    original = cast_read.CastReader.take

    def take(self, key):
        seen.append(torch.get_num_threads())
        return original(self, key)

    monkeypatch.setattr(cast_read.CastReader, "take", take)
    before = torch.get_num_threads()
    _load(fp32_file, torch.bfloat16, True, monkeypatch)
    expected = max(1, min(before, (os.cpu_count() or 2) - 1))  # one core left to the reader thread
    assert seen and set(seen) == {expected} and torch.get_num_threads() == before


def test_sharded_files_stream_too(tmp_path, monkeypatch):
    state = random_official_dit_state(get_variant("t2v-tiny"), 4)
    keys = sorted(state)
    names = {"m-00001-of-00002.safetensors": keys[::2], "m-00002-of-00002.safetensors": keys[1::2]}
    for name, part in names.items():
        save_file({k: state[k] for k in part}, str(tmp_path / name))
    (tmp_path / "m.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {k: name for name, part in names.items() for k in part}}))
    monkeypatch.setattr(cast_read, "CHUNK_BYTES", 256)
    streamed = _load(tmp_path, torch.bfloat16, True, monkeypatch)
    assert all(torch.equal(streamed[k], state[k].to(streamed[k].dtype)) for k in state)


def test_a_nan_is_refused_by_name(tmp_path, monkeypatch):
    state = random_official_dit_state(get_variant("t2v-tiny"), 5)
    state["blocks.1.ffn.0.weight"][3, 2] = float("nan")
    save_file(state, str(tmp_path / "nan.safetensors"))
    with pytest.raises(CheckpointError, match=r"'blocks\.1\.ffn\.0\.weight' holds 1 NaN and 0 infinite"):
        _load(tmp_path / "nan.safetensors", torch.bfloat16, True, monkeypatch)


def test_a_file_cut_short_after_opening_is_a_clear_error(tmp_path):
    path = tmp_path / "cut.safetensors"
    save_file(random_official_dit_state(get_variant("t2v-tiny"), 6), str(path))
    ckpt = open_checkpoint(path)
    last = max(ckpt.keys(), key=lambda k: ckpt.files[0].span(k)[0])
    with open(path, "r+b") as f:
        f.truncate(ckpt.files[0].span(last)[0] + 4)
    with cast_read.CastReader(ckpt, [(last, torch.bfloat16)]) as reader:
        with pytest.raises(CheckpointError, match=r"cut\.safetensors: ended while reading tensor"):
            reader.take(last)
    with pytest.raises(RuntimeError, match="the plan has"):
        with cast_read.CastReader(ckpt, [(last, torch.bfloat16)]) as reader:
            reader.take("head.head.weight")

"""Loading onto a GPU through reused page-locked staging buffers (issue 17, `library/wan/staged_load.py`), on the
CPU stand-in transport: the same tensors as `src.to(dtype)` bit for bit (fp32 -> bf16 / fp16, bf16 -> bf16;
tensors smaller and larger than a buffer, odd tails), buffers allocated once and rewritten only after their
copies are done (a transport whose copies lag behind until their event is waited for), a NaN refused with the
file and tensor named, and `load_dit` through the staged path. The real CUDA path runs where a GPU is."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from library.wan import loading, staged_load
from library.wan.checkpoint_files import CheckpointError
from library.wan.loading import load_dit
from library.wan.staged_load import HostTransport, StagedLoader
from library.wan.variants import get_variant
from tests.helpers import random_official_dit_state
from tests.wan.staged_standins import LaggingTransport

BUFFER = 1024  # bytes: 512 bf16 elements per staging buffer


@pytest.fixture
def small_pieces(monkeypatch):
    monkeypatch.setattr(staged_load, "MIN_PIECE", 64)  # split tensors at a buffer's end, as large ones are


def _tensors(dtype):
    gen = torch.Generator().manual_seed(0)
    sizes = [(3,), (511,), (512,), (513,), (40, 37), (7,), (3001,), (1,), (2, 3, 5)]  # < / = / > a buffer, tails
    return [(torch.randn(s, generator=gen) * 100).to(dtype) for s in sizes]


@pytest.mark.parametrize("source, target", [(torch.float32, torch.bfloat16), (torch.float32, torch.float16),
                                            (torch.bfloat16, torch.bfloat16), (torch.float32, torch.float32)])
@pytest.mark.parametrize("transport", [HostTransport, LaggingTransport])
def test_staged_tensors_equal_to_dtype_bit_for_bit(source, target, transport, small_pieces):
    tensors, t = _tensors(source), transport()
    with StagedLoader(t, buffer_bytes=BUFFER, depth=3) as loader:
        out = [loader.load(f"t{i}", x, target) for i, x in enumerate(tensors)]
    for x, y in zip(tensors, out):
        ref = x.to(target)
        assert y.dtype == target and y.shape == x.shape and torch.equal(y.view(torch.uint8), ref.view(torch.uint8))
    total = sum(x.numel() * ref.element_size() for x in tensors)
    assert t.buffers == 3 and t.copies >= total // BUFFER  # the ring is allocated once, then reused
    if transport is LaggingTransport:
        assert t.waits > 0  # buffers were waited for before being written again


def test_small_tensors_share_a_buffer_and_one_tensor_fits_one_buffer():
    t = HostTransport()
    with StagedLoader(t, buffer_bytes=4096, depth=2) as loader:
        for i in range(10):
            loader.load(f"t{i}", torch.ones(50), torch.bfloat16)  # 100 bytes, 512 with alignment: 8 per buffer
    assert t.buffers == 2 and t.copies == 10


def test_a_nan_is_reported_with_file_and_tensor(tmp_path, monkeypatch):
    monkeypatch.setattr(staged_load, "transport_for", lambda device: LaggingTransport())
    state = random_official_dit_state(get_variant("t2v-tiny"), 7)
    state["blocks.0.self_attn.q.weight"][1, 2] = float("nan")
    state["blocks.1.ffn.2.weight"][0, 0] = float("inf")
    save_file(state, str(tmp_path / "nan.safetensors"))
    with pytest.raises(CheckpointError, match=r"nan\.safetensors: tensor 'blocks\.0\.self_attn\.q\.weight' holds 1 "
                                              r"NaN and 0 infinite values"):
        load_dit(tmp_path / "nan.safetensors", dtype=torch.bfloat16)


def test_an_overflowing_sum_alone_is_not_an_error():
    seen = []
    with StagedLoader(HostTransport(), screen=lambda key, t: seen.append(key), buffer_bytes=BUFFER) as loader:
        loader.load("big", torch.full((4,), 3e38), torch.float32)  # finite values whose fp32 sum is infinite
        loader.load("fine", torch.full((4,), 6e4), torch.float16)  # an fp16 sum would overflow; fp32 does not
    assert seen == ["big"]  # only sent to the exact count, which finds nothing
    loading.check_finite(None, "big", torch.full((4,), 3e38))


def test_load_dit_through_the_staged_path_equals_the_plain_load(tmp_path, monkeypatch):
    path = tmp_path / "dit_fp32.safetensors"
    save_file(random_official_dit_state(get_variant("t2v-tiny"), 3), str(path))
    plain = load_dit(path, dtype=torch.bfloat16).state_dict()
    made = []

    def transport(device):
        made.append(LaggingTransport())
        return made[-1]

    monkeypatch.setattr(staged_load, "transport_for", transport)
    monkeypatch.setattr(staged_load, "BUFFER_BYTES", 4096)  # several buffers' worth even for the tiny model
    staged = load_dit(path, dtype=torch.bfloat16).state_dict()
    assert staged.keys() == plain.keys()
    for key, tensor in plain.items():
        assert staged[key].dtype == tensor.dtype and torch.equal(staged[key].view(torch.uint8),
                                                                 tensor.view(torch.uint8)), key
    assert len(made) == 1 and made[0].buffers == staged_load.DEPTH and made[0].waits > 0
    assert staged["blocks.0.modulation"].dtype == torch.float32  # kept fp32 as in every load


def test_the_cpu_and_a_disabled_stager_use_the_per_tensor_path(monkeypatch):
    assert staged_load.transport_for(torch.device("cpu")) is None
    monkeypatch.setattr(staged_load, "ENABLED", False)
    assert staged_load.transport_for(torch.device("cuda")) is None  # WAN_STAGED_LOAD=0
    with pytest.raises(ValueError, match="multiple of 512"):
        StagedLoader(HostTransport(), buffer_bytes=1000)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cuda_load_equals_the_cpu_load_and_the_per_tensor_path(tmp_path, monkeypatch, dtype):
    path = tmp_path / "dit_fp32.safetensors"
    state = random_official_dit_state(get_variant("t2v-tiny"), 3)
    save_file(state, str(path))
    cpu = load_dit(path, dtype=dtype).state_dict()
    monkeypatch.setattr(staged_load, "BUFFER_BYTES", 4096)
    staged = load_dit(path, device="cuda", dtype=dtype).state_dict()
    monkeypatch.setattr(staged_load, "ENABLED", False)
    per_tensor = load_dit(path, device="cuda", dtype=dtype).state_dict()
    for key, tensor in cpu.items():
        assert staged[key].is_cuda and torch.equal(staged[key].cpu().view(torch.uint8), tensor.view(torch.uint8))
        assert torch.equal(per_tensor[key].cpu().view(torch.uint8), tensor.view(torch.uint8)), key
    monkeypatch.setattr(staged_load, "ENABLED", True)
    state["head.head.weight"][0, 1] = float("nan")
    save_file(state, str(tmp_path / "nan.safetensors"))
    with pytest.raises(CheckpointError, match=r"tensor 'head\.head\.weight' holds 1 NaN and 0 infinite"):
        load_dit(tmp_path / "nan.safetensors", device="cuda", dtype=dtype)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_staged_tensor_memory_freed_by_the_compute_stream_is_written_after_its_readers():
    """The fp8 load quantises each weight on the compute stream as soon as it arrives and frees it: the
    allocator hands that memory to the next staged tensor at once, which the side stream writes. The side
    stream must wait for the compute-stream kernel still reading the freed tensor (held back here by a sleep
    kernel), or that kernel reads the next tensor's values."""
    torch.cuda.synchronize()
    sources = [torch.full((1 << 20,), float(i)) for i in range(8)]  # 4 MiB each: every one the same block size
    sums = []
    with StagedLoader(staged_load.CudaTransport(torch.device("cuda")), buffer_bytes=4 << 20) as loader:
        for i, source in enumerate(sources):
            out = loader.load(f"t{i}", source, torch.float32)
            loader.join()
            torch.cuda._sleep(50_000_000)  # the compute stream is busy for some milliseconds before it reads
            sums.append(out.sum())
            del out  # back to the compute stream's pool while the sum has not run yet
    torch.cuda.synchronize()
    assert [s.item() for s in sums] == [float(i << 20) for i in range(8)]

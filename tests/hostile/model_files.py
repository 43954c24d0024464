"""Hostile model files for the suite, each a few bytes to a few hundred kB: random bytes, empty files, cut
copies, headers that lie about their size or nest without end, a pickle whose unpickling would run a shell
command (it touches a marker file, so a test can prove it never ran), other architectures' key names, and
copies of a real file with a tensor removed or set to NaN."""

from __future__ import annotations

import json
import os
import pickle
import random
import struct
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

HUGE_HEADER = 1 << 40  # a header length of 1 TiB in the first 8 bytes
OVER_LIMIT = 100 * 1024 * 1024 + 8  # just over the reader's 100 MiB header limit


def random_bytes(path: Path, size: int = 4096) -> Path:
    path.write_bytes(random.Random(0).randbytes(size))
    return path


def zero_bytes(path: Path) -> Path:
    path.write_bytes(b"")
    return path


def truncated(source: Path, path: Path) -> Path:
    """The first half of `source` (a download or copy that stopped)."""
    data = source.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


def huge_header(path: Path) -> Path:
    """A safetensors file whose length field claims a 1 TiB header."""
    path.write_bytes(struct.pack("<Q", HUGE_HEADER) + b'{"a": {}}')
    return path


def header_over_limit(path: Path) -> Path:
    """A 100 MiB sparse file (no disk space used) whose header length is just over the reader's limit."""
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", OVER_LIMIT))
        f.truncate(OVER_LIMIT + 64)
    return path


def nesting_bomb(path: Path, depth: int = 100_000) -> Path:
    """A safetensors header that is `depth` nested JSON lists (Python's parser would recurse that deep)."""
    header = b"[" * depth
    path.write_bytes(struct.pack("<Q", len(header)) + header)
    return path


def lying_offsets(path: Path) -> Path:
    """A tensor entry whose data offsets do not match its shape (the reader would read past the tensor)."""
    header = json.dumps({"w": {"dtype": "F32", "shape": [4, 4], "data_offsets": [0, 8]}}).encode()
    path.write_bytes(struct.pack("<Q", len(header)) + header + bytes(8))
    return path


class _RunsCode:
    """Unpickling this calls os.system: the attack a weights-only loader must refuse."""

    def __init__(self, marker: Path):
        self.command = f"touch {marker}"

    def __reduce__(self):
        return os.system, (self.command,)


def code_pickle(path: Path, marker: Path, zipped: bool) -> Path:
    """A .pth whose unpickling would run `touch marker`: torch.save's zip format, or a raw pickle."""
    payload = {"weight": _RunsCode(marker)}
    if zipped:
        torch.save(payload, path)
    else:
        with open(path, "wb") as f:
            pickle.dump(payload, f)
    return path


def keys_file(path: Path, keys: list[str]) -> Path:
    """A safetensors file with these key names (tiny tensors): what another architecture's file looks like."""
    save_file({k: torch.zeros(2, 2) for k in keys}, str(path))
    return path


SDXL_KEYS = ["model.diffusion_model.input_blocks.0.0.weight", "model.diffusion_model.label_emb.0.0.weight",
             "conditioner.embedders.0.transformer.text_model.embeddings.token_embedding.weight",
             "first_stage_model.decoder.conv_in.weight", "first_stage_model.post_quant_conv.weight"]
FLUX_KEYS = ["double_blocks.0.img_attn.qkv.weight", "single_blocks.0.linear1.weight", "txt_in.weight",
             "img_in.weight"]


def _tensors(source: Path) -> dict[str, torch.Tensor]:
    with safe_open(str(source), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def without_key(source: Path, path: Path, key: str) -> Path:
    tensors = _tensors(source)
    del tensors[key]
    save_file(tensors, str(path))
    return path


def with_value(source: Path, path: Path, key: str, value: float = float("nan")) -> Path:
    """A copy of `source` with one element of `key` set to `value` (NaN by default)."""
    tensors = _tensors(source)
    tensors[key] = tensors[key].clone()
    tensors[key].view(-1)[0] = value
    save_file(tensors, str(path))
    return path


def tiny_lora(path: Path, dim: int = 32, blocks: int = 2, up: float | None = None) -> Path:
    """A rank-2 Kohya LoRA on the self-attention of a `dim`-wide DiT (t2v-tiny); `up` fills the up-projections
    (NaN for a LoRA from a diverged training), else they are random."""
    g, tensors = torch.Generator().manual_seed(0), {}
    for block in range(blocks):
        for proj in "qkvo":
            name = f"lora_unet_blocks_{block}_self_attn_{proj}"
            tensors[f"{name}.lora_down.weight"] = torch.randn(2, dim, generator=g)
            tensors[f"{name}.lora_up.weight"] = (torch.full((dim, 2), up) if up is not None
                                                 else torch.randn(dim, 2, generator=g))
            tensors[f"{name}.alpha"] = torch.tensor(2.0)
    save_file(tensors, str(path))
    return path

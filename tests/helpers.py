"""Shared helpers for tests: locating the reference facts and building tiny models in official formats."""

from __future__ import annotations

import contextlib
import importlib
import re
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


def tool(name: str):
    """A script of tools/ imported as a module (tools/ is no package: its scripts import each other by name)."""
    sys.path.insert(0, str(REPO / "tools"))
    try:
        return importlib.import_module(name)
    finally:
        sys.path.remove(str(REPO / "tools"))
SHARED = REPO.parent / "shared"


def reference_file(*parts: str) -> Path:
    """A file under ../shared/reference, or skip the test when the checkout has no shared/ beside it."""
    path = SHARED.joinpath("reference", *parts)
    if not path.is_file():
        pytest.skip(f"reference file {path} not available in this checkout")
    return path


def parse_key_sections(path: Path) -> dict[str, dict]:
    """Parse a keys dump: '===== name nkeys N params P' headers, then 'key [shape]' lines."""
    sections: dict[str, dict] = {}
    current = None
    for line in path.read_text().splitlines():
        head = re.match(r"^===== (\S+) (?:nkeys )?(\d+) (?:params )?(\d+)", line)
        if head:
            current = {"nkeys": int(head.group(2)), "params": int(head.group(3)), "shapes": {}}
            sections[head.group(1)] = current
            continue
        item = re.match(r"^(\S+) \[([\d, ]*)\]$", line)
        if item and current is not None:
            shape = tuple(int(s) for s in item.group(2).split(",") if s.strip())
            current["shapes"][item.group(1)] = shape
    return sections


def random_official_dit_state(variant, seed: int = 0, dtype=torch.float32) -> dict[str, torch.Tensor]:
    """Random weights for a tiny variant, in official key names (non-trivial norms and modulation)."""
    from library.wan.model import WanModel

    torch.manual_seed(seed)
    model = WanModel(variant)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1 and "norm" in name:
                p.copy_(1 + 0.1 * torch.randn_like(p))
            elif "head.head" in name:
                p.normal_(0, 0.2)
    return {k: v.to(dtype).contiguous() for k, v in model.state_dict().items()}


def diffusers_transformer(variant):
    """diffusers' WanTransformer3DModel with the shapes of one of our variants (random init; build it under
    `torch.device("meta")` when only its key names are needed)."""
    from diffusers import WanTransformer3DModel

    return WanTransformer3DModel(
        patch_size=variant.patch_size, num_attention_heads=variant.num_heads, attention_head_dim=variant.head_dim,
        in_channels=variant.in_dim, out_channels=variant.out_dim, text_dim=variant.text_dim,
        freq_dim=variant.freq_dim, ffn_dim=variant.ffn_dim, num_layers=variant.num_layers,
        image_dim=variant.clip_dim if variant.image_embedding else None,
        added_kv_proj_dim=variant.dim if variant.image_embedding else None,
        pos_embed_seq_len=2 * variant.clip_tokens if getattr(variant, "end_frame", False) else None,
    )


def torchrun(processes: int) -> list[str]:
    """The command prefix of a `torch.distributed.run` launch of `processes` local processes. `--standalone`
    lets the rendezvous take a free port itself: a port picked in advance (or a fixed one) can be taken by
    another run in the meantime."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes)]


@contextlib.contextmanager
def single_thread():
    """Tiny models run fastest on one thread: intra-op threads only add overhead (and large slowdowns on a
    busy machine). Restores the thread count afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def attach_trained_lora(model, rank: int = 4):
    """A rank-`rank` LoRA (networks.lora_wan) applied to `model`, its up-projections non-zero as in a trained
    LoRA (so the down-projections get gradients too). Seed torch before calling for repeatable weights."""
    from networks.lora_wan import create_network

    network = create_network(1.0, rank, rank, None, None, model)
    network.apply_to()
    with torch.no_grad():
        for name, p in network.named_parameters():
            if "lora_up" in name:
                p.normal_(0, 0.1)
    return network

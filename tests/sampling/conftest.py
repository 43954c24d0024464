"""Tiny model sets and LoRA files for the sampling tests (CPU, random weights, official formats)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models run fastest on one thread: intra-op threads only add overhead (and 10x slowdowns when the
    machine is busy). Restored after each test."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def make_tiny_sets(root: Path) -> dict:
    """{task: TinyModelSet} for t2v-tiny (two experts), i2v-tiny and ti2v-tiny."""
    from library.wan.tiny import write_tiny_model_set

    return {task: write_tiny_model_set(root / task, task) for task in ("t2v-tiny", "i2v-tiny", "ti2v-tiny")}


@pytest.fixture(scope="session")
def tiny_sets(tmp_path_factory):
    return make_tiny_sets(tmp_path_factory.mktemp("tiny_models"))


def load_models(model_set, text_encoder: bool = True):
    """SamplingModels for a tiny set, fp32 on the CPU."""
    from library.sampling.generate import SamplingModels
    from library.wan.loading import load_dit, load_text_encoder, load_vae

    task = model_set.task
    experts = {"dit": load_dit(model_set.dit, task=task)} if model_set.dit_high_noise is None else {
        "high_noise": load_dit(model_set.dit_high_noise, task=task), "low_noise": load_dit(model_set.dit, task=task)}
    encoder = load_text_encoder(model_set.t5, model_set.tokenizer, dtype=torch.float32) if text_encoder else None
    return SamplingModels(experts[next(iter(experts))].variant, experts, load_vae(model_set.vae), encoder)


def write_lora(model, path: Path, variant, expert: str | None = None, seed: int = 0, scale: float = 0.5,
               steps: int | None = None) -> Path:
    """A random (non-zero) LoRA over `model`, saved with WAN metadata like the trainer writes it."""
    from networks import lora_wan

    network = lora_wan.create_network(1.0, 4, 4, None, None, model)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for lora in network.loras:
            lora.lora_up.weight.copy_(torch.randn(lora.lora_up.weight.shape, generator=g) * scale)
    meta = lora_wan.build_lora_metadata(variant.name, variant.version, expert=expert, network_dim=4,
                                        network_alpha=4, steps=steps)
    return network.save_weights(path, metadata=meta)

"""Fixtures for the memory tests: tiny WAN models with deeper stacks (so block swap has blocks to swap),
and the `gpu` marker's skip when CUDA is absent."""

from __future__ import annotations

import dataclasses

import pytest
import torch


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def deep_tiny(layers: int = 6, name: str = "t2v-tiny"):
    """A tiny variant with more blocks (the tiny ones have 2)."""
    from library.wan.variants import get_variant

    return dataclasses.replace(get_variant(name), num_layers=layers, name=f"{name}-{layers}")


def tiny_model(variant, seed: int = 0):
    """A frozen tiny WAN model with the test helpers' random weights (non-trivial norms, non-zero head)."""
    from library.wan.model import WanModel
    from tests.helpers import random_official_dit_state

    model = WanModel(variant)
    model.load_state_dict(random_official_dit_state(variant, seed))
    return model.requires_grad_(False).eval()


def tiny_inputs(variant, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, variant.in_dim, 3, 4, 4, generator=g)
    return x, torch.tensor([400.0]), [torch.randn(5, variant.text_dim, generator=g)]

"""One-frame mode's RoPE frame positions (musubi-tuner's f_indices) and its index syntax."""

from __future__ import annotations

import pytest
import torch

from library.sampling.one_frame import parse
from library.wan.model import WanModel, rope_tables
from library.wan.variants import get_variant


def test_frame_positions_pick_rows_of_the_full_table():
    grid, head = (6, 2, 3), 16
    full_cos, full_sin = rope_tables(grid, head, "cpu")
    cos, sin = rope_tables((2, 2, 3), head, "cpu", frame_positions=[0, 5])
    rows = torch.cat([torch.arange(0, 6), torch.arange(30, 36)])  # frames 0 and 5 of the 6-frame grid
    assert torch.equal(cos, full_cos[rows]) and torch.equal(sin, full_sin[rows])


def test_model_takes_frame_positions():
    variant = get_variant("i2v-tiny-2.1")
    torch.manual_seed(0)
    model = WanModel(variant).eval()
    with torch.no_grad():
        model.head.head.weight.normal_(0, 0.2)
    x, y = torch.randn(1, 16, 2, 4, 4), torch.randn(1, 20, 2, 4, 4)
    args = (x, torch.tensor([500.0]), [torch.randn(3, variant.text_dim)])
    kw = dict(y=y, clip_fea=torch.randn(1, 257, variant.clip_dim))
    with torch.no_grad():
        default, same, far = (model(*args, **kw, **extra) for extra in
                              ({}, {"frame_positions": [0, 1]}, {"frame_positions": [0, 9]}))
        with pytest.raises(ValueError, match="frame_positions has 3 entries for 2 latent frames"):
            model(*args, **kw, frame_positions=[0, 1, 2])
    assert torch.equal(default, same) and (far - default).abs().max() > 1e-4


def test_one_frame_index_syntax():
    assert parse("target_index=1,control_index=0") == (1, [0], [0, 1], 1)
    assert parse("control_index=0;2, target_index=1") == (1, [0, 2], [0, 1, 2], 1)
    assert parse("target_index=9,control_index=0") == (9, [0], [0, 9], 1)
    for bad in ("target_index=1", "target_index=x,control_index=0", "target_index=1,control_index=1", "foo=1"):
        with pytest.raises(ValueError):
            parse(bad)

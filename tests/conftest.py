"""Shared pytest fixtures: tiny, download-free stand-ins for the real WAN components."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def tiny_umt5_tokenizer_dir(tmp_path_factory):
    """A local folder laid out like google/umt5-xxl, holding a tiny umT5-style tokenizer (128 pieces,
    pad 0, eos 1, unk 2); see `library.wan.tiny.write_tiny_tokenizer` for how it is built offline."""
    from library.wan.tiny import write_tiny_tokenizer

    return write_tiny_tokenizer(tmp_path_factory.mktemp("tiny_umt5_tokenizer"))

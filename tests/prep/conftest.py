"""Fixtures for the dataset-preparation tests: the raw folder (see raw_media.py) and one shared run."""

from __future__ import annotations

import shutil

import pytest

from library.prep.pipeline import PrepConfig, prepare_dataset
from tests.prep.raw_media import SETTINGS, write_raw


@pytest.fixture(scope="session")
def raw_dir(tmp_path_factory):
    return write_raw(tmp_path_factory.mktemp("raw"))


@pytest.fixture(scope="session")
def prepared(raw_dir, tmp_path_factory):
    """One pipeline run shared by the read-only tests: (config, result)."""
    out = tmp_path_factory.mktemp("prepared")
    config = PrepConfig(inputs=(raw_dir,), output_dir=out, analysis=SETTINGS, progress=False)
    return config, prepare_dataset(config)


@pytest.fixture
def fresh_copy(raw_dir, tmp_path):
    """A private copy of the raw folder for tests that change it."""
    copy = tmp_path / "raw"
    shutil.copytree(raw_dir, copy)
    return copy

"""Shared fixtures for the hostile-input suite: the real CLIs run in a subprocess, tiny models and a tiny
dataset made once per session, and the check every refusal must pass (exit status 2, the expected
message, no traceback)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def run_tool(name: str, *args, cwd: Path | None = None, env: dict | None = None,
             timeout: float = 240) -> subprocess.CompletedProcess:
    """`python tools/NAME.py ARGS` as a user runs it, from `cwd`."""
    return subprocess.run([sys.executable, str(REPO / "tools" / f"{name}.py"), *map(str, args)], cwd=cwd,
                          capture_output=True, text=True, timeout=timeout, env={**os.environ, **(env or {})})


def assert_refused(result: subprocess.CompletedProcess, message: str, status: int = 2) -> str:
    """The command failed with `status`, said `message` and showed no traceback; returns its output."""
    output = result.stdout + result.stderr
    assert "Traceback" not in output, output
    assert result.returncode == status, output
    assert message in output, output
    return output


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory):
    """The tiny t2v task's model files (VAE 2.1, umT5, tokenizer, DiT), written once."""
    from library.wan.tiny import write_tiny_model_set

    return write_tiny_model_set(tmp_path_factory.mktemp("hostile_models") / "t2v-tiny", "t2v-tiny")


@pytest.fixture(scope="session")
def demo_source(tmp_path_factory) -> Path:
    """A small captioned dataset (2 clips, 2 images) in the guide's layout; copy it before changing it."""
    from library.prep.demo_dataset import write_demo_dataset

    root = tmp_path_factory.mktemp("hostile_demo")
    write_demo_dataset(root, clips=2, images=2, width=32, height=32, frames=9, target_frames=(5,))
    return root


@pytest.fixture(scope="module")
def cached_demo(demo_source, tiny_models, tmp_path_factory) -> Path:
    """The demo dataset with its latents and text cached (dataset.toml inside), once per test module."""
    import torch

    from library.data.dataset_config import load_dataset_config
    from library.data.latent_caching import cache_latents
    from library.data.text_caching import cache_text_encoder_outputs

    root = tmp_path_factory.mktemp("hostile_cached") / "demo"
    shutil.copytree(demo_source, root, ignore=shutil.ignore_patterns("cache", "dataset.toml"))
    (root / "dataset.toml").write_text(DEMO_TOML, encoding="utf-8")
    config = load_dataset_config(root / "dataset.toml")
    cache_latents(config, tiny_models.vae, task="t2v-tiny", progress=False)
    cache_text_encoder_outputs(config, tiny_models.t5, tokenizer=tiny_models.tokenizer, dtype=torch.float32,
                               progress=False)
    return root


def copy_demo(demo_source: Path, folder: Path) -> Path:
    """A private copy of the demo dataset in folder/demo, with a dataset.toml using paths relative to it."""
    root = folder / "demo"
    shutil.copytree(demo_source, root, ignore=shutil.ignore_patterns("cache", "dataset.toml"))
    (root / "dataset.toml").write_text(DEMO_TOML, encoding="utf-8")
    return root


@pytest.fixture
def demo(demo_source, tmp_path) -> Path:
    """A private copy of the demo dataset (`copy_demo`) for one test."""
    return copy_demo(demo_source, tmp_path)


def add_image(root: Path, name: str, make) -> Path:
    """`make(path)` writes images/NAME (a bad image, a link), captioned in captions/ as the demo items are."""
    path = make(root / "images" / name)
    (root / "captions" / f"{Path(name).stem}.txt").write_text(f"caption of {name}", encoding="utf-8")
    return path


def overwrite_tensor_data(path: Path, how: str) -> Path:
    """Overwrite the tensor bytes of a safetensors file in place, keeping its header and metadata: "zeros",
    "random", or "strip" (rewrite the tensors unchanged without the content checksum, as an older version
    of the trainer wrote them)."""
    if how == "strip":
        from safetensors import safe_open
        from safetensors.torch import save_file

        with safe_open(str(path), framework="pt") as handle:
            meta = {k: v for k, v in (handle.metadata() or {}).items() if k != "content_crc32"}
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}
        save_file(tensors, str(path), metadata=meta)
        return path
    data = bytearray(path.read_bytes())
    start = 8 + int.from_bytes(data[:8], "little")  # 8-byte header length, JSON header, then the tensor bytes
    data[start:] = bytes(len(data) - start) if how == "zeros" else os.urandom(len(data) - start)
    path.write_bytes(bytes(data))
    return path


def dangling_link(path: Path) -> Path:
    """A symbolic link at `path` to a file that does not exist."""
    os.symlink(path.parent / "deleted_original.png", path)
    return path


DEMO_TOML = """[general]
resolution = [32, 32]
enable_bucket = true

[[datasets]]
image_directory = "images"
cache_directory = "cache/images"

[[datasets]]
video_directory = "videos"
cache_directory = "cache/videos"
target_frames = [5]
source_fps = 16
"""

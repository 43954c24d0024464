"""Fixtures for the data tests: tiny media made on the fly and tiny official-format model sets."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest


def gradient_frame(width: int, height: int, shift: int = 0) -> np.ndarray:
    """A deterministic RGB uint8 frame with structure in both axes (and motion via `shift`)."""
    x = np.arange(width)[None, :, None]
    y = np.arange(height)[:, None, None]
    c = np.array([1, 2, 3])[None, None, :]
    return ((x * 4 + y * 3 + c * 40 + shift * 9) % 256).astype(np.uint8)


def write_image(path: Path, width: int = 64, height: int = 48, mode: str = "RGB") -> Path:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(gradient_frame(width, height)).convert(mode).save(path)
    return path


def write_video(path: Path, frames: int = 12, fps: float = 16.0, width: int = 64, height: int = 48) -> Path:
    import cv2

    path.parent.mkdir(parents=True, exist_ok=True)
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), fps, (width, height))
    for i in range(frames):
        writer.write(gradient_frame(width, height, i)[:, :, ::-1])
    writer.release()
    return path


def write_caption(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def write_toml(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory):
    """task -> TinyModelSet for the three tiny tasks (VAE 2.1 stride 8, VAE 2.2 stride 16)."""
    from library.wan.tiny import write_tiny_model_set

    root = tmp_path_factory.mktemp("tiny_models")
    return {task: write_tiny_model_set(root / task, task) for task in ("t2v-tiny", "i2v-tiny", "ti2v-tiny")}

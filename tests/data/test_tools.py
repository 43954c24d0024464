"""The two caching CLIs: thin shells over library/data, musubi-compatible flags, exit status, summary."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import write_caption, write_image, write_toml

REPO = Path(__file__).resolve().parents[2]


def _tool(name: str):
    spec = importlib.util.spec_from_file_location(f"tool_{name}", REPO / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def dataset_toml(tmp_path):
    write_image(tmp_path / "imgs/a.png")
    write_caption(tmp_path / "imgs/a.txt", "a cat")
    write_image(tmp_path / "imgs/b.png")  # no caption: reported, not fatal
    return write_toml(tmp_path / "d.toml", "[general]\nresolution = 32\ncaption_dropout_rate = 0.1\n"
                                           "[[datasets]]\nimage_directory = 'imgs'\ncache_directory = 'cache'\n")


def test_cache_tools_end_to_end(dataset_toml, tiny_models, capsys):
    models = tiny_models["t2v-tiny"]
    common = ["--dataset_config", str(dataset_toml), "--device", "cpu", "--no_progress", "--skip_existing"]
    assert _tool("cache_latents").main([*common, "--vae", str(models.vae), "--vae_dtype", "float32",
                                        "--batch_size", "2", "--num_workers", "1"]) == 0
    out = capsys.readouterr().out
    assert "latents: 1 cached, 0 reused (fresh), 1 skipped" in out and "b.png: missing caption" in out
    assert _tool("cache_text_encoder_outputs").main([*common, "--t5", str(models.t5), "--tokenizer",
                                                     str(models.tokenizer), "--fp8_t5"]) == 0
    assert "text encoder outputs: 2 cached" in capsys.readouterr().out  # "a cat" and "" (dropout)
    assert _tool("cache_latents").main([*common, "--vae", str(models.vae), "--task", "t2v-tiny"]) == 0
    assert "latents: 0 cached, 1 reused (fresh)" in capsys.readouterr().out
    assert _tool("cache_latents").main([*common, "--vae", str(models.vae), "--strict"]) == 2
    assert "error: --strict" in capsys.readouterr().out


def test_tool_errors_are_messages(tmp_path, tiny_models, capsys):
    bad = write_toml(tmp_path / "bad.toml", "[[datasets]]\nimage_directory = 'x'\nbatchsize = 2\n")
    assert _tool("cache_latents").main(["--dataset_config", str(bad), "--vae", str(tiny_models["t2v-tiny"].vae),
                                        "--device", "cpu"]) == 2
    assert "unknown key 'batchsize'; did you mean 'batch_size'?" in capsys.readouterr().out
    assert _tool("cache_text_encoder_outputs").main(["--dataset_config", str(bad), "--t5", str(tmp_path / "none.pth"),
                                                     "--device", "cpu"]) == 2


@pytest.mark.parametrize("name, flags", [
    ("cache_latents", ["--vae", "--vae_dtype", "--i2v", "--task", "--skip_existing", "--num_workers", "--strict"]),
    ("cache_text_encoder_outputs", ["--t5", "--fp8_t5", "--tokenizer", "--batch_size", "--device"]),
])
def test_help_from_another_directory(tmp_path, name, flags):
    result = subprocess.run([sys.executable, str(REPO / "tools" / f"{name}.py"), "--help"], cwd=tmp_path,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert all(flag in result.stdout for flag in ["--dataset_config", *flags])

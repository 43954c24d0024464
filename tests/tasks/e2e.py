"""The workflow of the README on a tiny model, in process: the caching tools, `train_network_wan.py` and
`generate_video_wan.py`, each through its `main(argv)` (the same code as the command line, without the
start-up time of a new interpreter)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.helpers import REPO, single_thread


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models run fastest on one thread (intra-op threads only add overhead on a busy machine)."""
    with single_thread():
        yield


def entry(script: str):
    """The `main` of an entry script of this repository."""
    spec = importlib.util.spec_from_file_location(f"entry_{Path(script).stem}", REPO / script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


def write_image(path: Path, seed: int = 0, size: tuple[int, int] = (32, 32)) -> Path:
    import cv2

    cv2.imwrite(str(path), np.random.default_rng(seed).integers(0, 255, (size[1], size[0], 3), dtype=np.uint8))
    return path


def cache(models, dataset: Path, task: str, *extra: str) -> None:
    clip = ["--clip", str(models.clip)] if models.clip else []
    assert entry("tools/cache_latents.py")(["--dataset_config", str(dataset), "--vae", str(models.vae), "--task",
                                            task, "--no_progress", "--num_workers", "0", *clip, *extra]) == 0
    assert entry("tools/cache_text_encoder_outputs.py")(["--dataset_config", str(dataset), "--t5", str(models.t5),
                                                         "--tokenizer", str(models.tokenizer),
                                                         "--no_progress"]) == 0


def train(models, dataset: Path, task: str, out: Path, *extra: str, steps: int = 2) -> Path:
    """Two LoRA steps; returns the LoRA file."""
    clip = ["--clip", str(models.clip)] if models.clip else []
    argv = ["--task", task, "--dit", str(models.dit), "--dataset_config", str(dataset), "--output_dir", str(out),
            "--output_name", "lora", "--network_dim", "4", "--network_alpha", "4", "--learning_rate", "5e-3",
            "--optimizer_type", "AdamW", "--max_train_steps", str(steps), "--seed", "3",
            "--max_data_loader_n_workers", "0", *clip, *extra]
    assert entry("train_network_wan.py")(argv) == 0
    return out / "lora.safetensors"


def generate(models, task: str, out: Path, lora: Path | None, *extra: str) -> dict:
    """One video with the LoRA (musubi's flags); returns its sidecar."""
    clip = ["--clip", str(models.clip)] if models.clip else []
    loras = ["--lora_weight", str(lora), "--lora_multiplier", "1.0"] if lora else []
    argv = ["--task", task, "--dit", str(models.dit), "--vae", str(models.vae), "--t5", str(models.t5),
            "--tokenizer", str(models.tokenizer), "--prompt", "a cat walks", "--infer_steps", "2", "--seed", "1",
            "--video_size", "32", "32", "--save_path", str(out), "--output_name", "v", *clip, *loras, *extra]
    assert entry("generate_video_wan.py")(argv) == 0
    sidecars = sorted(out.glob("v*.json"))
    assert sidecars, list(out.iterdir())
    return json.loads(sidecars[0].read_text())


def assert_comfyui_loads(lora: Path, task: str) -> None:
    """Every module of a trained LoRA names a weight of the model under ComfyUI's LoRA key map
    (`lora_unet_<name with underscores>`, `tests/networks/comfyui_lycoris_rules.py`), so none is 'not loaded'."""
    from safetensors.torch import load_file

    from library.wan.model import WanModel
    from library.wan.variants import get_variant
    from tests.networks.comfyui_lycoris_rules import key_map

    with torch.device("meta"):
        weights = WanModel(get_variant(task)).state_dict()
    keys = load_file(str(lora))
    stems = {key.rsplit(".", 2)[0] if key.endswith(".weight") else key.rsplit(".", 1)[0] for key in keys}
    mapped = key_map(weights)
    assert stems and not [s for s in stems if s not in mapped], sorted(s for s in stems if s not in mapped)[:3]

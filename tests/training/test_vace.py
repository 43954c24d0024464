"""VACE end to end on the tiny model: a dataset with control videos, masks and reference images -> latent
and VACE-context caches -> LoRA training on the base and VACE blocks -> a LoRA ComfyUI resolves ->
generation with it, a control video, a mask and a reference image."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import replace

import cv2
import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from library.config import config_from_dict, validate
from library.sampling.prompts import PromptError
from library.training.trainer import Trainer
from tests.helpers import REPO, single_thread
from tests.networks.comfyui_lora_rules import comfyui_lora_targets

TASK = "vace-tiny"


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    with single_thread():
        yield


def _write_media(root, name: str, frames: int, size: tuple[int, int], seed: int, image: bool = False):
    rng = np.random.default_rng(seed)
    pixels = (rng.random((frames, size[1], size[0], 3)) * 255).astype(np.uint8)
    if image:
        cv2.imwrite(str(root / f"{name}.png"), pixels[0])
        return
    writer = cv2.VideoWriter(str(root / f"{name}.mp4"), cv2.VideoWriter_fourcc(*"mp4v"), 16, size)
    for frame in pixels:
        writer.write(frame)
    writer.release()


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """The tiny VACE model set and two 9-frame clips with a control video, a mask and a reference each."""
    from library.data.dataset_config import load_dataset_config
    from library.data.latent_caching import cache_latents
    from library.data.text_caching import cache_text_encoder_outputs
    from library.prep.demo_dataset import write_demo_dataset
    from library.wan.tiny import write_tiny_model_set

    root = tmp_path_factory.mktemp("vace")
    models = write_tiny_model_set(root / "models", TASK)
    toml = write_demo_dataset(root / "data", clips=2, images=0, width=32, height=32, frames=9)
    for sub in ("controls", "masks", "refs"):
        (root / sub).mkdir()
    for i in range(2):
        _write_media(root / "controls", f"clip_{i:03d}", 9, (32, 32), i)
        _write_media(root / "refs", f"clip_{i:03d}", 1, (24, 40), 10 + i, image=True)  # letterboxed
    _write_media(root / "masks", "clip_000", 9, (32, 32), 20)  # a mask video
    mask = np.zeros((32, 32, 3), np.uint8)
    mask[8:24, 8:24] = 255
    cv2.imwrite(str(root / "masks" / "clip_001.png"), mask)  # a still mask for every frame
    text = toml.read_text()
    text = text[: text.rindex("[[datasets]]")] + (
        f'control_directory = "{(root / "controls").as_posix()}"\n'
        f'mask_directory = "{(root / "masks").as_posix()}"\n'
        f'reference_directory = "{(root / "refs").as_posix()}"\n')
    toml.write_text(text)
    config = load_dataset_config(toml)
    summary = cache_latents(config, models.vae, task=TASK, progress=False)
    assert summary.cached == 2 and summary.ok, summary.report()
    cache_text_encoder_outputs(config, models.t5, tokenizer=models.tokenizer, dtype=torch.float32, progress=False)
    return {"models": models, "dataset": toml, "root": root}


def _config(ws, out, **over):
    return validate(config_from_dict({
        "task": TASK, "dit": str(ws["models"].dit), "dataset_config": str(ws["dataset"]), "output_dir": str(out),
        "output_name": "lora", "network_dim": 4, "network_alpha": 4, "learning_rate": 5e-3,
        "optimizer_type": "AdamW", "max_train_steps": 2, "seed": 3, "max_data_loader_n_workers": 0, **over}))


def test_caches_hold_the_vace_context_and_reference_latents(workspace):
    from library.data.cache import latent_cache_path

    cache_dir = workspace["root"] / "data" / "cache" / "videos"
    files = sorted(cache_dir.glob("*.safetensors"))
    assert len(files) == 2
    tensors = load_file(str(files[1]))
    assert tensors["latents"].shape == (16, 3, 4, 4)
    assert tensors["vace_context"].shape == (96, 4, 4, 4)  # 1 reference frame + 3 latent frames
    assert tensors["reference_latents"].shape == (16, 1, 4, 4)
    still = tensors["vace_context"][32:, 1:].float()  # the still mask: 1 inside [8, 24) pixels, 0 outside
    assert still[:, :, 1:3, 1:3].eq(1).all() and still[:, :, 0].eq(0).all()
    assert latent_cache_path(cache_dir, "x", "2.1").parent == cache_dir


@pytest.fixture(scope="module")
def trained_lora(workspace, tmp_path_factory):
    """Two steps of `train_network_wan.py` (its command line, in a subprocess) on the cached VACE dataset."""
    out = tmp_path_factory.mktemp("vace_lora")
    flags = {"task": TASK, "dit": workspace["models"].dit, "dataset_config": workspace["dataset"], "output_dir": out,
             "output_name": "lora", "network_module": "networks.lora_wan", "network_dim": 4, "network_alpha": 4,
             "learning_rate": 5e-3, "optimizer_type": "AdamW", "max_train_steps": 2, "seed": 3,
             "max_data_loader_n_workers": 0, "save_lora_format": "comfyui"}
    proc = subprocess.run([sys.executable, str(REPO / "train_network_wan.py"),
                           *sum(([f"--{k}", str(v)] for k, v in flags.items()), [])],
                          capture_output=True, text=True, timeout=300, cwd=out, env=_env())
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out / "lora.safetensors"


def _env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}


def test_trains_lora_on_base_and_vace_blocks_that_comfyui_resolves(workspace, trained_lora):
    from library.wan.loading import load_dit

    with safe_open(str(trained_lora), "pt") as f:
        weights = {k: f.get_tensor(k) for k in f.keys()}
    names = {k.rsplit(".", 2)[0] for k in weights if k.endswith("lora_B.weight")}
    assert "diffusion_model.vace_blocks.1.self_attn.q" in names and "diffusion_model.blocks.3.ffn.2" in names
    assert any(t.abs().sum() > 0 for k, t in weights.items() if "vace_blocks" in k and "lora_B" in k)
    model_keys = {"diffusion_model." + k for k in load_dit(workspace["models"].dit, task=TASK).state_dict()}
    targets = comfyui_lora_targets(weights, model_keys)  # ComfyUI's key map for WAN21_Vace
    assert set(targets) == names and all(t.endswith(".weight") for t in targets.values())
    from library.diagnostics.checks import diagnose

    from networks.convert import convert_lora, read_modules

    report = diagnose(trained_lora)
    assert report.fits == ["vace-tiny"] and not report.foreign_modules, report.findings  # VACE blocks need VACE
    kohya = convert_lora(trained_lora, trained_lora.with_name("k.safetensors"), "kohya")
    back = convert_lora(convert_lora(kohya, kohya.with_name("d.safetensors"), "diffusers"),
                        kohya.with_name("k2.safetensors"), "kohya")
    assert set(read_modules(back)[0]) == set(read_modules(trained_lora)[0]) == {n[16:] for n in names}


def test_loss_depends_on_the_vace_context(workspace, tmp_path):
    trainer = Trainer(_config(workspace, tmp_path))
    trainer.setup()
    try:
        batch = next(iter(trainer.data.loader(0)))
        assert batch["vace_context"].shape == (1, 96, 4, 4, 4) and batch["latents"].shape == (1, 16, 4, 4, 4)
        expert, pos = trainer.experts[0], (3, 0, 0)
        with torch.no_grad():
            real = trainer.loss(batch, expert, pos, sigma=0.5)
            blank = trainer.loss({**batch, "vace_context": torch.zeros_like(batch["vace_context"])}, expert, pos,
                                 sigma=0.5)
        assert torch.isfinite(real) and abs(real.item() - blank.item()) > 1e-6
    finally:
        trainer.cleanup()


def test_generates_with_the_lora_control_mask_and_reference(workspace, trained_lora, tmp_path):
    m, root = workspace["models"], workspace["root"]
    args = ["--task", TASK, "--dit", m.dit, "--vae", m.vae, "--t5", m.t5, "--tokenizer", m.tokenizer,
            "--lora", trained_lora, "--steps", "2", "--frames", "9", "--width", "32", "--height", "32",
            "--output_dir", tmp_path, "--output_name", "v", "--prompt", "a painting --d 4",
            "--control_path", root / "controls" / "clip_000.mp4", "--mask_path", root / "masks" / "clip_001.png",
            "--ref_image_path", root / "refs" / "clip_000.png", "--vace_scale", "0.9"]
    proc = subprocess.run([sys.executable, str(REPO / "generate_video_wan.py"), *map(str, args)], capture_output=True,
                          text=True, timeout=300, cwd=tmp_path, env=_env())
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    log = proc.stdout + proc.stderr
    assert "do not apply" not in log and "match no module" not in log  # every key, VACE blocks too, applies
    video = next(tmp_path.glob("v*.mp4"))
    capture = cv2.VideoCapture(str(video))
    assert int(capture.get(cv2.CAP_PROP_FRAME_COUNT)) == 9  # the reference frame is cut off before decoding
    sidecar = json.loads(next(tmp_path.glob("v*.json")).read_text())
    text = json.dumps(sidecar)
    assert "clip_000.mp4" in text and "clip_001.png" in text and "0.9" in text


def test_control_mask_and_reference_change_the_video(workspace, tmp_path):
    from library.sampling.generate import generate
    from library.sampling.prompts import SampleRequest
    from tests.sampling.conftest import load_models

    root = workspace["root"]
    models = load_models(workspace["models"], text_encoder=True)
    base = SampleRequest(prompt="a painting", width=32, height=32, frames=5, seed=1, steps=2)
    plain = generate(models, base, decode=False).latents
    ref = str(root / "refs" / "clip_000.png")
    for request in (replace(base, control=str(root / "controls" / "clip_001.mp4")),
                    replace(base, mask=str(root / "masks" / "clip_001.png")), replace(base, references=ref)):
        latents = generate(models, request, decode=False).latents
        assert latents.shape == plain.shape == (1, 16, 2, 4, 4) and (latents - plain).abs().max() > 1e-4
    _write_media(tmp_path, "short", 3, (32, 32), 5)
    with pytest.raises(PromptError, match="has 3 frames, the video 5"):
        generate(models, replace(base, control=str(tmp_path / "short.mp4")))

"""One-frame training end to end (musubi-tuner's WAN one-frame mode) on the tiny WAN 2.1 I2V and FLF2V models:
an image dataset with control images and fp_1f_* indices -> one-frame caches (each image its own latent frame,
the control frames known in y) -> train_network_wan.py -> generate_video_wan.py --one_frame_inference."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from library.data.dataset_config import load_dataset_config
from library.data.one_frame import control_paths, positions
from tests.tasks.e2e import assert_comfyui_loads, cache, entry, generate, one_thread, train, write_image  # noqa: F401


def _dataset(root, clean: list[int], target: int):
    (root / "images").mkdir(parents=True)
    (root / "control").mkdir()
    for i in range(2):
        write_image(root / "images" / f"item{i}.png", seed=10 + i)
        (root / "images" / f"item{i}.txt").write_text(f"a cat, changed {i}")
        names = [f"item{i}.png"] if len(clean) == 1 else [f"item{i}_{j}.png" for j in range(len(clean))]
        for j, name in enumerate(names):
            write_image(root / "control" / name, seed=20 + 2 * i + j)
    toml = root / "dataset.toml"
    toml.write_text(f'[general]\nresolution = [32, 32]\ncaption_extension = ".txt"\n\n[[datasets]]\n'
                    f'image_directory = "images"\ncontrol_directory = "control"\ncache_directory = "cache"\n'
                    f"fp_1f_clean_indices = {clean}\nfp_1f_target_index = {target}\n")
    return toml


@pytest.mark.parametrize("task,clean,target", [("i2v-tiny-2.1", [0], 1), ("flf2v-tiny", [0, 2], 1)])
def test_one_frame_cache_train_generate(tmp_path, task, clean, target):
    from library.wan.tiny import write_tiny_model_set

    models = write_tiny_model_set(tmp_path / "models", task)
    toml = _dataset(tmp_path / "data", clean, target)
    spec = load_dataset_config(toml).datasets[0]
    assert positions(spec) == sorted([*clean, target])
    assert len(control_paths(spec, tmp_path / "data" / "images" / "item0.png")) == len(clean)
    cache(models, toml, task, "--one_frame")
    tensors = [load_file(str(p)) for p in (tmp_path / "data" / "cache").glob("*.safetensors")]
    latents = [t for t in tensors if "latents" in t]
    assert len(latents) == 2
    item = latents[0]
    frames = len(clean) + 1
    assert item["latents"].shape[1] == frames and item["image_latents"].shape[1] == frames
    assert item["frame_positions"].tolist() == sorted([*clean, target])
    known = [0.0 if p == target else 1.0 for p in sorted([*clean, target])]
    assert item["frame_mask"].tolist() == known
    control_at = [i for i, k in enumerate(known) if k]
    for i in control_at:  # the control frames of the conditioning are the control latents themselves
        assert torch.equal(item["image_latents"][:, i], item["latents"][:, i])
    assert item["clip_fea"].shape == ((257, 40) if len(clean) == 1 else (2, 257, 40))
    lora = train(models, toml, task, tmp_path / "out", "--num_timestep_buckets", "3")  # musubi's stratified steps
    assert_comfyui_loads(lora, task)
    controls = control_paths(spec, tmp_path / "data" / "images" / "item0.png")
    ends = ["--end_image_path", str(controls[-1])] if len(clean) == 2 else []
    sidecar = generate(models, task, tmp_path / "gen", lora, "--image_path", str(controls[0]), *ends,
                       "--one_frame_inference", f"target_index={target},control_index={';'.join(map(str, clean))}",
                       "--control_image_path", *map(str, controls))
    s = sidecar["settings"]
    assert s["frames"] == 1 and s["one_frame"].startswith("target_index=")


def test_one_frame_problems_are_named(tmp_path, caplog):
    from library.wan.tiny import write_tiny_model_set

    models = write_tiny_model_set(tmp_path / "models", "i2v-tiny-2.1")
    toml = _dataset(tmp_path / "data", [0, 2], 1)
    argv = ["--dataset_config", str(toml), "--vae", str(models.vae), "--task", "i2v-tiny-2.1", "--clip",
            str(models.clip), "--no_progress"]
    assert entry("tools/cache_latents.py")(argv) == 2
    assert "2 control image(s) in fp_1f_clean_indices, but this model takes one control image" in caplog.text

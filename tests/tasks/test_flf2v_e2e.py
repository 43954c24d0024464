"""WAN 2.1 FLF2V end to end on the tiny model: the caching tools store the (first, black, last) image latents
and both frames' CLIP tokens, train_network_wan.py trains a LoRA, and generate_video_wan.py renders with
--image_path, --end_image_path and the LoRA (musubi's flags)."""

from __future__ import annotations

import time

import pytest
import torch
from safetensors.torch import load_file

from library.data.latent_caching import encode_batch, encode_clip
from library.wan.flf2v import conditioning_video
from tests.tasks.e2e import assert_comfyui_loads, cache, generate, one_thread, train, write_image  # noqa: F401

TASK = "flf2v-tiny"


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    from library.prep.demo_dataset import write_demo_dataset
    from library.wan.tiny import write_tiny_model_set

    root = tmp_path_factory.mktemp("flf2v")
    models = write_tiny_model_set(root / "models", TASK)
    toml = write_demo_dataset(root / "data", clips=2, images=0, width=32, height=32, frames=9)
    text = toml.read_text()
    toml.write_text(text[: text.rindex("[[datasets]]")])  # clips only
    return models, toml


def test_encoders_see_first_and_last_frame(workspace):
    from library.wan.loading import load_clip_vision, load_vae

    models, _ = workspace
    vae, clip = load_vae(models.vae), load_clip_vision(models.clip, dtype=torch.float32)
    torch.manual_seed(0)
    videos = torch.rand(2, 3, 5, 16, 16) * 2 - 1
    _, image_latents = encode_batch(vae, videos, is_i2v=True, end_frame=True)
    expected = vae.encode(conditioning_video(videos[:, :, :1], 5, videos[:, :, -1:]))
    torch.testing.assert_close(image_latents, expected)
    _, i2v_latents = encode_batch(vae, videos, is_i2v=True)
    assert not torch.allclose(i2v_latents[:, :, -1], image_latents[:, :, -1])  # the last frame is in
    tokens = encode_clip(clip, videos, end_frame=True)
    assert tokens.shape == (2, 2, 257, 40)
    torch.testing.assert_close(tokens[1, 1], clip.encode(videos[1:, :, -1])[0])


def test_cache_train_generate(workspace, tmp_path):
    models, toml = workspace
    start = time.perf_counter()
    cache(models, toml, TASK)
    files = [load_file(str(f)) for f in toml.parent.rglob("*.safetensors")]
    latents = [f for f in files if "latents" in f]
    assert len(latents) == 2 and all(f["clip_fea"].shape == (2, 257, 40) for f in latents)
    lora = train(models, toml, TASK, tmp_path / "out")
    assert_comfyui_loads(lora, TASK)
    assert any("k_img" in k for k in load_file(str(lora)))
    first, last = write_image(tmp_path / "first.png", 1), write_image(tmp_path / "last.png", 2)
    sidecar = generate(models, TASK, tmp_path / "gen", lora, "--image_path", str(first), "--end_image_path",
                       str(last), "--video_length", "5")
    assert sidecar["settings"]["end_image"].endswith("last.png") and sidecar["settings"]["task"] == TASK
    print(f"cache + train + generate: {time.perf_counter() - start:.1f} s")

"""Fun-Control end to end on tiny models: a dataset with `control_directory` -> latent (with control) and text
caches -> `train_network_wan.py` -> a LoRA whose keys ComfyUI loads -> `generate_video_wan.py --control_path`
with it; and the conditioning the DiT receives in training and in generation."""

from __future__ import annotations

import importlib.util
import json
from dataclasses import replace

import pytest
import torch
from safetensors.torch import load_file

from library.wan.fun import fun_control_condition
from library.wan.model import WanModel
from library.wan.variants import get_variant
from tests.data.conftest import write_caption, write_image, write_video
from tests.helpers import REPO, single_thread
from tests.networks.comfyui_rules import wan_linears

DATASET = """
[general]
resolution = 32
caption_extension = ".txt"
[[datasets]]
video_directory = "videos"
control_directory = "control"
cache_directory = "cache"
target_frames = [9]
"""


def _workspace(root, task: str):
    from library.data.dataset_config import load_dataset_config
    from library.data.latent_caching import cache_latents
    from library.data.text_caching import cache_text_encoder_outputs
    from library.wan.tiny import write_tiny_model_set

    models = write_tiny_model_set(root / "models", task)
    for name in ("walk", "turn"):
        write_video(root / f"data/videos/{name}.mp4", frames=9, fps=16.0, width=32, height=32)
        write_caption(root / f"data/videos/{name}.txt", f"a person {name}s")
        write_video(root / f"data/control/{name}.mp4", frames=9, fps=16.0, width=40, height=32)  # a pose video
    (root / "data/d.toml").write_text(DATASET)
    config = load_dataset_config(root / "data/d.toml")
    summary = cache_latents(config, models.vae, task=task, progress=False)
    assert (summary.cached, summary.errors) == (2, [])
    cache_text_encoder_outputs(config, models.t5, tokenizer=models.tokenizer, dtype=torch.float32, progress=False)
    return models, root / "data/d.toml"


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models: intra-op threads only add overhead (and large slowdowns on a busy machine)."""
    with single_thread():
        yield


@pytest.fixture(scope="module")
def fc(tmp_path_factory):
    with single_thread():
        return _workspace(tmp_path_factory.mktemp("fun_control"), "t2v-tiny-fc")


def _settings(models, toml, out, task, **over) -> dict:
    return {"task": task, "dit": str(models.dit), "dataset_config": str(toml), "output_dir": str(out),
            "output_name": "fc", "network_dim": 4, "network_alpha": 4, "learning_rate": 5e-3,
            "optimizer_type": "AdamW", "max_train_steps": 2, "seed": 7, "max_data_loader_n_workers": 0,
            "timestep_sampling": "uniform", **over}


def _script(name: str):
    """An entry script of the repo, loaded as a module (its `main(argv)` runs in this process)."""
    spec = importlib.util.spec_from_file_location(name.removesuffix(".py"), REPO / name)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_control_dataset_trains_a_lora_that_comfyui_loads_and_generates(fc, tmp_path):
    models, toml = fc
    flags = sum(([f"--{k}", str(v)] for k, v in _settings(models, toml, tmp_path, "t2v-tiny-fc").items()), [])
    assert _script("train_network_wan.py").main([*flags, "--save_lora_format", "comfyui"]) == 0
    lora = load_file(str(tmp_path / "fc.safetensors"))
    # ComfyUI maps `diffusion_model.NAME.lora_A/B.weight` onto the model's Linear NAME (comfy/lora.py): every
    # module must be one of the Linears of ComfyUI's WanModel for this checkpoint (img_emb / k_img included)
    linears = set(wan_linears(WanModel(get_variant("t2v-tiny-fc")).state_dict()))
    modules = {k.removeprefix("diffusion_model.").rsplit(".lora_", 1)[0] for k in lora if ".lora_" in k}
    assert modules and modules <= linears and "blocks.0.cross_attn.k_img" in modules
    assert all(k.startswith("diffusion_model.") for k in lora)

    control = write_video(tmp_path / "pose.mp4", frames=9, fps=16.0, width=48, height=32)
    rc = _script("generate_video_wan.py").main([
        "--task", "t2v-tiny-fc", "--dit", str(models.dit), "--vae", str(models.vae), "--t5", str(models.t5),
        "--tokenizer", str(models.tokenizer), "--prompt", "a person walks --d 3", "--control_path", str(control),
        "--lora", f"{tmp_path / 'fc.safetensors'}:1.0", "--steps", "2", "--frames", "9", "--width", "32",
        "--height", "32", "--output_dir", str(tmp_path / "out"), "--output_name", "fc", "--device", "cpu"])
    assert rc == 0
    sidecar = json.loads(next((tmp_path / "out").glob("*.json")).read_text())
    assert sidecar["settings"]["control"] == str(control) and list((tmp_path / "out").glob("*.mp4"))


def test_training_feeds_control_latents_and_zero_clip(fc, tmp_path):
    """The DiT gets y = [control latents | zeros] and zero CLIP tokens (t2v Fun-Control, WAN 2.1)."""
    from library.config import config_from_dict, validate
    from library.data import cache
    from library.training.trainer import Trainer

    models, toml = fc
    trainer = Trainer(validate(config_from_dict(_settings(models, toml, tmp_path, "t2v-tiny-fc", max_train_steps=1))))
    trainer.setup()
    seen = []
    trainer.experts[0].model.register_forward_pre_hook(lambda m, a, kw: seen.append(kw), with_kwargs=True)
    trainer.train()
    trainer.cleanup()
    y, clip = seen[0]["y"], seen[0]["clip_fea"]
    files = sorted((toml.parent / "cache").glob("*_wan21.safetensors"))
    controls = [cache.load_tensors(p)["control_latents"].float() for p in files]
    assert y.shape == (1, 32, 3, 4, 4) and not y[:, 16:].any()
    assert any(torch.equal(y[0, :16].cpu(), c) for c in controls)
    assert clip.shape == (1, 257, 40) and not clip.any()


def test_generation_conditioning_of_a_wan22_fun_control_model(tmp_path):
    """WAN 2.2 Fun-Control with a start image: y = [VAE(control) | mask | VAE(image, black frames)], no CLIP."""
    from library.sampling.control import load_control_video
    from library.sampling.generate import _conditioning, load_image, resolve
    from library.sampling.prompts import PromptError, SampleRequest, check_requests
    from library.wan.tiny import write_tiny_model_set
    from tests.sampling.conftest import load_models

    sampling = load_models(write_tiny_model_set(tmp_path / "m", "i2v-tiny-fc-2.2"), text_encoder=False)
    variant = sampling.variant
    image, control = write_image(tmp_path / "start.png", 32, 32), write_video(tmp_path / "c.mp4", frames=9)
    request = SampleRequest("a dancer", image=str(image), control=str(control), width=32, height=32, frames=5,
                            extra={"context": torch.zeros(3, 64), "negative_context": torch.zeros(2, 64)})
    _, errors = check_requests([SampleRequest("a dancer", image=str(image))], variant)
    assert "needs a control video; add `--cn control.mp4`" in str(errors[0])
    with pytest.raises(PromptError, match=r"the control video .*c\.mp4 has 9 frames and 13 are rendered"):
        load_control_video(str(control), 13, 32, 32)
    with pytest.raises(PromptError, match=r"the control video .*nope\.mp4 does not exist"):
        load_control_video(str(tmp_path / "nope.mp4"), 5, 32, 32)
    s = resolve(request, variant)
    cond = _conditioning(sampling, request, s, torch.device("cpu"))
    vae = sampling.vae
    start = load_image(str(image), 32, 32)
    first = torch.cat([start, torch.zeros_like(start).expand(-1, -1, 4, -1, -1)], dim=2)
    expected = fun_control_condition(variant, vae.encode(load_control_video(str(control), 5, 32, 32)).float(),
                                     vae.encode(first).float())
    assert cond.y.shape == (1, 36, 2, 4, 4) and cond.clip_fea is None
    torch.testing.assert_close(cond.y, expected)
    assert cond.y[:, 16:20, 0].eq(1).all() and not cond.y[:, 16:20, 1:].any()

    # Fun-InP (the same tiny VAE): an end image is the last frame of the encoded clip, kept by the mask
    inp = replace(get_variant("i2v-tiny"), inpaint=True)
    end = write_image(tmp_path / "end.png", 40, 32)
    request = replace(request, control=None, end_image=str(end), frames=9)
    cond = _conditioning(replace(sampling, variant=inp), request, resolve(request, inp), torch.device("cpu"))
    clip = torch.cat([start, torch.zeros_like(start).expand(-1, -1, 7, -1, -1), load_image(str(end), 32, 32)], 2)
    torch.testing.assert_close(cond.y[:, 4:], vae.encode(clip).float())
    assert cond.y[0, :4, -1].flatten(1).eq(torch.tensor([0.0, 0, 0, 1])[:, None]).all()
    assert cond.y[0, :4, 0].eq(1).all() and not cond.y[0, :4, 1:-1].any()

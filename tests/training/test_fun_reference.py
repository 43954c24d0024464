"""Fun-Control reference images (`ref_conv`, Fun-Control V1.1 / WAN 2.2) end to end on tiny models: a dataset
with `control_directory` and `reference_directory` -> caches holding the reference latent (re-made when the
image changes) -> training that feeds it as `full_ref` -> `generate_video_wan.py --ref_image_path`; the
image's preprocessing against diffusers' VaeImageProcessor (VideoX-Fun's), and the errors without `ref_conv`."""

from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

from tests.data.conftest import write_caption, write_image, write_video
from tests.helpers import single_thread
from tests.training.test_fun_control import _script, _settings

DATASET = """
[general]
resolution = 32
caption_extension = ".txt"
[[datasets]]
video_directory = "videos"
control_directory = "control"
reference_directory = "refs"
cache_directory = "cache"
target_frames = [9]
"""


def _with_ref_conv(dit, out):
    """The tiny DiT file with a random `ref_conv` (what makes a Fun-Control V1.1 / 2.2 checkpoint)."""
    sd = load_file(str(dit))
    torch.manual_seed(5)
    dim = sd["patch_embedding.weight"].shape[0]
    sd["ref_conv.weight"], sd["ref_conv.bias"] = torch.randn(dim, 16, 2, 2) * 0.1, torch.randn(dim) * 0.1
    save_file(sd, str(out))
    return out


@pytest.fixture(autouse=True)
def one_thread():
    with single_thread():
        yield


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    from library.data.dataset_config import load_dataset_config
    from library.data.latent_caching import cache_latents
    from library.data.text_caching import cache_text_encoder_outputs
    from library.wan.tiny import write_tiny_model_set

    with single_thread():
        root = tmp_path_factory.mktemp("fun_reference")
        models = write_tiny_model_set(root / "models", "t2v-tiny-fc")
        for name in ("walk", "turn"):
            write_video(root / f"data/videos/{name}.mp4", frames=9, fps=16.0, width=32, height=32)
            write_caption(root / f"data/videos/{name}.txt", f"a person {name}s")
            write_video(root / f"data/control/{name}.mp4", frames=9, fps=16.0, width=32, height=32)
            write_image(root / f"data/refs/{name}.png", 48, 40)  # any size: resized to the bucket
        (root / "data/d.toml").write_text(DATASET)
        config = load_dataset_config(root / "data/d.toml")
        summary = cache_latents(config, models.vae, task="t2v-tiny-fc", progress=False)
        assert (summary.cached, summary.errors) == (2, [])
        cache_text_encoder_outputs(config, models.t5, tokenizer=models.tokenizer, dtype=torch.float32,
                                   progress=False)
        return models, root / "data/d.toml", _with_ref_conv(models.dit, root / "models/fc_ref.safetensors")


def test_reference_pixels_match_videox_fun_preprocessing(tmp_path):
    """VideoX-Fun: PIL resize to the exact size (bicubic, no crop), / 255, then VaeImageProcessor.preprocess
    (-> [-1, 1]); ours gives the same pixels."""
    import numpy as np
    from diffusers.image_processor import VaeImageProcessor
    from PIL import Image

    from library.data.fun_reference import reference_pixels

    path = write_image(tmp_path / "r.png", 50, 30)
    image = Image.open(path).convert("RGB").resize((32, 48))
    unit = torch.from_numpy(np.array(image)).permute(2, 0, 1)[None].float() / 255
    expected = VaeImageProcessor(vae_scale_factor=8).preprocess(unit, height=48, width=32)
    got = reference_pixels(path, 32, 48)
    assert got.shape == (3, 1, 48, 32)
    torch.testing.assert_close(got[:, 0], expected[0].float(), atol=1e-6, rtol=0)


def test_reference_is_cached_trained_as_full_ref_and_generated(ws, tmp_path):
    from library.config import config_from_dict, validate
    from library.data import cache
    from library.data.dataset_config import load_dataset_config
    from library.data.fun_reference import REFERENCE_KEY, encode_reference
    from library.data.latent_caching import cache_latents
    from library.training.trainer import Trainer
    from library.wan.loading import load_vae

    models, toml, dit = ws
    vae = load_vae(models.vae, device="cpu", dtype=torch.float32)
    cached = cache.load_tensors(toml.parent / "cache" / next(p.name for p in (toml.parent / "cache").glob(
        "walk*_wan21.safetensors")))
    expected = encode_reference(vae, toml.parent / "refs/walk.png", 32, 32)
    assert cached[REFERENCE_KEY].shape == (16, 4, 4)
    torch.testing.assert_close(cached[REFERENCE_KEY].float(), expected.to(torch.bfloat16).float())

    trainer = Trainer(validate(config_from_dict(_settings(models, toml, tmp_path, "t2v-tiny-fc", dit=str(dit),
                                                          max_train_steps=1))))
    trainer.setup()
    seen = []
    trainer.experts[0].model.register_forward_pre_hook(lambda m, a, kw: seen.append(kw), with_kwargs=True)
    trainer.train()
    trainer.cleanup()
    refs = [cache.load_tensors(p)[REFERENCE_KEY].float() for p in (toml.parent / "cache").glob("*_wan21.safetensors")]
    assert seen[0]["full_ref"].shape == (1, 16, 4, 4)
    assert any(torch.equal(seen[0]["full_ref"][0].cpu(), r) for r in refs)

    # a changed reference image is cached again (its path, size and mtime are in the cache settings)
    ref = toml.parent / "refs/turn.png"
    write_image(ref, 40, 48)
    os.utime(ref, ns=(ref.stat().st_atime_ns, ref.stat().st_mtime_ns + 10**9))
    summary = cache_latents(load_dataset_config(toml), models.vae, task="t2v-tiny-fc", progress=False)
    assert (summary.cached, summary.reused) == (1, 1)

    out = tmp_path / "out"
    argv = ["--task", "t2v-tiny-fc", "--dit", str(dit), "--vae", str(models.vae), "--t5", str(models.t5),
            "--tokenizer", str(models.tokenizer), "--prompt", "a person walks --d 3", "--control_path",
            str(toml.parent / "control/walk.mp4"), "--ref_image_path", str(toml.parent / "refs/walk.png"),
            "--steps", "1", "--frames", "9", "--width", "32", "--height", "32", "--output_dir", str(out),
            "--output_name", "ref", "--device", "cpu"]
    assert _script("generate_video_wan.py").main(argv) == 0
    sidecar = json.loads(next(out.glob("*.json")).read_text())
    assert sidecar["settings"]["references"] == [str(toml.parent / "refs/walk.png")] and list(out.glob("*.mp4"))
    # the model without `ref_conv` takes no reference image: a failed prompt (exit 1), nothing rendered
    argv[argv.index("--dit") + 1], argv[argv.index("--output_dir") + 1] = str(models.dit), str(tmp_path / "no")
    assert _script("generate_video_wan.py").main(argv) == 1
    assert not list((tmp_path / "no").glob("*.mp4"))


def test_generation_full_ref_and_its_errors(ws, tmp_path):
    """The request's reference image reaches the DiT as `full_ref` = VAE(image as a 1-frame video)[:, :, 0];
    two images, a missing one, or a model without ref_conv are prompt errors."""
    from dataclasses import replace

    from library.data.fun_reference import encode_reference
    from library.sampling.generate import _conditioning, resolve
    from library.sampling.prompts import PromptError, SampleRequest, check_requests
    from library.wan.loading import load_dit
    from tests.sampling.conftest import load_models

    models, toml, dit = ws
    sampling = load_models(models, text_encoder=False)
    ref = toml.parent / "refs/walk.png"
    request = SampleRequest("a dancer", control=str(toml.parent / "control/walk.mp4"), references=str(ref),
                            width=32, height=32, frames=5,
                            extra={"context": torch.zeros(3, 64), "negative_context": torch.zeros(2, 64)})
    good, errors = check_requests([request], sampling.variant)
    assert good and not errors
    with pytest.raises(PromptError, match=r"has no `ref_conv` layer, so it takes no reference image"):
        _conditioning(sampling, request, resolve(request, sampling.variant), torch.device("cpu"))
    with_ref = replace(sampling, experts={"dit": load_dit(dit, task="t2v-tiny-fc", device="cpu")})
    assert with_ref.experts["dit"].variant.ref_conv
    cond = _conditioning(with_ref, request, resolve(request, sampling.variant), torch.device("cpu"))
    torch.testing.assert_close(cond.full_ref, encode_reference(sampling.vae, ref, 32, 32)[None].float())
    assert torch.equal(cond.extra()["full_ref"], cond.full_ref)
    for bad, match in ((f"{ref},{ref}", "takes one reference image, got 2"),
                       (str(tmp_path / "nope.png"), r"the reference image .*nope\.png does not exist")):
        bad_request = replace(request, references=bad)
        with pytest.raises(PromptError, match=match):
            _conditioning(with_ref, bad_request, resolve(bad_request, sampling.variant), torch.device("cpu"))


def test_training_without_ref_conv_and_musubi_flags(ws, tmp_path):
    from library.config import config_from_dict, validate
    from library.errors import UserError
    from library.sampling.musubi import normalise
    from library.training.trainer import Trainer

    models, toml, _ = ws
    trainer = Trainer(validate(config_from_dict(_settings(models, toml, tmp_path, "t2v-tiny-fc", max_train_steps=1))))
    trainer.setup()
    try:
        with pytest.raises(UserError, match=r"reference_directory / reference_path.*no `ref_conv` layer"):
            trainer.train()
    finally:
        trainer.cleanup()

    class Args:
        def __init__(self, task):
            self.task, self.ref_image_path = task, "r.png"

    assert normalise(Args("t2v-14B-FC")) == []
    assert "reference images also for the Fun-Control models" in normalise(Args("t2v-14B"))[0]

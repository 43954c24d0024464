"""`generate` and the training hook: own RNG, modes restored, conditioning, sizes and frames, bad inputs."""

from __future__ import annotations


import numpy as np
import pytest
import torch

from library.sampling.generate import generate, resolve
from library.sampling.prompts import PromptError, SampleRequest
from library.sampling.save import sample_during_training
from tests.sampling.conftest import load_models, write_lora

FAST = dict(steps=3, frames=5, width=32, height=32, seed=11)


@pytest.fixture(scope="module")
def t2v(tiny_sets):
    return load_models(tiny_sets["t2v-tiny"])


def test_generate_keeps_global_rng_and_modes(t2v, tmp_path):
    """Sampling during training: the global random stream and every train / eval flag are left as found."""
    from library.sampling.loras import LoraSpec, attach_loras, detach_loras

    high = t2v.experts["high_noise"]
    path = write_lora(high, tmp_path / "l.safetensors", t2v.variant)
    loaded = attach_loras([LoraSpec(path, 1.0)], {"high_noise": high}, t2v.variant)
    net = loaded[0].network
    net.loras[0].dropout = 0.5  # dropout in train mode would draw from the global stream
    t2v.networks = [net]
    high.train()
    net.train()
    torch.manual_seed(123)
    before = torch.get_rng_state()
    try:
        a = generate(t2v, SampleRequest("a cat", **FAST), decode=False)
        b = generate(t2v, SampleRequest("a cat", **FAST), decode=False)
        assert torch.equal(torch.get_rng_state(), before)
        assert high.training and net.training and net.loras[0].training
        assert not t2v.experts["low_noise"].training and not t2v.vae.training
        torch.testing.assert_close(a.latents, b.latents, rtol=0, atol=0)  # the seed alone decides
        c = generate(t2v, SampleRequest("a cat", **{**FAST, "seed": 12}), decode=False)
        assert not torch.allclose(a.latents, c.latents)
    finally:
        detach_loras(loaded)
        high.eval()
        t2v.networks = []


def test_frames_and_sizes_off_the_grid_are_errors_naming_the_prompt(t2v):
    with pytest.raises(PromptError) as info:
        resolve(SampleRequest("x", frames=7, width=40, source="prompts.txt line 2"), t2v.variant)
    msg = str(info.value)
    assert "prompts.txt line 2: width 40 is not a multiple of 16" in msg and "use 32 or 48" in msg
    assert "prompts.txt line 2: frames must be 1 + 4k frames" in msg and "got 7; use 5 or 9" in msg
    with pytest.raises(PromptError, match="frames must be 1 \\+ 4k"):
        generate(t2v, SampleRequest("x", **{**FAST, "frames": 6}))


def test_defaults_come_from_the_variant(t2v):
    s = resolve(SampleRequest("x"), t2v.variant)
    v = t2v.variant
    assert (s["steps"], s["flow_shift"], s["frames"], s["fps"]) == (v.sample_steps, v.flow_shift, v.num_frames, v.fps)
    assert (s["guidance_low_noise"], s["guidance_high_noise"], s["boundary"]) == (3.0, 4.0, 0.875)
    assert s["negative_prompt"].startswith("色调艳丽")
    one = resolve(SampleRequest("x", guidance=6.0), v)
    assert one["guidance_low_noise"] == one["guidance_high_noise"] == 6.0


def _image(path, w=48, h=40):
    import cv2

    rng = np.random.default_rng(0)
    cv2.imwrite(str(path), rng.integers(0, 255, (h, w, 3), dtype=np.uint8))
    return str(path)


def test_i2v_needs_an_image_and_uses_it(tiny_sets, tmp_path):
    models = load_models(tiny_sets["i2v-tiny"])
    with pytest.raises(PromptError, match=r"line 4: i2v-tiny is an image-to-video model and needs a start image"):
        generate(models, SampleRequest("a cat", source="p.txt line 4", **FAST))
    with pytest.raises(PromptError, match="cannot read the start image"):
        generate(models, SampleRequest("a cat", image=str(tmp_path / "missing.png"), **FAST))
    a = generate(models, SampleRequest("a cat", image=_image(tmp_path / "a.png"), **FAST), decode=False)
    b = generate(models, SampleRequest("a cat", image=_image(tmp_path / "b.png", 64, 64), **FAST), decode=False)
    assert not torch.allclose(a.latents, b.latents)  # the image conditions the result


def test_ti2v_keeps_the_clean_first_frame(tiny_sets, tmp_path):
    from library.sampling.generate import load_image

    models = load_models(tiny_sets["ti2v-tiny"])
    request = SampleRequest("a cat", image=_image(tmp_path / "i.png"), **{**FAST, "width": 64, "height": 64})
    sample = generate(models, request, decode=False)
    with torch.no_grad():
        first = models.vae.encode(load_image(request.image, 64, 64))
    assert torch.equal(sample.latents[:, :, :1], first)
    t2v_mode = generate(models, SampleRequest("a cat", **{**FAST, "width": 64, "height": 64}), decode=False)
    assert not torch.allclose(t2v_mode.latents[:, :, :1], first)


def test_sample_during_training_files_and_rng(t2v, tmp_path):
    from library.sampling.generate import encode_requests

    requests = encode_requests(t2v.text_encoder, [SampleRequest("a cat", **FAST),
                                                  SampleRequest("a dog", source="p line 2", **FAST)], t2v.variant)
    models = type(t2v)(t2v.variant, t2v.experts, t2v.vae)  # no text encoder: embeddings precomputed
    bad = SampleRequest("x", **FAST)  # not encoded: fails, and the others still render
    before = torch.get_rng_state()
    out = sample_during_training(models, requests + [bad], tmp_path, step=40, epoch=2, output_name="run")
    assert torch.equal(torch.get_rng_state(), before)
    names = sorted(p.name for p in (tmp_path / "sample").iterdir())
    assert names == ["run_step00000040_00.json", "run_step00000040_00.mp4", "run_step00000040_00.png",
                     "run_step00000040_01.json", "run_step00000040_01.mp4", "run_step00000040_01.png"]
    assert out[0].contact_sheet.ndim == 3 and out[0].error is None
    assert "no text encoder loaded and no precomputed `context`" in out[2].error
    import json

    sidecar = json.loads((tmp_path / "sample" / "run_step00000040_01.json").read_text())
    assert sidecar["training"] == {"step": 40, "epoch": 2} and sidecar["settings"]["prompt"] == "a dog"


def test_a_start_image_over_the_pixel_limit_is_refused_from_its_header(tmp_path):
    """A PNG claiming 10^12 pixels is refused before decoding (it would take gigabytes), naming the prompt."""
    from library.sampling.generate import load_image
    from tests.hostile.media import png_header_bomb

    bomb = png_header_bomb(tmp_path / "bomb.png")
    with pytest.raises(PromptError, match=r"prompt 3: the start image .*bomb\.png is not used: .*over the limit"):
        load_image(str(bomb), 64, 64, source="prompt 3")

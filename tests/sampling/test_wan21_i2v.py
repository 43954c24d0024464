"""WAN 2.1 I2V sampling: CLIP tokens of the start image reach the DiT, the CLI takes --clip, and the loop
matches diffusers' WanImageToVideoPipeline (2.1 layout: one transformer with image_dim, a CLIPVisionModel
image encoder) with the same tiny random weights."""

from __future__ import annotations


import numpy as np
import pytest
import torch

from library.sampling.generate import generate
from library.sampling.prompts import PromptError, SampleRequest
from tests.sampling.conftest import load_models

TASK = "i2v-tiny-2.1"
FAST = dict(steps=3, frames=5, width=32, height=32, seed=11)


@pytest.fixture(scope="module")
def model_set(tmp_path_factory):
    from library.wan.tiny import write_tiny_model_set

    return write_tiny_model_set(tmp_path_factory.mktemp("wan21_i2v"), TASK)


def _image(path, w=48, h=40, seed=0):
    import cv2

    cv2.imwrite(str(path), np.random.default_rng(seed).integers(0, 255, (h, w, 3), dtype=np.uint8))
    return str(path)


def test_renders_with_the_start_images_clip_tokens(model_set, tmp_path):
    from library.wan.loading import load_clip_vision
    from library.wan.tiny import tiny_clip_state_dict

    models = load_models(model_set)
    request = SampleRequest("a cat", image=_image(tmp_path / "a.png"), source="p.txt line 2", **FAST)
    with pytest.raises(PromptError, match=r"p.txt line 2: i2v-tiny-2.1 \(WAN 2.1 I2V\) needs the CLIP vision "
                                          r"encoder for its start image; load it with --clip"):
        generate(models, request)
    models.clip = load_clip_vision(model_set.clip, dtype=torch.float32)
    sample = generate(models, request)
    assert sample.video.shape == (3, 5, 32, 32) and torch.isfinite(sample.latents).all()
    assert not models.clip.training
    other = tmp_path / "other_clip.pth"
    torch.save(tiny_clip_state_dict(seed=9), other)
    models.clip = load_clip_vision(other, dtype=torch.float32)
    changed = generate(models, request, decode=False)
    assert not torch.allclose(changed.latents, sample.latents)  # the CLIP tokens condition the result


def test_cli_needs_and_uses_clip(model_set, tmp_path, caplog):
    from library.sampling.commands import generate_parser, run_generate

    s = model_set
    args = ["--task", TASK, "--dit", s.dit, "--vae", s.vae, "--t5", s.t5, "--tokenizer", s.tokenizer,
            "--prompt", "a cat walks", "--image", _image(tmp_path / "i.png"), "--steps", "2", "--frames", "5",
            "--width", "32", "--height", "32", "--seed", "1", "--output_dir", tmp_path / "out", "--output_name", "v"]
    args = list(map(str, args))
    assert run_generate(generate_parser().parse_args(args)) == 2  # models cannot be loaded: nothing rendered
    assert "--task i2v-tiny-2.1 (WAN 2.1 I2V) needs --clip, the CLIP vision file" in caplog.text
    assert not list(tmp_path.glob("out/*.mp4"))
    assert run_generate(generate_parser().parse_args([*args, "--clip", str(s.clip)])) == 0
    sidecars = list((tmp_path / "out").glob("*.json"))
    assert len(sidecars) == 1 and list((tmp_path / "out").glob("*.mp4"))
    assert str(s.clip) in sidecars[0].read_text()


def test_wan21_i2v_matches_diffusers_pipeline():
    """Our loop with our CLIP tower (loaded from the official WAN naming) against WanImageToVideoPipeline with
    the same weights in a transformers CLIPVisionModel. Both encode the pixels of diffusers' CLIPImageProcessor,
    so only the image-token path, the conditioning and the solver are compared (our own preprocessing, WAN's
    bicubic resize without crop, is checked in tests/wan/test_clip_vision.py)."""
    diffusers = pytest.importorskip("diffusers")
    from PIL import Image
    try:
        from transformers import CLIPImageProcessorPil as CLIPImageProcessor  # transformers 5, no torchvision needed
    except ImportError:
        from transformers import CLIPImageProcessor

    from library.sampling.denoise import Conditioning, GuidedExpert, denoise
    from library.wan.conditioning import i2v_condition as i2v_y
    from library.sampling.schedules import flow_schedule
    from library.wan.loading import load_clip_vision
    from library.wan.variants import get_variant
    from tests.sampling.test_parity import SHIFT, STEPS, SEED, TOL, _prompts, _rel, _scheduler, _vae_twin
    from tests.wan.test_clip_vision import _hf_state, to_wan
    from tests.wan.test_model import diffusers_twin

    variant = get_variant(TASK)
    ref, ours = diffusers_twin(variant, seed=2)
    vae_ref, vae = _vae_twin("2.1")
    encoder = _clip_twin()
    processor = CLIPImageProcessor(size={"shortest_edge": 224}, crop_size={"height": 224, "width": 224},
                                   resample=3, image_mean=[0.48145466, 0.4578275, 0.40821073],
                                   image_std=[0.26862954, 0.26130258, 0.27577711])
    cond, neg, cond_pad, neg_pad = _prompts(variant)
    pixels = (torch.rand(32, 32, 3, generator=torch.Generator().manual_seed(6)) * 255).to(torch.uint8).numpy()
    latents = torch.randn(1, 16, 3, 4, 4, generator=torch.Generator().manual_seed(SEED))
    pipe = diffusers.WanImageToVideoPipeline(tokenizer=None, text_encoder=None, vae=vae_ref,
                                             scheduler=_scheduler("unipc"), transformer=ref, image_encoder=encoder,
                                             image_processor=processor)
    pipe.set_progress_bar_config(disable=True)
    expected = pipe(image=Image.fromarray(pixels), prompt_embeds=cond_pad, negative_prompt_embeds=neg_pad, height=32,
                    width=32, num_frames=9, num_inference_steps=STEPS, guidance_scale=5.0, latents=latents.clone(),
                    output_type="latent").frames
    import tempfile

    with tempfile.TemporaryDirectory() as folder:
        torch.save(to_wan(_hf_state(encoder)), f"{folder}/clip.pth")
        clip = load_clip_vision(f"{folder}/clip.pth", dtype=torch.float32)
    with torch.no_grad():
        clip_fea = clip(processor(images=Image.fromarray(pixels), return_tensors="pt")["pixel_values"])
        image = torch.from_numpy(pixels).permute(2, 0, 1)[None, :, None].float() / 127.5 - 1
        y = i2v_y(vae.encode(torch.cat([image, torch.zeros(1, 3, 8, 32, 32)], dim=2)))
    got = denoise(latents.clone(), flow_schedule(STEPS, SHIFT, "unipc", "diffusers"), [GuidedExpert("dit", ours, 5.0)],
                  Conditioning([cond], [neg], y=y, clip_fea=clip_fea), "unipc")
    err = _rel(got, expected)
    print(f"wan2.1 i2v unipc: relative max error {err:.2e}")
    assert err <= TOL
    blind = denoise(latents.clone(), flow_schedule(STEPS, SHIFT, "unipc", "diffusers"),
                    [GuidedExpert("dit", ours, 5.0)],
                    Conditioning([cond], [neg], y=y, clip_fea=torch.zeros_like(clip_fea)), "unipc")
    assert _rel(blind, expected) > 100 * TOL  # the comparison can tell whether the image tokens were used


def _clip_twin():
    """A tiny transformers CLIPVisionModel (width = the tiny variant's clip_dim) with random weights."""
    from transformers import CLIPVisionConfig, CLIPVisionModel

    torch.manual_seed(3)
    model = CLIPVisionModel(CLIPVisionConfig(hidden_size=40, intermediate_size=160, num_hidden_layers=3,
                                             num_attention_heads=4, image_size=224, patch_size=14, hidden_act="gelu",
                                             layer_norm_eps=1e-5)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "embedding" in name:
                p.normal_(0, 0.5)
    return model

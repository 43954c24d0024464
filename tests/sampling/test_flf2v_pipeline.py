"""WAN 2.1 FLF2V sampling against diffusers' WanImageToVideoPipeline with a `last_image` (its FLF2V path: the
first / black / last conditioning video, the mask of both known frames, both images' CLIP tokens through a
transformer built with pos_embed_seq_len), same tiny random weights."""

from __future__ import annotations

import tempfile

import pytest
import torch


def test_flf2v_matches_diffusers_pipeline_with_last_image():
    diffusers = pytest.importorskip("diffusers")
    from PIL import Image
    try:
        from transformers import CLIPImageProcessorPil as CLIPImageProcessor  # transformers 5, no torchvision needed
    except ImportError:
        from transformers import CLIPImageProcessor

    from library.sampling.denoise import Conditioning, GuidedExpert, denoise
    from library.sampling.schedules import flow_schedule
    from library.wan.flf2v import conditioning_video, flf2v_condition
    from library.wan.loading import load_clip_vision
    from library.wan.variants import get_variant
    from tests.sampling.test_parity import SEED, SHIFT, STEPS, TOL, _prompts, _rel, _scheduler, _vae_twin
    from tests.sampling.test_wan21_i2v import _clip_twin
    from tests.wan.test_clip_vision import _hf_state, to_wan
    from tests.wan.test_model import diffusers_twin

    variant = get_variant("flf2v-tiny")
    ref, ours = diffusers_twin(variant, seed=2)
    with torch.no_grad():
        ref.condition_embedder.image_embedder.pos_embed.normal_(0, 0.5)
        ours.img_emb.emb_pos.copy_(ref.condition_embedder.image_embedder.pos_embed)
    vae_ref, vae = _vae_twin("2.1")
    encoder = _clip_twin()
    processor = CLIPImageProcessor(size={"shortest_edge": 224}, crop_size={"height": 224, "width": 224},
                                   resample=3, image_mean=[0.48145466, 0.4578275, 0.40821073],
                                   image_std=[0.26862954, 0.26130258, 0.27577711])
    cond, neg, cond_pad, neg_pad = _prompts(variant)
    first, last = ((torch.rand(32, 32, 3, generator=torch.Generator().manual_seed(s)) * 255).to(torch.uint8).numpy()
                   for s in (6, 7))
    latents = torch.randn(1, 16, 3, 4, 4, generator=torch.Generator().manual_seed(SEED))
    pipe = diffusers.WanImageToVideoPipeline(tokenizer=None, text_encoder=None, vae=vae_ref,
                                             scheduler=_scheduler("unipc"), transformer=ref, image_encoder=encoder,
                                             image_processor=processor)
    pipe.set_progress_bar_config(disable=True)
    expected = pipe(image=Image.fromarray(first), last_image=Image.fromarray(last), prompt_embeds=cond_pad,
                    negative_prompt_embeds=neg_pad, height=32, width=32, num_frames=9, num_inference_steps=STEPS,
                    guidance_scale=5.0, latents=latents.clone(), output_type="latent").frames
    with tempfile.TemporaryDirectory() as folder:
        torch.save(to_wan(_hf_state(encoder)), f"{folder}/clip.pth")
        clip = load_clip_vision(f"{folder}/clip.pth", dtype=torch.float32)
    to_tensor = lambda px: torch.from_numpy(px).permute(2, 0, 1)[None, :, None].float() / 127.5 - 1  # noqa: E731
    with torch.no_grad():
        pixels = processor(images=[Image.fromarray(first), Image.fromarray(last)], return_tensors="pt")["pixel_values"]
        clip_fea = clip(pixels).flatten(0, 1)[None]  # [1, 514, width]: first then last
        y = flf2v_condition(vae.encode(conditioning_video(to_tensor(first), 9, to_tensor(last))))
    schedule = flow_schedule(STEPS, SHIFT, "unipc", "diffusers")
    got = denoise(latents.clone(), schedule, [GuidedExpert("dit", ours, 5.0)],
                  Conditioning([cond], [neg], y=y, clip_fea=clip_fea), "unipc")
    err = _rel(got, expected)
    print(f"wan2.1 flf2v unipc: relative max error {err:.2e}")
    assert err <= TOL
    i2v_mask = y.clone()
    i2v_mask[:, 3, -1] = 0.0  # the I2V mask: the last frame unknown
    wrong = denoise(latents.clone(), schedule, [GuidedExpert("dit", ours, 5.0)],
                    Conditioning([cond], [neg], y=i2v_mask, clip_fea=clip_fea), "unipc")
    assert _rel(wrong, expected) > 100 * TOL  # the comparison can tell the last frame's mask channel

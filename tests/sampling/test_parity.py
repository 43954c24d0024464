"""Our denoising loop against diffusers' WanPipeline / WanImageToVideoPipeline with the same tiny random weights.

Both sides start from the same initial latents and the same prompt embeddings (no tokenizer or text encoder),
use the same scheduler (UniPC flow, FlowMatch Euler, DPM++ flow) with the same shift and steps, and are
compared on the final latents. Our loop runs with the "diffusers" schedule convention (diffusers' sigma
lists); the solvers are additionally checked step by step on the official "wan" schedule.
"""

from __future__ import annotations

import pytest
import torch

from library.sampling.denoise import Conditioning, GuidedExpert, denoise
from library.wan.conditioning import i2v_condition as i2v_y
from library.sampling.schedules import flow_schedule
from library.sampling.solvers import make_solver
from library.wan.variants import get_variant

diffusers = pytest.importorskip("diffusers")
from tests.wan.test_model import diffusers_twin  # noqa: E402
from tests.wan.test_vae import TINY, _randomise  # noqa: E402

TOL = 1e-4  # max |ours - diffusers| / max |diffusers| on the final latents
SHIFT, STEPS, SEED = 5.0, 6, 7
GUIDANCE = (3.0, 4.0)  # (low-noise expert, high-noise expert)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


def _scheduler(sampler: str):
    if sampler == "unipc":
        return diffusers.UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True,
                                                 flow_shift=SHIFT, num_train_timesteps=1000)
    if sampler == "dpm++":
        return diffusers.DPMSolverMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True,
                                                     flow_shift=SHIFT, algorithm_type="dpmsolver++", solver_order=2)
    return diffusers.FlowMatchEulerDiscreteScheduler(shift=SHIFT)


def _vae_twin(version: str):
    """diffusers AutoencoderKLWan and our VAE with the same weights and the same latent statistics."""
    cls, ours_kwargs, ref_kwargs, convert, _ = TINY[version]
    torch.manual_seed(0)
    ours = cls(**ours_kwargs).eval()
    stats = dict(latents_mean=ours.latents_mean.tolist(), latents_std=ours.latents_std.tolist())
    ref = diffusers.AutoencoderKLWan(**ref_kwargs, **stats).eval()
    _randomise(ref)
    ours.load_state_dict(convert(ref.state_dict()), strict=True)
    return ref, ours


def _prompts(variant, seed=3):
    g = torch.Generator().manual_seed(seed)
    cond, neg = torch.randn(6, variant.text_dim, generator=g), torch.randn(4, variant.text_dim, generator=g)

    def pad(e):
        out = torch.zeros(1, variant.text_len, variant.text_dim)
        out[0, : e.shape[0]] = e
        return out

    return cond, neg, pad(cond), pad(neg)


@pytest.fixture(scope="module")
def t2v_experts():
    variant = get_variant("t2v-tiny")
    high_ref, high = diffusers_twin(variant, seed=0)
    low_ref, low = diffusers_twin(variant, seed=1)
    return variant, (high_ref, low_ref), (high, low)


@pytest.mark.parametrize("sampler", ["unipc", "euler", "dpm++"])
def test_t2v_two_experts_match_wanpipeline(t2v_experts, sampler):
    """T2V-A14B layout: two experts switched at the boundary, each with its own CFG scale."""
    variant, (high_ref, low_ref), (high, low) = t2v_experts
    vae_ref, _ = _vae_twin("2.1")
    cond, neg, cond_pad, neg_pad = _prompts(variant)
    latents = torch.randn(1, 16, 3, 4, 4, generator=torch.Generator().manual_seed(SEED))
    pipe = diffusers.WanPipeline(tokenizer=None, text_encoder=None, vae=vae_ref, scheduler=_scheduler(sampler),
                                 transformer=high_ref, transformer_2=low_ref, boundary_ratio=variant.boundary)
    pipe.set_progress_bar_config(disable=True)
    expected = pipe(prompt_embeds=cond_pad, negative_prompt_embeds=neg_pad, height=32, width=32, num_frames=9,
                    num_inference_steps=STEPS, guidance_scale=GUIDANCE[1], guidance_scale_2=GUIDANCE[0],
                    latents=latents.clone(), output_type="latent").frames
    schedule = flow_schedule(STEPS, SHIFT, sampler, "diffusers")
    used = set()
    experts = [GuidedExpert("high_noise", high, GUIDANCE[1]), GuidedExpert("low_noise", low, GUIDANCE[0])]
    got = denoise(latents.clone(), schedule, experts, Conditioning([cond], [neg]), sampler, variant.boundary,
                  progress=lambda i, n, name: used.add(name))
    assert used == {"high_noise", "low_noise"}  # the boundary really falls inside this schedule
    err = _rel(got, expected)
    print(f"t2v {sampler}: relative max error {err:.2e}")
    assert err <= TOL


def test_ti2v_image_to_video_matches_diffusers():
    """TI2V-5B image-to-video: clean first frame, per-token timesteps, re-applied after every step."""
    from PIL import Image

    variant = get_variant("ti2v-tiny")
    ref, ours = diffusers_twin(variant, seed=4)
    vae_ref, vae = _vae_twin("2.2")
    cond, neg, cond_pad, neg_pad = _prompts(variant)
    g = torch.Generator().manual_seed(5)
    pixels = (torch.rand(64, 64, 3, generator=g) * 255).to(torch.uint8).numpy()
    latents = torch.randn(1, 48, 3, 4, 4, generator=torch.Generator().manual_seed(SEED))
    pipe = diffusers.WanImageToVideoPipeline(tokenizer=None, text_encoder=None, vae=vae_ref,
                                             scheduler=_scheduler("unipc"), transformer=ref, expand_timesteps=True)
    pipe.set_progress_bar_config(disable=True)
    expected = pipe(image=Image.fromarray(pixels), prompt_embeds=cond_pad, negative_prompt_embeds=neg_pad,
                    height=64, width=64, num_frames=9, num_inference_steps=STEPS, guidance_scale=5.0,
                    latents=latents.clone(), output_type="latent").frames
    image = torch.from_numpy(pixels).permute(2, 0, 1)[None, :, None].float() / 127.5 - 1  # [1, 3, 1, H, W]
    with torch.no_grad():
        first = vae.encode(image)
    got = denoise(latents.clone(), flow_schedule(STEPS, SHIFT, "unipc", "diffusers"), [GuidedExpert("dit", ours, 5.0)],
                  Conditioning([cond], [neg], first_frame=first), "unipc")
    err = _rel(got, expected)
    print(f"ti2v i2v unipc: relative max error {err:.2e}")
    assert err <= TOL
    assert torch.equal(got[:, :, :1], first)  # the image frame stays clean


def test_i2v_a14b_matches_diffusers():
    """I2V-A14B: mask + image latent as y, two experts."""
    from PIL import Image

    variant = get_variant("i2v-tiny")
    high_ref, high = diffusers_twin(variant, seed=0)
    low_ref, low = diffusers_twin(variant, seed=1)
    vae_ref, vae = _vae_twin("2.1")
    cond, neg, cond_pad, neg_pad = _prompts(variant)
    g = torch.Generator().manual_seed(6)
    pixels = (torch.rand(32, 32, 3, generator=g) * 255).to(torch.uint8).numpy()
    latents = torch.randn(1, 16, 3, 4, 4, generator=torch.Generator().manual_seed(SEED))
    pipe = diffusers.WanImageToVideoPipeline(tokenizer=None, text_encoder=None, vae=vae_ref,
                                             scheduler=_scheduler("unipc"), transformer=high_ref,
                                             transformer_2=low_ref, boundary_ratio=variant.boundary)
    pipe.set_progress_bar_config(disable=True)
    expected = pipe(image=Image.fromarray(pixels), prompt_embeds=cond_pad, negative_prompt_embeds=neg_pad,
                    height=32, width=32, num_frames=9, num_inference_steps=STEPS, guidance_scale=3.5,
                    guidance_scale_2=3.0, latents=latents.clone(), output_type="latent").frames
    image = torch.from_numpy(pixels).permute(2, 0, 1)[None, :, None].float() / 127.5 - 1
    with torch.no_grad():
        y = i2v_y(vae.encode(torch.cat([image, torch.zeros(1, 3, 8, 32, 32)], dim=2)))
    experts = [GuidedExpert("high_noise", high, 3.5), GuidedExpert("low_noise", low, 3.0)]
    got = denoise(latents.clone(), flow_schedule(STEPS, SHIFT, "unipc", "diffusers"), experts,
                  Conditioning([cond], [neg], y=y), "unipc", variant.boundary)
    err = _rel(got, expected)
    print(f"i2v-A14B unipc: relative max error {err:.2e}")
    assert err <= TOL


@pytest.mark.parametrize("sampler", ["unipc", "dpm++", "euler"])
def test_solvers_match_diffusers_on_the_official_schedule(sampler):
    """The official WAN sigmas (sigma_max 0.999 for UniPC, 1.0 for DPM++ / Euler) fed into diffusers'
    schedulers: every step of ours equals theirs, so the convention only changes the sigma list."""
    schedule = flow_schedule(10, 12.0, sampler, "wan")
    sch = _scheduler(sampler)
    sch.set_timesteps(10)
    sch.sigmas = schedule.sigmas.float().clone()
    sch.timesteps = schedule.timesteps.clone() if sampler == "euler" else schedule.timesteps.long()
    solver = make_solver(sampler, schedule)
    torch.manual_seed(0)
    x = torch.randn(1, 4, 2, 3, 3)
    a, b = x.clone(), x.clone()
    for i, t in enumerate(sch.timesteps):
        a = sch.step(torch.tanh(a) - 0.5 * a + t / 1000, t, a, return_dict=False)[0]
        b = solver.step(i, b, torch.tanh(b) - 0.5 * b + schedule.timesteps[i] / 1000)
        assert torch.isfinite(b).all()
    assert _rel(b, a) <= 1e-5


def test_official_schedule_values():
    """wan_facts section 6: sigma = linspace(0.999, 0, N+1)[:-1], shifted, t = int64(sigma' * 1000), then 0."""
    s = flow_schedule(4, 5.0, "unipc", "wan")
    base = torch.tensor([0.999, 0.74925, 0.4995, 0.24975], dtype=torch.float64)
    shifted = 5 * base / (1 + 4 * base)
    torch.testing.assert_close(s.sigmas[:-1], shifted.float().double())
    assert s.sigmas[-1] == 0 and s.timesteps.tolist() == [999.0, 937.0, 833.0, 624.0]
    dpm = flow_schedule(4, 5.0, "dpm++", "wan")
    assert dpm.sigmas[0] == 1.0 and dpm.timesteps[0] == 1000.0

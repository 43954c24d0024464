"""The VACE context against diffusers' WanVACEPipeline (its own preparation code, driven with a stand-in VAE
that both sides share), plus the official layout facts it rests on."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from library.wan.vace_context import letterbox_reference, mask_latent, vace_context

diffusers = pytest.importorskip("diffusers")

_MIX = torch.randn(16, 3, generator=torch.Generator().manual_seed(0))


def fake_encode(video: torch.Tensor) -> torch.Tensor:
    """A stand-in VAE with the real strides: [B, 3, 1 + 4k, H, W] -> [B, 16, 1 + k, H/8, W/8] (deterministic)."""
    pooled = F.avg_pool3d(video[:, :, ::4], kernel_size=(1, 8, 8))
    return torch.einsum("zc,bcthw->bzthw", _MIX, pooled) + pooled.square().sum(1, keepdim=True)


def pipeline_stub():
    from diffusers.video_processor import VideoProcessor

    vae = SimpleNamespace(dtype=torch.float32, config=SimpleNamespace(latents_mean=[0.0] * 16, latents_std=[1.0] * 16,
                                                                      z_dim=16),
                          encode=lambda x: SimpleNamespace(latents=fake_encode(x)))
    return SimpleNamespace(vae=vae, transformer=SimpleNamespace(config=SimpleNamespace(patch_size=(1, 2, 2))),
                           transformer_2=None, vae_scale_factor_temporal=4, vae_scale_factor_spatial=8,
                           video_processor=VideoProcessor(vae_scale_factor=8))


@pytest.mark.parametrize("with_ref", [False, True])
def test_context_matches_diffusers_pipeline(with_ref):
    from diffusers import WanVACEPipeline
    from PIL import Image

    stub = pipeline_stub()
    g = torch.Generator().manual_seed(1)
    video = torch.rand(1, 3, 9, 32, 48, generator=g) * 2 - 1
    mask = (torch.rand(1, 1, 9, 32, 48, generator=g) > 0.4).float().expand(1, 3, -1, -1, -1)
    # sides multiples of 8: diffusers' image processor first rounds other sizes down (the official code does not)
    ref_pil = Image.fromarray((np.random.default_rng(2).random((24, 40, 3)) * 255).astype(np.uint8))
    refs = [[]]  # what diffusers' preprocess_conditions gives without references
    if with_ref:  # diffusers' own letterboxing of the reference onto a white canvas
        _, _, refs = WanVACEPipeline.preprocess_conditions(stub, video=None, mask=None, reference_images=ref_pil,
                                                           height=32, width=48, num_frames=9, dtype=torch.float32)
    latents = WanVACEPipeline.prepare_video_latents(stub, video, mask, refs, None, torch.device("cpu"))
    masks = WanVACEPipeline.prepare_masks(stub, mask, refs)
    expected = torch.cat([latents, masks], dim=1)[0]
    ref_images = []
    if with_ref:
        ref_images = [torch.from_numpy(np.array(ref_pil)).permute(2, 0, 1).float() / 127.5 - 1]
    got, ref_latents = vace_context(fake_encode, video[0], mask[0, :1], ref_images)
    assert got.shape == (96, 3 + with_ref, 4, 6)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert (ref_latents is not None) == with_ref
    if with_ref:
        torch.testing.assert_close(got[:16, :1], ref_latents)
        assert got[16:, :1].abs().sum() == 0  # reactive and mask channels of a reference are zero


def test_mask_channels_are_8x8_pixel_blocks():
    mask = torch.zeros(1, 5, 32, 32)
    mask[0, :, 3, 5] = 1.0  # pixel (3, 5) of the first 8x8 block, every frame
    m = mask_latent(mask)
    assert m.shape == (64, 2, 4, 4)
    assert m[3 * 8 + 5, :, 0, 0].eq(1).all() and m.sum() == 2
    frames = torch.arange(81.0).view(1, 81, 1, 1).expand(1, 81, 16, 16)
    picked = mask_latent(frames)[0, :, 0, 0]  # nearest-exact over 81 -> 21 frames
    assert picked.tolist() == [float(int((i + 0.5) * 81 / 21)) for i in range(21)]


def test_defaults_and_reference_order():
    ctx, refs = vace_context(fake_encode, None, None, frames=5, size=(16, 32))
    assert ctx.shape == (96, 2, 2, 4) and refs is None
    torch.testing.assert_close(ctx[:16], fake_encode(torch.zeros(1, 3, 5, 16, 32))[0])  # zero video is inactive
    assert ctx[32:].eq(1).all()  # all-ones mask: everything is generated
    a, b = -torch.ones(3, 16, 32), torch.ones(3, 8, 8) * 0.5
    ctx, refs = vace_context(fake_encode, None, None, [a, b], frames=5, size=(16, 32))
    assert ctx.shape == (96, 4, 2, 4) and refs.shape == (16, 2, 2, 4)
    torch.testing.assert_close(refs[:, 0], fake_encode(a[None, :, None])[0, :, 0])  # given order kept
    boxed = letterbox_reference(b, (16, 32))
    assert boxed[:, :, :8].eq(1).all() and boxed[:, :, 12:20].eq(0.5).all()  # centred on white

"""WAN 2.1 FLF2V: the DiT with first + last frame CLIP tokens against diffusers, the y mask against the
official (and diffusers') construction, and detection of the variant from a checkpoint."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from library.wan.checkpoint_files import CheckpointError
from library.wan.flf2v import conditioning_video, flf2v_condition
from library.wan.loading import load_dit
from library.wan.variants import get_variant
from tests.helpers import random_official_dit_state
from tests.wan.test_model import assert_close, diffusers_twin, text_inputs

diffusers = pytest.importorskip("diffusers")
TASK = "flf2v-tiny"


def test_forward_matches_diffusers_with_first_and_last_frame_tokens():
    variant = get_variant(TASK)
    ref, ours = diffusers_twin(variant)
    with torch.no_grad():  # the learned positions start at zero: make them matter
        ref.condition_embedder.image_embedder.pos_embed.normal_(0, 0.5)
        ours.img_emb.emb_pos.copy_(ref.condition_embedder.image_embedder.pos_embed)
    torch.manual_seed(2)
    latent = torch.randn(2, variant.out_dim, 3, 4, 6)
    y = torch.randn(2, variant.in_dim - variant.out_dim, 3, 4, 6)
    clip = torch.randn(2, 2, variant.clip_tokens, variant.clip_dim)  # [B, (first, last), 257, width]
    t = torch.tensor([999.0, 431.5])
    prompts, padded = text_inputs(variant)
    with torch.no_grad():  # diffusers' pipeline passes [B * 2, 257, width], each sample's frames adjacent
        expected = ref(torch.cat([latent, y], 1), t, padded, encoder_hidden_states_image=clip.flatten(0, 1),
                       return_dict=False)[0]
        got = ours(latent, t, prompts, y=y, clip_fea=clip)
        flat = ours(latent, t, prompts, y=y, clip_fea=clip.flatten(1, 2))  # [B, 514, width] is the same
    assert_close(got, expected)
    assert torch.equal(got, flat)
    with torch.no_grad():  # the last frame's tokens matter
        other = ours(latent, t, prompts, y=y, clip_fea=torch.cat([clip[:, :1], clip[:, :1]], 1))
    assert (other - got).abs().max() > 1e-3


def _official_mask(frames: int, h: int, w: int) -> torch.Tensor:
    """The official first_last_frame2video mask: pixel frames 0 and F-1 known, folded 4 frames a latent."""
    msk = torch.ones(1, frames, h, w)
    msk[:, 1:-1] = 0
    msk = torch.cat([msk[:, :1].repeat_interleave(4, dim=1), msk[:, 1:]], dim=1)
    return msk.view(1, msk.shape[1] // 4, 4, h, w).transpose(1, 2)[0]  # [4, T, h, w]


@pytest.mark.parametrize("frames", [1, 5, 9, 17])
def test_mask_matches_official_construction(frames):
    t = (frames - 1) // 4 + 1
    latents = torch.randn(2, 16, t, 3, 5)
    y = flf2v_condition(latents)
    assert torch.equal(y[:, 4:], latents)
    assert torch.equal(y[0, :4], _official_mask(frames, 3, 5)) and torch.equal(y[1, :4], y[0, :4])


def test_conditioning_video_is_first_black_last():
    first, last = torch.rand(1, 3, 1, 4, 4), torch.rand(1, 3, 1, 4, 4)
    video = conditioning_video(first, 9, last)
    assert torch.equal(video[:, :, 0], first[:, :, 0]) and torch.equal(video[:, :, 8], last[:, :, 0])
    assert not video[:, :, 1:8].any()


def test_checkpoint_detection_and_contradicting_task(tmp_path):
    path = tmp_path / "flf2v.safetensors"
    save_file(random_official_dit_state(get_variant(TASK)), str(path))
    assert load_dit(path).variant.name == TASK  # told apart from I2V by img_emb.emb_pos
    with pytest.raises(CheckpointError, match=r"first-last-frame-to-video.*configured task is i2v-tiny-2.1"):
        load_dit(path, task="i2v-tiny-2.1")
    i2v = tmp_path / "i2v.safetensors"
    save_file(random_official_dit_state(get_variant("i2v-tiny-2.1")), str(i2v))
    with pytest.raises(CheckpointError, match=r"image-to-video.*configured task is flf2v-tiny"):
        load_dit(i2v, task=TASK)


@pytest.mark.parametrize("naming", ["comfyui", "diffusers"])
def test_other_key_names_load_with_emb_pos(tmp_path, naming):
    variant = get_variant(TASK)
    ref, ours = diffusers_twin(variant)
    with torch.no_grad():
        ours.img_emb.emb_pos.normal_()
    if naming == "diffusers":
        with torch.no_grad():
            ref.condition_embedder.image_embedder.pos_embed.copy_(ours.img_emb.emb_pos)
        sd = ref.state_dict()
    else:
        sd = {f"model.diffusion_model.{k}": v for k, v in ours.state_dict().items()}
    save_file({k: v.contiguous() for k, v in sd.items()}, str(tmp_path / "dit.safetensors"))
    model = load_dit(tmp_path / "dit.safetensors")
    assert model.variant.name == TASK
    assert torch.equal(model.img_emb.emb_pos, ours.img_emb.emb_pos)


def test_full_size_flf2v_is_i2v_14b_plus_emb_pos():
    from library.wan.model import WanModel

    with torch.device("meta"):
        flf, i2v = WanModel(get_variant("flf2v-14B")), WanModel(get_variant("i2v-14B"))
    ours, base = flf.state_dict(), i2v.state_dict()
    assert set(ours) - set(base) == {"img_emb.emb_pos"} and tuple(ours["img_emb.emb_pos"].shape) == (1, 514, 1280)
    assert all(ours[k].shape == base[k].shape for k in base) and len(ours) == 1304
    assert sum(p.numel() for p in flf.parameters()) == 16_394_878_784 + 514 * 1280

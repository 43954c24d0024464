"""Both WAN VAEs against diffusers' independent AutoencoderKLWan, plus their keys against the official dumps."""

from __future__ import annotations

import pytest
import torch

from library.wan.vae import WAN21_LATENTS_MEAN, WanVAE
from library.wan.vae22 import WAN22_LATENTS_MEAN, Wan22VAE
from library.wan.vae_formats import vae21_state_dict_from_diffusers, vae22_state_dict_from_diffusers
from tests.helpers import parse_key_sections, reference_file

diffusers = pytest.importorskip("diffusers")

TOL = 1e-4  # max abs error relative to the reference output's max abs value
TINY = {
    # name: (our class, our kwargs, diffusers kwargs, converter, test frame size)
    "2.1": (WanVAE, dict(dim=8, z_dim=16), dict(base_dim=8, z_dim=16), vae21_state_dict_from_diffusers, 32),
    "2.2": (
        Wan22VAE, dict(dim=8, decoder_dim=12, z_dim=48),
        dict(base_dim=8, decoder_base_dim=12, z_dim=48, is_residual=True, patch_size=2, in_channels=12,
             out_channels=12, scale_factor_spatial=16),
        vae22_state_dict_from_diffusers, 64,
    ),
}


def _randomise(model: torch.nn.Module) -> None:
    """Non-trivial norms and biases, so a swapped or dropped key changes the output."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("gamma"):
                p.uniform_(0.5, 1.5)
            elif name.endswith("bias"):
                p.normal_(0, 0.05)


@pytest.fixture(scope="module", params=list(TINY))
def twins(request):
    """(version, diffusers model, our model with the same weights, frame size), random weights, fp32, eval."""
    cls, ours_kwargs, ref_kwargs, convert, size = TINY[request.param]
    torch.manual_seed(0)
    ref = diffusers.AutoencoderKLWan(**ref_kwargs).eval()
    _randomise(ref)
    ours = cls(**ours_kwargs).eval()
    ours.load_state_dict(convert(ref.state_dict()), strict=True)
    return request.param, ref, ours, size


def _video(frames: int, size: int, seed: int = 1) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.rand(1, 3, frames, size, size, generator=gen) * 2 - 1  # [B, 3, F, H, W] in [-1, 1]


def _stats(ours) -> tuple[torch.Tensor, torch.Tensor]:
    shape = (1, ours.z_dim, 1, 1, 1)
    return ours.latents_mean.view(shape), ours.latents_std.view(shape)


def _rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out - ref).abs().max() / ref.abs().max()).item()


@pytest.mark.parametrize("frames", [9, 1])
def test_matches_diffusers(twins, frames):
    """Encode (mu) and decode agree with diffusers on a 9-frame clip (3 chunks: exercises every cache rule)."""
    version, ref, ours, size = twins
    video = _video(frames, size)
    mean, std = _stats(ours)
    with torch.no_grad():
        latents = ours.encode(video)  # normalised
        ref_mu = ref.encode(video).latent_dist.mean  # diffusers: un-normalised mu
        decoded = ours.decode(latents)
        ref_decoded = ref.decode(latents * std + mean).sample
    t_lat, s = 1 + (frames - 1) // 4, ours.spatial_stride
    assert latents.shape == ref_mu.shape == (1, ours.z_dim, t_lat, size // s, size // s)
    assert decoded.shape == ref_decoded.shape == video.shape
    assert latents.dtype == decoded.dtype == torch.float32
    assert _rel_err(latents * std + mean, ref_mu) <= TOL, version
    assert _rel_err(decoded, ref_decoded) <= TOL, version
    # the comparison would be empty if the clamp to [-1, 1] flattened most of the output
    assert decoded.abs().max() <= 1.0 and (decoded.abs() < 1.0).float().mean() > 0.9


def test_calls_do_not_leak_state(twins):
    """The chunk cache starts empty in every call: repeating a call, after another one, gives the same bits."""
    _, _, ours, size = twins
    with torch.no_grad():
        latents = ours.encode(_video(9, size))
        first = ours.decode(latents)
        ours.decode(torch.randn_like(latents))
        ours.encode(_video(5, size, seed=7))
        assert torch.equal(ours.decode(latents), first)
        assert torch.equal(ours.encode(_video(9, size)), latents)


def test_causal_in_time(twins):
    """Decoding a latent prefix gives a prefix of the full decode, and encoding a frame prefix a latent prefix."""
    _, _, ours, size = twins
    video = _video(9, size)
    with torch.no_grad():
        latents = ours.encode(video)  # [1, z, 3, h, w]
        torch.testing.assert_close(ours.encode(video[:, :, :5]), latents[:, :, :2], rtol=0, atol=1e-6)
        full = ours.decode(latents)  # [1, 3, 9, H, W]
        torch.testing.assert_close(ours.decode(latents[:, :, :2]), full[:, :, :5], rtol=0, atol=1e-6)


@pytest.mark.parametrize("version", list(TINY))
def test_meta_build_then_assign(version):
    """Built on meta and filled with load_state_dict(assign=True), it encodes like a normally built model."""
    cls, kwargs, _, _, size = TINY[version]
    torch.manual_seed(0)
    real = cls(**kwargs).eval()
    with torch.device("meta"):
        lazy = cls(**kwargs)
    assert not lazy.latents_mean.is_meta and not lazy.latents_std.is_meta
    lazy.load_state_dict(real.state_dict(), strict=True, assign=True)
    lazy.eval()
    with torch.no_grad():
        assert torch.equal(lazy.encode(_video(1, size)), real.encode(_video(1, size)))


@pytest.mark.parametrize("version", list(TINY))
def test_bf16_keeps_fp32_statistics(version):
    """A bf16 model computes in bf16 but normalises with exact fp32 statistics and returns fp32."""
    cls, kwargs, _, _, size = TINY[version]
    torch.manual_seed(0)
    model = cls(**kwargs).eval()
    video = _video(5, size)
    with torch.no_grad():
        reference = model.encode(video)
        model.to(torch.bfloat16)
        assert model.latents_mean.dtype == torch.float32
        expected = WAN21_LATENTS_MEAN if version == "2.1" else WAN22_LATENTS_MEAN
        assert torch.equal(model.latents_mean, torch.tensor(expected, dtype=torch.float32))
        latents = model.encode(video)
        decoded = model.decode(latents)
    assert latents.dtype == decoded.dtype == torch.float32 and model.conv1.weight.dtype == torch.bfloat16
    assert _rel_err(latents, reference) < 0.05


@pytest.mark.parametrize("section,cls", [("vae21", WanVAE), ("vae22", Wan22VAE)])
def test_full_size_keys_match_official(section, cls):
    """Full-size state_dict keys, shapes and parameter count equal the official module's, buffers excluded."""
    official = parse_key_sections(reference_file("keys", "wan_keys_vae.txt"))[section]
    with torch.device("meta"):
        model = cls()
    state = model.state_dict()
    assert {k: tuple(v.shape) for k, v in state.items()} == official["shapes"]
    assert len(state) == official["nkeys"]
    assert sum(v.numel() for v in state.values()) == official["params"]


@pytest.mark.parametrize("version", list(TINY))
def test_converter_rejects_official_names(version):
    """An official-format state dict is not silently 'converted': the caller chose the wrong path."""
    cls, kwargs, _, convert, _ = TINY[version]
    with pytest.raises(ValueError, match="not a diffusers WAN VAE state dict"):
        convert(cls(**kwargs).state_dict())


@pytest.mark.parametrize(
    "shape,message",
    [((1, 3, 8, 32, 32), "1 + 4k frames"), ((1, 3, 5, 36, 32), "multiples of"), ((1, 4, 5, 32, 32), "[B, 3, F, H, W]")],
)
def test_bad_video_is_a_clear_error(shape, message):
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("+", r"\+")):
        WanVAE(dim=8).encode(torch.zeros(shape))


def test_chunk_cache_in_host_memory_gives_the_same_bits(twins, monkeypatch):
    """`vae_cache_cpu`: every remembered frame goes to the store device and comes back for the next chunk.
    On this CPU-only machine the store is a distinct "device" we can watch: the copies are recorded."""
    from library.wan import vae_blocks as vae_module

    _, _, ours, size = twins
    video = _video(9, size)
    with torch.no_grad():
        latents = ours.encode(video)
        decoded = ours.decode(latents)
    kept = []
    original = vae_module.ChunkCache._keep

    def spy(self, layer, t):
        original(self, layer, t)
        kept.append((self.store, self._past[layer].device))

    monkeypatch.setattr(vae_module.ChunkCache, "_keep", spy)
    monkeypatch.setattr(ours, "cache_device", torch.device("cpu"))
    with torch.no_grad():
        assert torch.equal(ours.encode(video), latents)
        assert torch.equal(ours.decode(latents), decoded)
    assert kept and all(store == torch.device("cpu") and dev.type == "cpu" for store, dev in kept)

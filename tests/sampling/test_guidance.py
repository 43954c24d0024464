"""CFG skip and skip-layer guidance (musubi-tuner's `cfg_skip_mode` / `cfg_apply_ratio` and `slg_*`, as in its
wan_generate_video.py run_sampling and docs/wan.md, commit 30c658c), the noise ComfyUI draws, and the
inactive A14B expert waiting in host memory."""

from __future__ import annotations

import pytest
import torch

from library.sampling.denoise import Conditioning, GuidedExpert, denoise
from library.sampling.generate import generate
from library.sampling.guidance import GuidanceOptions, skipping_blocks
from library.sampling.prompts import SampleRequest
from library.sampling.schedules import flow_schedule
from tests.sampling.conftest import load_models

FAST = dict(steps=4, frames=1, width=32, height=32, seed=7)


@pytest.fixture(scope="module")
def t2v(tiny_sets):
    return load_models(tiny_sets["t2v-tiny"])


def test_cfg_skip_patterns_are_musubis():
    """The table of docs/wan.md: 10 steps, ratio 0.6 (A: CFG applied, S: skipped)."""
    table = {"early": "SSSSAAAAAA", "late": "AAAAAASSSS", "middle": "AAASSSSAAA", "early_late": "SSAAAAAASS",
             "alternate": "SASASAASAS"}
    for mode, pattern in table.items():
        assert GuidanceOptions(mode, 0.6).pattern(10) == pattern
    assert GuidanceOptions("early", None).pattern(4) == "AAAA"  # a mode without a ratio: CFG on every step
    assert GuidanceOptions(slg_mode="uncond", slg_layers=(1,), slg_start=0.2, slg_end=0.6).pattern(10) == \
        "AALLLLAAAA"
    with pytest.raises(ValueError, match="cfg_skip_mode 'sometimes'"):
        GuidanceOptions("sometimes")


def _calls(models, request, options) -> tuple[int, torch.Tensor]:
    count = [0]
    hooks = [m.register_forward_hook(lambda *a: count.__setitem__(0, count[0] + 1)) for m in models.experts.values()]
    try:
        latents = generate(models, request, guidance=options, decode=False).latents
    finally:
        for h in hooks:
            h.remove()
    return count[0], latents


def test_skipped_cfg_steps_run_one_pass(t2v):
    request = SampleRequest("a cat", **FAST)
    full, base = _calls(t2v, request, None)
    skipped, latents = _calls(t2v, request, GuidanceOptions("early", 0.5))  # SSAA
    assert (full, skipped) == (8, 6) and not torch.allclose(latents, base)
    slg, _ = _calls(t2v, request, GuidanceOptions(slg_mode="original", slg_layers=(1,), slg_start=0.0, slg_end=0.5))
    assert slg == 8 + 2  # the skip-layer pass on the first two steps
    sample = generate(t2v, request, guidance=GuidanceOptions("early", 0.5), decode=False)
    assert (sample.settings["cfg_skip_mode"], sample.settings["cfg_apply_ratio"]) == ("early", 0.5)


@pytest.mark.parametrize("mode", ["original", "uncond"])
def test_skip_layer_guidance_formulas(t2v, mode):
    """One Euler step, checked against the two formulas computed by hand."""
    model = t2v.experts["low_noise"]
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 16, 1, 4, 4, generator=g)
    cond = Conditioning([torch.randn(5, t2v.variant.text_dim, generator=g)],
                        [torch.randn(3, t2v.variant.text_dim, generator=g)])
    schedule = flow_schedule(1, 5.0, "euler")
    options = GuidanceOptions(slg_mode=mode, slg_layers=(0,), slg_scale=2.0, slg_start=0.0, slg_end=1.0)
    got = denoise(x, schedule, [GuidedExpert("low_noise", model, 4.0)], cond, "euler", guidance=options)
    t = schedule.timesteps[:1]
    with torch.no_grad():
        v_cond = model(x, t, list(cond.context))
        v_neg = model(x, t, list(cond.negative))
        with skipping_blocks(model, (0,)):
            v_skip = model(x, t, list(cond.negative))
    assert not torch.allclose(v_skip, v_neg)  # leaving block 0 out changes the flow
    if mode == "original":
        flow = v_neg + 4.0 * (v_cond - v_neg) + 2.0 * (v_cond - v_skip)
    else:
        flow = v_skip + 4.0 * (v_cond - v_skip)
    expected = x + (schedule.sigmas[1] - schedule.sigmas[0]).item() * flow
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_skipping_blocks_passes_the_input_on_and_restores_the_runner(t2v):
    model = t2v.experts["low_noise"]
    ran = []
    hooks = [b.register_forward_hook(lambda m, a, o, i=i: ran.append(i)) for i, b in enumerate(model.blocks)]
    sentinel = model.block_runner
    try:
        with skipping_blocks(model, (1,)):
            model(torch.randn(1, 16, 1, 4, 4), torch.tensor([500.0]), [torch.randn(3, t2v.variant.text_dim)])
        assert ran == [0] and model.block_runner is sentinel
    finally:
        for h in hooks:
            h.remove()


def test_noise_is_comfyuis_for_the_seed(t2v, monkeypatch):
    """`--cpu_noise` in musubi-tuner is ComfyUI's noise: randn on the CPU from manual_seed(seed); ours always."""
    import library.sampling.generate as gen

    seen = {}
    real = gen.denoise

    def spy(noise, *args, **kwargs):
        seen["noise"] = noise.clone()
        return real(noise, *args, **kwargs)

    monkeypatch.setattr(gen, "denoise", spy)
    sample = generate(t2v, SampleRequest("a cat", **{**FAST, "seed": 1234, "frames": 5}), decode=False)
    expected = torch.randn((1, 16, 2, 4, 4), generator=torch.manual_seed(1234), dtype=torch.float32)
    torch.testing.assert_close(seen["noise"], expected, rtol=0, atol=0)
    assert sample.settings["noise"] == "cpu"


def test_offload_inactive_brings_each_expert_in_once(t2v, monkeypatch):
    import library.runtime.memory as memory

    moves = []
    monkeypatch.setattr(memory, "place_model", lambda model, device: moves.append((model, str(device))))
    request = SampleRequest("a cat", **FAST)
    base = generate(t2v, request, decode=False).latents
    t2v.offload_inactive = True
    try:
        latents = generate(t2v, request, decode=False).latents
    finally:
        t2v.offload_inactive = False
    high, low = t2v.experts["high_noise"], t2v.experts["low_noise"]
    assert moves == [(low, "cpu"), (high, "cpu"), (high, "cpu"), (low, "cpu")]  # other out, active in; twice
    torch.testing.assert_close(latents, base, rtol=0, atol=0)


def test_skipped_blocks_keep_the_block_swap_schedule(t2v):
    """With block swap (its schedule run on the CPU), skipping a block still loads and drops it in order and
    gives the flow skipping gives without swap."""
    import copy

    from library.runtime.block_swap import BlockSwapper, HostTransport
    from library.runtime.memory import BlockRunner

    model = copy.deepcopy(t2v.experts["low_noise"])
    inputs = (torch.randn(1, 16, 1, 4, 4), torch.tensor([500.0]), [torch.randn(3, t2v.variant.text_dim)])
    with torch.no_grad(), skipping_blocks(model, (1,)):
        expected = model(*inputs)
    trace = []
    model.block_runner = BlockRunner(BlockSwapper(model.blocks, 1, HostTransport(), prefetch=1, trace=trace))
    with torch.no_grad(), skipping_blocks(model, (1,)):  # the swapped block is the skipped one
        got = model(*inputs)
    assert isinstance(model.block_runner, BlockRunner)  # restored
    assert trace == [("load", 1), ("use", 1), ("drop", 1)]
    torch.testing.assert_close(got, expected, rtol=0, atol=0)

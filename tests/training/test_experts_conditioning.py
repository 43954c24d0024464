"""Expert timestep ranges and routing, I2V / TI2V conditioning, checkpoints on disk and the loss log."""

from __future__ import annotations

import csv

import pytest
import torch

from library.training import checkpoints as ckpt
from library.training.conditioning import ti2v_condition
from library.wan.conditioning import i2v_condition
from library.training.experts import Expert, ExpertRouter, expert_ranges, make_samplers
from library.training.flow_matching import TimestepSampler
from library.training.logs import LossLog
from library.wan.variants import get_variant

A14B, T2V = get_variant("t2v-A14B"), get_variant("t2v-1.3B")


def test_two_experts_split_at_the_boundary():
    ranges = expert_ranges(A14B, 0.875, True, True, None, None)
    assert ranges == {"low_noise": (0.0, 875.0), "high_noise": (875.0, 1000.0)}
    samplers = make_samplers(TimestepSampler(method="uniform"), ranges)
    gen = torch.Generator().manual_seed(0)
    low = samplers["low_noise"].sample(2000, gen)
    high = samplers["high_noise"].sample(2000, gen)
    assert low.max() < 0.875 and high.min() >= 0.875
    # each expert keeps the shape of the distribution: uniform stays uniform inside its range
    assert abs(low.mean().item() - 0.4375) < 0.02 and abs(high.mean().item() - 0.9375) < 0.005


def test_one_expert_alone_gets_its_range_and_contradictions_are_errors():
    assert expert_ranges(A14B, 0.9, True, False, None, None) == {"low_noise": (0.0, 900.0)}
    assert expert_ranges(A14B, 0.9, False, True, None, None) == {"high_noise": (900.0, 1000.0)}
    with pytest.raises(ValueError, match="leave no timesteps for the high_noise expert"):
        expert_ranges(A14B, 0.9, False, True, 0, 800)
    with pytest.raises(ValueError, match="training only the low_noise expert: its timesteps are 0-900"):
        expert_ranges(A14B, 0.9, True, False, 0, 1000)
    assert expert_ranges(T2V, None, True, False, 100, 900) == {"dit": (100.0, 900.0)}


def test_pick_expert_follows_the_mass_of_the_distribution():
    experts = [Expert(n, None, None, 1e-4, 4) for n in ("low_noise", "high_noise")]
    base = TimestepSampler(method="uniform")
    router = ExpertRouter(experts, base, 0.875, offload_inactive=False, device=torch.device("cpu"))
    picks = [router.draw(torch.Generator().manual_seed(i)).name for i in range(4000)]
    share = picks.count("high_noise") / len(picks)
    assert abs(share - 0.125) < 0.02


def test_i2v_condition_matches_the_official_layout():
    image_latents = torch.randn(2, 16, 3, 4, 4)
    y = i2v_condition(image_latents)
    assert y.shape == (2, 20, 3, 4, 4)
    assert (y[:, :4, 0] == 1).all() and (y[:, :4, 1:] == 0).all()
    torch.testing.assert_close(y[:, 4:], image_latents)


def test_ti2v_condition_clean_first_frame_zero_timestep_no_loss():
    x0, xt = torch.randn(2, 48, 3, 4, 4), torch.randn(2, 48, 3, 4, 4)
    sigma = torch.tensor([0.5, 0.25])
    out, t, mask = ti2v_condition(x0, xt, sigma, torch.tensor([True, False]))
    torch.testing.assert_close(out[0, :, 0], x0[0, :, 0])  # conditioned: clean frame 0
    torch.testing.assert_close(out[0, :, 1:], xt[0, :, 1:])
    torch.testing.assert_close(out[1], xt[1])  # not conditioned: untouched
    assert t.shape == (2, 3 * 2 * 2)
    assert (t[0, :4] == 0).all() and (t[0, 4:] == 500).all() and (t[1] == 250).all()
    assert mask[0, 0, 0].item() == 0 and mask[0, 0, 1:].eq(1).all() and mask[1].eq(1).all()


def test_state_save_load_latest_and_prune(tmp_path):
    for step in (10, 20, 30):
        run_state = {"seed": 1, "global_step": step, "epoch": 0, "batch_in_epoch": step}
        payload = {"run_state": run_state, "networks": {}, "optimizer": {}, "scheduler": {}}
        ckpt.save_state(ckpt.state_dir(tmp_path, "run", step=step), payload, {"global_step": step})
        for suffix in ("_high_noise", "_low_noise"):
            ckpt.lora_path(tmp_path, "run", suffix, step=step).write_bytes(b"x")
    assert ckpt.load_state("latest", tmp_path, "run")["run_state"]["global_step"] == 30
    ckpt.prune(tmp_path, "run", "step", 2, ("_high_noise", "_low_noise"))
    ckpt.prune(tmp_path, "run", "step-state", 1)
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["run-step00000030-state", "run_high_noise-step00000020.safetensors",
                     "run_high_noise-step00000030.safetensors", "run_low_noise-step00000020.safetensors",
                     "run_low_noise-step00000030.safetensors"]
    with pytest.raises(ValueError, match="not a training state folder"):
        ckpt.load_state(tmp_path / "run_low_noise-step00000030.safetensors")


def test_loss_log_csv_png_and_resume(tmp_path):
    log = LossLog(tmp_path, plot_seconds=0)
    for step in range(1, 21):
        log.add(step, 0, 1.0 / step, 1e-4)
    log.add(20, 0, 0.3, 1e-4, kind="val")
    assert (tmp_path / "loss.png").stat().st_size > 1000
    resumed = LossLog(tmp_path, resume_step=10)  # rows after step 10 are dropped: they will be redone
    with open(tmp_path / "loss.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 10 and resumed.rows[-1]["step"] == 10


def test_prefetch_keeps_order_and_raises_errors():
    from library.training.data import prefetch

    assert list(prefetch(iter(range(10)), depth=2)) == list(range(10))

    def broken():
        yield 1
        raise OSError("cache file vanished")

    it = prefetch(broken())
    assert next(it) == 1
    with pytest.raises(OSError, match="cache file vanished"):
        next(it)

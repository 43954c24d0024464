"""Flow-matching maths and the optimizer / schedule factories."""

from __future__ import annotations

import math

import pytest
import torch

from library.config import ConfigError
from library.training.flow_matching import TimestepSampler, add_noise, shift_sigma
from library.training.optimizers import build_optimizer, build_scheduler, warmup_steps_from


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def test_add_noise_is_the_rectified_flow_line():
    x0, noise = torch.randn(2, 4, 1, 2, 2), torch.randn(2, 4, 1, 2, 2)
    xt, target = add_noise(x0, noise, torch.tensor([0.0, 1.0]))
    torch.testing.assert_close(xt[0], x0[0])
    torch.testing.assert_close(xt[1], noise[1])
    torch.testing.assert_close(target, noise - x0)
    # x0 is recovered from x_t and the true velocity, as the UniPC solver does: x0 = x_t - sigma * v
    sigma = torch.tensor([0.3, 0.8])
    xt, target = add_noise(x0, noise, sigma)
    torch.testing.assert_close(xt - sigma.view(-1, 1, 1, 1, 1) * target, x0)


@pytest.mark.parametrize("method", ["sigma", "uniform", "sigmoid", "shift", "logsnr", "logit_normal"])
def test_every_method_stays_in_range_and_is_reproducible(method):
    sampler = TimestepSampler(method=method, min_timestep=100, max_timestep=900)
    a, b = sampler.sample(4096, gen()), sampler.sample(4096, gen())
    torch.testing.assert_close(a, b)
    assert a.min() >= 0.1 - 1e-6 and a.max() <= 0.9 + 1e-6


def test_shift_moves_mass_to_high_noise():
    low = TimestepSampler(method="shift", shift=1.0).sample(20000, gen()).mean()
    high = TimestepSampler(method="shift", shift=5.0).sample(20000, gen()).mean()
    assert abs(low - 0.5) < 0.02 and high > 0.7
    assert shift_sigma(torch.tensor(0.5), 3.0).item() == pytest.approx(0.75)


def test_preserve_distribution_shape_rejects_instead_of_rescaling():
    """An expert's range: the kept samples follow the original density restricted to the range."""
    full = TimestepSampler(method="uniform").sample(50000, gen())
    kept = TimestepSampler(method="uniform", min_timestep=875, preserve_distribution_shape=True).sample(5000, gen())
    assert kept.min() >= 0.875 and abs(kept.mean().item() - 0.9375) < 0.01
    assert abs(full.mean().item() - 0.5) < 0.01


def test_weighting_schemes():
    s = torch.tensor([0.25, 0.5])
    torch.testing.assert_close(TimestepSampler(weighting_scheme="sigma_sqrt").loss_weight(s), torch.tensor([16.0, 4.0]))
    cos = TimestepSampler(weighting_scheme="cosmap").loss_weight(s)
    assert cos[1].item() == pytest.approx(2 / (math.pi * 0.5))
    torch.testing.assert_close(TimestepSampler().loss_weight(s), torch.ones(2))


def test_bad_sampler_settings_are_clear():
    with pytest.raises(ValueError, match="timestep_sampling 'flux' is not one of"):
        TimestepSampler(method="flux")
    with pytest.raises(ValueError, match="min_timestep < max_timestep"):
        TimestepSampler(min_timestep=900, max_timestep=100)


def lrs(name, total=100, **kw):
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=1.0)
    sched = build_scheduler(opt, name, total, **kw)
    out = []
    for _ in range(total):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return out


def test_schedules():
    assert lrs("constant") == [1.0] * 100
    warm = lrs("constant_with_warmup", warmup_steps=0.1)
    assert warm[0] == pytest.approx(1 / 11) and warm[10:] == [1.0] * 90
    lin = lrs("linear")
    assert lin[0] == 1.0 and lin[50] == pytest.approx(0.5) and lin[-1] == pytest.approx(0.01)
    cos = lrs("cosine", min_lr_ratio=0.1)
    assert cos[50] == pytest.approx(0.55) and min(cos) >= 0.1
    restarts = lrs("cosine_with_restarts", num_cycles=2)
    assert restarts[49] < 0.01 and restarts[50] == pytest.approx(1.0)
    poly = lrs("polynomial", power=2.0)
    assert poly[50] == pytest.approx(0.25)
    assert warmup_steps_from(0.05, 1000) == 50 and warmup_steps_from(30, 1000) == 30
    with pytest.raises(ValueError, match="lr_scheduler 'cosine_annealing' is not one of"):
        lrs("cosine_annealing")


def _reference(fn, total=100, **kw):
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=1.0)
    sched = fn(opt, **kw)
    out = []
    for _ in range(total):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return out


def test_more_schedules_match_transformers_after_warmup():
    """inverse_sqrt, cosine_with_min_lr, warmup_stable_decay and piecewise_constant follow transformers' and
    diffusers' definitions (the ones Kohya's scripts use); warmup differs by design ((s + 1) / (w + 1), never 0)."""
    tr = pytest.importorskip("transformers.optimization")
    mine = lrs("inverse_sqrt", warmup_steps=10, timescale=20)
    ref = _reference(tr.get_inverse_sqrt_schedule, num_warmup_steps=10, timescale=20)
    assert mine[10:] == pytest.approx(ref[10:])
    mine = lrs("cosine_with_min_lr", warmup_steps=10, min_lr_ratio=0.2)
    ref = _reference(tr.get_cosine_with_min_lr_schedule_with_warmup, num_warmup_steps=10, num_training_steps=100,
                     min_lr_rate=0.2)
    assert mine[10:] == pytest.approx(ref[10:])
    mine = lrs("warmup_stable_decay", warmup_steps=10, decay_steps=0.3, min_lr_ratio=0.1)
    ref = _reference(tr.get_wsd_schedule, num_warmup_steps=10, num_decay_steps=30, num_stable_steps=60,
                     min_lr_ratio=0.1)
    assert mine[10:] == pytest.approx(ref[10:])
    assert mine[10:70] == [1.0] * 60 and mine[-1] < 0.11
    rules = "1:10,0.1:20,0.01"
    mine = lrs("piecewise_constant", scheduler_args={"step_rules": rules})
    ref = _reference(pytest.importorskip("diffusers.optimization").get_piecewise_constant_schedule, step_rules=rules)
    assert mine == pytest.approx(ref) and mine[9] == 1.0 and mine[15] == pytest.approx(0.1)
    with pytest.raises(ValueError, match="step_rules like"):
        lrs("piecewise_constant")


def test_adafactor_schedule_needs_relative_steps():
    p = [torch.nn.Parameter(torch.randn(4))]
    ada = build_optimizer(p, "AdaFactor", 1e-3, {"relative_step": True, "warmup_init": True})
    sched = build_scheduler(ada, "adafactor", 10)
    p[0].grad = torch.ones(4)
    ada.step()
    sched.step()
    assert sched.get_last_lr()[0] > 0
    plain = torch.optim.SGD(p, lr=1.0)
    with pytest.raises(ValueError, match="relative_step=True"):
        build_scheduler(plain, "adafactor", 10)


def test_optimizers_by_name_and_path():
    p = [torch.nn.Parameter(torch.randn(4))]
    assert type(build_optimizer(p, "AdamW", 1e-3, {"weight_decay": 0.01})).__name__ == "AdamW"
    assert type(build_optimizer(p, "torch.optim.SGD", 1e-3, {"momentum": 0.9})).__name__ == "SGD"
    ada = build_optimizer(p, "AdaFactor", 1e-3)
    assert ada.param_groups[0]["lr"] == 1e-3
    with pytest.raises(ConfigError, match="`optimizer_type` = 'torch.optim.Nope' cannot be imported"):
        build_optimizer(p, "torch.optim.Nope", 1e-3)
    with pytest.raises(ConfigError, match="'Foo' is neither a known optimizer .* nor a dotted class path"):
        build_optimizer(p, "Foo", 1e-3)
    try:
        import prodigyopt  # noqa: F401
    except ImportError:
        with pytest.raises(ConfigError, match="pip install prodigyopt"):
            build_optimizer(p, "Prodigy", 1.0)


@pytest.mark.parametrize("name", ["AdamW8bit", "PagedAdamW8bit", "Lion"])
def test_bitsandbytes_optimizers(name):
    pytest.importorskip("bitsandbytes")
    p = torch.nn.Parameter(torch.randn(256, 256))  # large enough for the 8-bit block-wise state
    before = p.detach().clone()
    opt = build_optimizer([p], name, 1e-3)
    p.grad = torch.randn_like(p)
    opt.step()
    assert not torch.equal(p.detach(), before)
    if "8bit" in name:
        assert any(t.dtype == torch.uint8 for t in opt.state[p].values() if torch.is_tensor(t))


def test_flux_shift_grows_with_the_token_count():
    sampler = TimestepSampler(method="flux_shift")
    short = sampler.sample(20000, gen(), tokens=256).mean()
    large = sampler.sample(20000, gen(), tokens=4096).mean()
    assert large > short + 0.1  # larger frames spend more of training at high noise
    with pytest.raises(ValueError, match="needs the token count"):
        sampler.sample(4, gen())

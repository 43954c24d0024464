"""Each quality metric separates its defect from the clean sample, with the default thresholds."""

from __future__ import annotations

import pytest

from library.prep import quality
from library.prep.filters import Thresholds, combined_score, failures
from library.prep.synthetic import ClipSpec, make_clip, make_image

T = Thresholds()
SEEDS = (0, 1, 2)


def greys(**defects) -> dict[int, list]:
    return {seed: [quality.to_grey(f) for f in make_clip(ClipSpec(seed=seed, **defects))] for seed in SEEDS}


@pytest.fixture(scope="module")
def clean():
    return greys()


@pytest.mark.parametrize("seed", SEEDS)
def test_blur_sharp_vs_blurred(seed):
    assert quality.sharpness(quality.to_grey(make_image(seed=seed))) > T.min_sharpness
    assert quality.sharpness(quality.to_grey(make_image(seed=seed, blur_sigma=2.0))) < T.min_sharpness


@pytest.mark.parametrize("seed", SEEDS)
def test_motion_blur_smear_vs_clean(seed, clean):
    smeared = greys(motion_blur=7)[seed]
    assert quality.motion_blur(smeared[12]) > T.max_motion_blur
    assert quality.motion_blur(clean[seed][12]) < T.max_motion_blur


@pytest.mark.parametrize("seed", SEEDS)
def test_noise_and_blockiness(seed):
    clean = quality.to_grey(make_image(seed=seed))
    assert quality.noise_sigma(clean) < T.max_noise
    assert quality.noise_sigma(quality.to_grey(make_image(seed=seed, noise_sigma=12.0))) > T.max_noise
    assert quality.blockiness(clean) < T.max_blockiness
    assert quality.blockiness(quality.to_grey(make_image(seed=seed, jpeg_quality=8))) > T.max_blockiness


def test_noise_estimate_is_calibrated():
    """Pure grey noise of sigma 8 on a flat picture reads as about 8."""
    import numpy as np

    flat = np.clip(128 + np.random.default_rng(0).normal(0, 8, (256, 256)), 0, 255).astype(np.uint8)
    assert quality.noise_sigma(flat) == pytest.approx(8, rel=0.1)


def test_shake_steady_pan_vs_jitter(clean):
    for seed in SEEDS:
        assert quality.shake(clean[seed]) < T.max_shake
    for seed, frames in greys(jitter=3.0).items():
        assert quality.shake(frames) > T.max_shake
    fast = [quality.to_grey(f) for f in make_clip(ClipSpec(seed=0, pan=(3.0, 1.0)))]
    assert quality.shake(fast) < T.max_shake  # a fast but steady pan is not shake


def test_lighting_jump(clean):
    for seed, frames in greys(light_jump_at=10).items():
        assert quality.lighting_jump(frames) > T.max_lighting_jump
        assert quality.lighting_jump(clean[seed]) < T.max_lighting_jump


def test_static_overlay(clean):
    for seed, frames in greys(overlay=True).items():
        assert quality.static_overlay(frames) > T.max_overlay
        assert quality.static_overlay(clean[seed]) < T.max_overlay


def test_overlay_needs_motion_to_judge():
    still = [quality.to_grey(f) for f in make_clip(ClipSpec(seed=0, pan=(0.0, 0.0), overlay=True))]
    assert quality.static_overlay(still) is None
    assert quality.static_overlay(still[:2]) is None


def test_phash_near_duplicates_and_distinct_images():
    from library.prep.dedup import hamming

    a = quality.phash(quality.to_grey(make_image(seed=3)))
    again = quality.phash(quality.to_grey(make_image(seed=3, noise_sigma=2.0)))
    other = quality.phash(quality.to_grey(make_image(seed=4)))
    assert hamming(a, again) <= T.max_duplicate_distance < hamming(a, other)


def test_failures_name_defect_value_and_threshold():
    scores = {"sharpness": 5.0, "noise": 1.0, "shake": 2.5, "overlay": None}
    assert failures(scores, T) == ["blur: sharpness 5 < 50", "camera shake: shake 2.5 > 0.6"]
    assert failures(scores, T, disabled=("sharpness", "shake")) == []


def test_combined_score_orders_by_margin():
    good = {"sharpness": 800.0, "noise": 0.5, "blockiness": 1.0}
    worse = {"sharpness": 120.0, "noise": 3.0, "blockiness": 1.3}
    bad = {"sharpness": 5.0, "noise": 9.0, "blockiness": 3.0}
    assert combined_score(good, T) > combined_score(worse, T) > 0 > combined_score(bad, T)
    assert combined_score({}, T) == 0.0

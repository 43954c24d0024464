"""Aspect buckets: step sizes per VAE, same area as `resolution`, selection and `bucket_no_upscale`."""

from __future__ import annotations

import pytest

from library.data.buckets import bucket_step, fixed_bucket, make_buckets, select_bucket
from library.data.video_io import MediaError


def test_steps():
    assert bucket_step("2.1") == 16 and bucket_step("2.2") == 32
    with pytest.raises(ValueError, match="unknown VAE kind"):
        bucket_step("3.0")


@pytest.mark.parametrize("resolution, step", [((832, 480), 16), ((1280, 704), 32), ((512, 512), 16), ((768, 768), 32)])
def test_buckets_keep_area_and_step(resolution, step):
    area = resolution[0] * resolution[1]
    buckets = make_buckets(resolution, step)
    assert fixed_bucket(resolution, step) in buckets
    for w, h in buckets:
        assert w % step == 0 and h % step == 0 and w * h <= area
        assert (w * (h + step) > area)  # the largest height for that width
        assert max(w / h, h / w) <= 4


def test_selection_by_aspect():
    common = dict(enable_bucket=True, no_upscale=False)
    assert select_bucket(1280, 720, (832, 480), 16, **common) == (832, 480)
    assert select_bucket(720, 1280, (832, 480), 16, **common) == (480, 832)
    assert select_bucket(1000, 1000, (512, 512), 16, **common) == (512, 512)
    assert select_bucket(1280, 704, (1280, 704), 32, **common) == (1280, 704)
    w, h = select_bucket(400, 300, (512, 512), 32, **common)
    assert abs(w / h - 4 / 3) < 0.15 and w % 32 == 0 and h % 32 == 0


def test_fixed_bucket_without_enable_bucket():
    assert select_bucket(300, 900, (512, 500), 16, enable_bucket=False, no_upscale=False) == (512, 496)


def test_no_upscale_keeps_small_media_small():
    assert select_bucket(200, 120, (512, 512), 16, enable_bucket=True, no_upscale=True) == (192, 112)
    big = select_bucket(2000, 1000, (512, 512), 16, enable_bucket=True, no_upscale=True)
    assert big[0] * big[1] <= 512 * 512 and big[0] <= 2000


def test_no_upscale_errors_name_the_file():
    with pytest.raises(MediaError) as info:
        select_bucket(64, 48, (128, 128), 16, enable_bucket=False, no_upscale=True, name="small.png")
    assert str(info.value) == ("small.png: 64x48 is smaller than the 128x128 bucket and bucket_no_upscale is set; "
                               "use a larger source, lower `resolution`, set enable_bucket or unset bucket_no_upscale")
    with pytest.raises(MediaError, match="smaller than the smallest bucket side 32"):
        select_bucket(20, 200, (512, 512), 32, enable_bucket=True, no_upscale=True, name="thin.png")


def test_a_resolution_off_the_step_is_refused_with_the_nearest_valid_values():
    from library.data.buckets import resolution_problem

    assert resolution_problem((1280, 704), 32) is None and resolution_problem((832, 480), 16) is None
    assert resolution_problem((1280, 720), 32) == (
        "resolution = [1280, 720] is not a multiple of 32 (the WAN 2.2 VAE's stride 16 x the DiT patch 2): buckets "
        "would silently crop or shrink every item; use [1280, 704] or [1280, 736]")
    assert resolution_problem((60, 60), 16).endswith("use [48, 48] or [64, 64]")
    assert resolution_problem((20, 20), 32).endswith("use [32, 32]")
    # the crop it prevents: no square bucket at the area of 60 x 60, so a square image loses a quarter
    assert select_bucket(60, 60, (60, 60), 16, enable_bucket=True, no_upscale=False) == (64, 48)


def test_training_and_caching_refuse_it_before_reading_media(tmp_path):
    from library.data.dataset_config import DatasetConfigError, load_dataset_config
    from library.data.datasets import DatasetError, build_train_datasets

    (tmp_path / "imgs").mkdir()
    (tmp_path / "d.toml").write_text("[general]\nresolution = [1280, 720]\n[[datasets]]\nimage_directory = 'imgs'\n")
    config = load_dataset_config(tmp_path / "d.toml")
    with pytest.raises(DatasetError, match="no usable item"):  # the WAN 2.1 VAE's step 16 accepts it
        build_train_datasets(config, "t2v-tiny")
    with pytest.raises(DatasetConfigError, match=r"\[\[datasets\]\] #0 .*: resolution = \[1280, 720\] is not a "
                                                 r"multiple of 32 .* use \[1280, 704\] or \[1280, 736\]"):
        build_train_datasets(config, "ti2v-tiny")

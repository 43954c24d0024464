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

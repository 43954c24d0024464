"""Bars, output sizes, resize + centre crop, colour normalisation, near-duplicate grouping."""

from __future__ import annotations

import numpy as np

from library.prep.dedup import find_duplicates
from library.prep.standardize import (CropBox, detect_bars, fit_color_transform, output_size, resize_cover)
from library.prep.synthetic import make_image


def test_letterbox_detected_and_cropped():
    frame = make_image(seed=1, letterbox=8)
    box = detect_bars([frame])
    assert (box.x0, box.x1) == (0, 96)
    assert 8 <= box.y0 <= 10 and 54 <= box.y1 <= 56
    assert box.apply(frame)[[0, -1]].max() > 24  # no black line left


def test_pillarbox_detected():
    frame = make_image(seed=2).copy()
    frame[:, :12] = 3
    frame[:, -12:] = 0
    box = detect_bars([frame, frame])
    assert 12 <= box.x0 <= 14 and 82 <= box.x1 <= 84 and (box.y0, box.y1) == (0, 64)


def test_no_bars_on_clean_or_black_frames():
    assert detect_bars([make_image(seed=3)]) == CropBox(0, 0, 96, 64)
    black = np.zeros((64, 96, 3), np.uint8)
    assert detect_bars([black]) == CropBox(0, 0, 96, 64)


def test_bars_must_hold_in_every_frame():
    barred, bright = make_image(seed=4, letterbox=8), make_image(seed=4)
    assert detect_bars([barred, bright]) == CropBox(0, 0, 96, 64)


def test_output_size_square_and_keep_aspect():
    assert output_size(1920, 1080, 512, square=True) == (512, 512)
    w, h = output_size(1920, 1080, 512, square=False)
    assert w % 16 == 0 and h % 16 == 0 and w * h <= 512 * 512 and abs(w / h - 16 / 9) < 0.05
    assert output_size(320, 240, 512, square=False) == (320, 240)  # never upscaled


def test_resize_cover_centre_crops_without_distortion():
    frame = np.zeros((100, 200, 3), np.uint8)
    frame[:, 50:150] = 255  # the centre square is white
    out = resize_cover(frame, 50, 50)
    assert out.shape == (50, 50, 3) and out.min() == 255


def test_colour_normalisation_balances_a_cast():
    frame = make_image(seed=5).astype(np.float32)
    cast = np.clip(frame * np.array([0.8, 1.0, 1.25]), 0, 255).astype(np.uint8)  # BGR: a warm cast
    transform = fit_color_transform([cast])
    out = transform.apply(cast).reshape(-1, 3).mean(axis=0)
    before = cast.reshape(-1, 3).mean(axis=0)
    assert np.ptp(out) < np.ptp(before) / 2


def test_duplicates_keep_the_best_of_each_group():
    hashes = [0b1111, 0b1110, 0xF0F0F0F0F0F0F0F0, 0b0111]
    scores = [0.5, 0.9, 0.1, 0.2]
    assert find_duplicates(hashes, scores, max_distance=1) == {0: (1, 1)}
    duplicates = find_duplicates(hashes, scores, max_distance=2)
    assert duplicates == {0: (1, 1), 3: (1, 2)}
    assert 2 not in duplicates and 1 not in duplicates

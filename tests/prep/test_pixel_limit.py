"""The pixel limit (library/prep/pixel_limit.py) on every read path: Pillow headers, OpenCV image bytes,
OpenCV and PyAV video frames; the environment variable raises or lowers it."""

from __future__ import annotations

import logging
import re

import pytest

from library.data import video_io, video_pyav
from library.prep import media
from library.prep.pixel_limit import DEFAULT_MAX_PIXELS, PIXELS_ENV, TooManyPixels, max_pixels, open_image
from tests.data.conftest import write_video
from tests.hostile.media import png_header_bomb


def test_default_and_a_bad_setting(monkeypatch, caplog):
    monkeypatch.delenv(PIXELS_ENV, raising=False)
    assert max_pixels() == DEFAULT_MAX_PIXELS == 178_956_970
    monkeypatch.setenv(PIXELS_ENV, "lots")
    with caplog.at_level(logging.WARNING):
        assert max_pixels() == DEFAULT_MAX_PIXELS
    assert "WAN_MAX_IMAGE_PIXELS='lots' is not a positive whole number of pixels; using the default" in caplog.text
    monkeypatch.setenv(PIXELS_ENV, "250_000_000")
    assert max_pixels() == 250_000_000


def test_raising_the_limit_lets_a_large_header_through_without_decoding(tmp_path, monkeypatch):
    big = png_header_bomb(tmp_path / "big.png", 20_000, 10_000)  # 200 Mpx: over Pillow's own hard limit
    with pytest.raises(TooManyPixels, match=r"^200,000,000 pixels is over the limit of 178,956,970"):
        open_image(big)
    monkeypatch.setenv(PIXELS_ENV, "250000000")
    with open_image(big) as image:
        assert image.size == (20_000, 10_000)


def test_video_frames_over_the_limit(tmp_path, monkeypatch):
    clip = write_video(tmp_path / "c.mp4", frames=4, width=64, height=48)
    monkeypatch.setenv(PIXELS_ENV, "3000")
    reason = "64x48 (3,072 pixels) is over the limit of 3,000 pixels per image or frame"
    readers = [video_io.probe, lambda path: video_io._read_file_frames(path, [0], None), media.probe_video]
    if video_pyav.import_av() is not None:
        readers += [video_pyav.probe, lambda path: video_pyav.read_frames(path, [0], None)]
    for read in readers:
        with pytest.raises(Exception, match=re.escape(f"{tmp_path / 'c.mp4'}: {reason}")):
            read(clip)
    monkeypatch.setenv(PIXELS_ENV, "3072")
    assert video_io.probe(clip).width == 64 and media.probe_video(clip).width == 64


def test_prep_reads_image_bytes_only_after_the_header_check(tmp_path, monkeypatch):
    bomb = png_header_bomb(tmp_path / "bomb.png")
    decoded = []
    monkeypatch.setattr(media.cv2, "imdecode", lambda *a: decoded.append(a))
    with pytest.raises(media.MediaError, match="1,000,000,000,000 pixels is over the limit"):
        media.read_image(bomb)
    assert decoded == []

"""PyAV, the optional second video decoder: same pixels, fps and frame count as OpenCV, rotation, the
fallback when OpenCV fails, WAN_VIDEO_DECODER, and unchanged behaviour without PyAV installed."""

from __future__ import annotations

import logging
import sys
from fractions import Fraction

import numpy as np
import pytest

from library.data import video_io, video_pyav
from library.data.video_io import MediaError, VideoDecoderError, decoder_order, probe, read_video_frames

from .conftest import gradient_frame, write_video

# PyAV and OpenCV frames may differ by at most this much per value (of 255): both convert YUV to RGB
# with libswscale and bicubic chroma filtering, but from different FFmpeg builds whose rounding may
# differ. Measured here (opencv-python-headless 5.0, PyAV 18.1 / FFmpeg 8.1): 0 on every clip below.
TOLERANCE = 1
needs_av = pytest.mark.skipif(video_pyav.import_av() is None, reason="PyAV (av) is not installed")


def noisy_frame(width: int, height: int, i: int) -> np.ndarray:
    """A gradient with fixed noise, so chroma subsampling and its filter matter."""
    noise = np.random.default_rng(i).integers(-24, 24, (height, width, 3))
    return np.clip(gradient_frame(width, height, i).astype(int) + noise, 0, 255).astype(np.uint8)


def write_clip(path, codec="ffv1", pix_fmt="yuv420p", size=(64, 48), frames=10, rate=16, rotation=None, pts=None):
    """Write RGB frames with PyAV; `pts` (milliseconds) makes a variable-frame-rate clip."""
    import av

    width, height = size
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=rate)
        stream.width, stream.height, stream.pix_fmt = width, height, pix_fmt
        if rotation is not None:
            if not hasattr(stream, "set_display_rotation"):
                pytest.skip("this PyAV cannot write rotation metadata (set_display_rotation needs PyAV 18)")
            stream.set_display_rotation(rotation)  # counter-clockwise degrees, metadata only
        if pts is not None:
            stream.codec_context.time_base = Fraction(1, 1000)
        for i in range(frames):
            frame = av.VideoFrame.from_ndarray(noisy_frame(width, height, i), format="rgb24")
            if pts is not None:
                frame.pts, frame.time_base = pts[i], Fraction(1, 1000)
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def assert_close(a: np.ndarray, b: np.ndarray) -> None:
    assert a.shape == b.shape and a.dtype == b.dtype == np.uint8
    assert np.abs(a.astype(int) - b.astype(int)).max() <= TOLERANCE


@pytest.fixture(autouse=True)
def default_decoder(monkeypatch):
    monkeypatch.delenv(video_io.DECODER_ENV, raising=False)


def test_without_pyav_everything_is_opencv_as_before(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "av", None)  # `import av` now raises ImportError
    assert video_pyav.import_av() is None and decoder_order() == ("opencv",)
    clip = write_video(tmp_path / "v.mp4", frames=6)
    assert probe(clip).frame_count == 6 and read_video_frames(clip, [0, 5]).shape == (2, 48, 64, 3)
    (tmp_path / "bad.mp4").write_bytes(np.random.default_rng(0).bytes(3000))
    with pytest.raises(MediaError, match=r"bad.mp4: cannot open as a video \(corrupt or unsupported format\)$"):
        read_video_frames(tmp_path / "bad.mp4", [0])

    def opencv_fails(path, indices, target):
        raise MediaError(f"{path}: truncated or corrupt video: decoding stopped at frame 0")

    monkeypatch.setattr(video_io, "_read_file_frames", opencv_fails)  # no PyAV to fall back to
    with pytest.raises(MediaError, match="decoding stopped at frame 0"):
        read_video_frames(clip, [0])
    monkeypatch.setenv(video_io.DECODER_ENV, "pyav")
    with pytest.raises(VideoDecoderError, match=r"WAN_VIDEO_DECODER=pyav needs PyAV.*pip install av"):
        probe(clip)


def test_unknown_decoder_name_is_a_clear_error(monkeypatch):
    monkeypatch.setenv(video_io.DECODER_ENV, "ffmpeg")
    with pytest.raises(VideoDecoderError, match=r"WAN_VIDEO_DECODER='ffmpeg' is not a video decoder; use one of "
                                                 r"opencv, pyav \(or unset it for opencv\)"):
        decoder_order()


@needs_av
@pytest.mark.parametrize("codec, pix_fmt, size", [("ffv1", "bgr0", (64, 48)), ("ffv1", "yuv444p", (64, 48)),
                                                  ("ffv1", "yuv420p", (75, 41)), ("mpeg4", "yuv420p", (64, 48))])
def test_pyav_gives_opencv_frames_fps_and_count(tmp_path, codec, pix_fmt, size):
    clip = write_clip(tmp_path / f"c.{'mkv' if codec == 'ffv1' else 'mp4'}", codec, pix_fmt, size, rate=24)
    assert video_pyav.probe(clip) == video_io._probe_opencv(clip) == video_io.MediaInfo(*size, 10, 24.0)
    indices = [0, 2, 2, 5, 9]
    ours = video_pyav.read_frames(clip, indices, None)
    assert_close(ours, video_io._read_file_frames(clip, indices, None))
    assert_close(video_pyav.read_frames(clip, indices, (32, 32)), video_io._read_file_frames(clip, indices, (32, 32)))
    if pix_fmt == "bgr0":  # RGB stored losslessly: exactly the frames written, in RGB order
        assert (ours == np.stack([noisy_frame(*size, i) for i in indices])).all()
    assert (ours[1] == ours[2]).all()


@needs_av
@pytest.mark.parametrize("rotation", [90, -90, 180])
def test_pyav_turns_rotated_clips_upright_like_opencv(tmp_path, rotation):
    plain = write_clip(tmp_path / "plain.mp4", "mpeg4")
    turned = write_clip(tmp_path / "turned.mp4", "mpeg4", rotation=rotation)  # the same bitstream
    info = video_pyav.probe(turned)
    assert (info.width, info.height) == ((48, 64) if rotation % 180 else (64, 48))
    assert (info.width, info.height) == (video_io._probe_opencv(turned).width, video_io._probe_opencv(turned).height)
    frames = video_pyav.read_frames(turned, [0, 7], None)
    assert (frames == np.rot90(video_pyav.read_frames(plain, [0, 7], None), k=rotation // 90, axes=(1, 2))).all()
    assert_close(frames, video_io._read_file_frames(turned, [0, 7], None))


@needs_av
def test_variable_frame_rate_gets_the_real_average_rate_and_count(tmp_path):
    pts = [0, 40, 80, 200, 240, 400, 440, 480, 700, 1000]  # ms; Matroska states a nominal 16 fps
    clip = write_clip(tmp_path / "vfr.mkv", pts=pts)
    info = video_pyav.probe(clip)
    assert info.frame_count == 10 and 9.3 < info.fps < 9.5  # 10 frames over 1.06 s (last frame lasts 1/16 s)
    assert video_pyav.probe(write_clip(tmp_path / "cfr.mkv")).fps == 16.0  # ms timestamps: rate kept exactly
    assert video_pyav.read_frames(clip, list(range(10)), None).shape == (10, 48, 64, 3)


@needs_av
def test_falls_back_to_pyav_when_opencv_fails(tmp_path, monkeypatch, caplog):
    clip = write_clip(tmp_path / "c.mkv", pix_fmt="yuv444p")
    expected = video_pyav.read_frames(clip, [1, 4], (32, 32))

    def opencv_fails(path, *args):
        raise MediaError(f"{path}: cannot open as a video (corrupt or unsupported format)")

    monkeypatch.setattr(video_io, "_probe_opencv", opencv_fails)
    monkeypatch.setattr(video_io, "_read_file_frames", opencv_fails)
    caplog.set_level(logging.DEBUG, logger="library.data.video_io")
    assert probe(clip) == video_io.MediaInfo(64, 48, 10, 16.0)
    assert (read_video_frames(clip, [1, 4], (32, 32)) == expected).all()
    assert "c.mkv: opencv failed (" in caplog.text and "c.mkv: decoded with pyav" in caplog.text


@needs_av
def test_av1_clip_opencv_cannot_decode_is_read_by_pyav(tmp_path):
    import cv2

    try:
        clip = write_clip(tmp_path / "a.mkv", "libsvtav1")
    except Exception as exc:  # noqa: BLE001 - an av wheel without the SVT-AV1 encoder raises its own types
        pytest.skip(f"cannot write AV1 here: {exc}")
    if cv2.VideoCapture(str(clip)).read()[0]:
        pytest.skip("this OpenCV build decodes AV1; the fallback is covered by "
                    "test_falls_back_to_pyav_when_opencv_fails")
    assert probe(clip).frame_count == 10
    assert (read_video_frames(clip, [0, 9]) == video_pyav.read_frames(clip, [0, 9], None)).all()


@needs_av
def test_wan_video_decoder_pyav_prefers_pyav(tmp_path, monkeypatch):
    clip = write_clip(tmp_path / "c.mkv", pix_fmt="yuv444p")
    monkeypatch.setenv(video_io.DECODER_ENV, "pyav")
    assert decoder_order() == ("pyav", "opencv")

    def must_not_run(*args):
        raise AssertionError("OpenCV was used although PyAV could decode")

    with monkeypatch.context() as patch:
        patch.setattr(video_io, "_read_file_frames", must_not_run)
        assert read_video_frames(clip, [3]).shape == (1, 48, 64, 3)
    (tmp_path / "bad.mp4").write_bytes(np.random.default_rng(0).bytes(3000))
    with pytest.raises(MediaError, match=r"bad.mp4: cannot open as a video \(corrupt or unsupported format: "):
        read_video_frames(tmp_path / "bad.mp4", [0])  # both fail: PyAV's reason, the preferred decoder's
    monkeypatch.delenv(video_io.DECODER_ENV)
    with pytest.raises(MediaError, match=r"bad.mp4: cannot open as a video \(corrupt or unsupported format\)$"):
        read_video_frames(tmp_path / "bad.mp4", [0])  # the default: OpenCV's reason, as before

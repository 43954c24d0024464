"""Media decoding: image formats and modes, EXIF rotation, frame folders, fps resampling, resize + crop."""

from __future__ import annotations

import numpy as np
import pytest

from library.data.video_io import (MediaError, crop_box, load_image, probe, read_video_frames,
                                   resample_indices, resize_and_crop)

from .conftest import gradient_frame, write_video


@pytest.mark.parametrize("suffix", [".png", ".jpg", ".webp"])
def test_image_formats(tmp_path, suffix):
    from PIL import Image

    frame = gradient_frame(64, 48)
    Image.fromarray(frame).save(tmp_path / f"a{suffix}", **({"lossless": True} if suffix == ".webp" else {}))
    image = load_image(tmp_path / f"a{suffix}")
    assert image.shape == (48, 64, 3) and image.dtype == np.uint8
    tolerance = 40 if suffix == ".jpg" else 0
    assert np.abs(image.astype(int) - frame).mean() <= tolerance


def test_grayscale_and_16_bit(tmp_path):
    import cv2
    from PIL import Image

    gray = gradient_frame(32, 24)[:, :, 0]
    Image.fromarray(gray, "L").save(tmp_path / "g.png")
    assert (load_image(tmp_path / "g.png") == gray[:, :, None]).all()
    cv2.imwrite(str(tmp_path / "g16.png"), gray.astype(np.uint16) * 257)  # 16-bit grayscale
    assert np.abs(load_image(tmp_path / "g16.png")[:, :, 0].astype(int) - gray).max() <= 1
    rgb16 = gradient_frame(32, 24).astype(np.uint16) * 257
    cv2.imwrite(str(tmp_path / "c16.png"), rgb16[:, :, ::-1])  # 16-bit RGB
    assert np.abs(load_image(tmp_path / "c16.png").astype(int) - gradient_frame(32, 24)).max() <= 1


def test_alpha_is_composited_on_white(tmp_path):
    from PIL import Image

    rgba = np.zeros((8, 8, 4), np.uint8)
    rgba[:, :4] = (255, 0, 0, 255)  # left half opaque red, right half transparent black
    Image.fromarray(rgba, "RGBA").save(tmp_path / "a.png")
    image = load_image(tmp_path / "a.png")
    assert (image[:, :4] == (255, 0, 0)).all() and (image[:, 4:] == 255).all()


def test_exif_rotation(tmp_path):
    from PIL import Image

    frame = gradient_frame(64, 48)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display
    Image.fromarray(frame).save(tmp_path / "r.jpg", exif=exif, quality=95)
    image = load_image(tmp_path / "r.jpg")
    assert image.shape == (64, 48, 3)
    assert np.abs(image.astype(int) - np.rot90(frame, k=-1)).mean() < 8
    assert (probe(tmp_path / "r.jpg").width, probe(tmp_path / "r.jpg").height) == (48, 64)


def test_bad_images(tmp_path):
    (tmp_path / "zero.png").write_bytes(b"")
    (tmp_path / "text.png").write_text("not an image")
    with pytest.raises(MediaError, match="zero-byte file"):
        load_image(tmp_path / "zero.png")
    with pytest.raises(MediaError, match=r"text.png: not an image \(unreadable as .png\)"):
        probe(tmp_path / "text.png")


def test_video_probe_and_selected_frames(tmp_path):
    path = write_video(tmp_path / "v.mp4", frames=10, fps=24.0)
    info = probe(path)
    assert (info.width, info.height, info.frame_count, info.fps) == (64, 48, 10, 24.0)
    frames = read_video_frames(path, [0, 3, 3, 9])
    assert frames.shape == (4, 48, 64, 3)
    assert (frames[1] == frames[2]).all()
    assert np.abs(frames[0].astype(int) - gradient_frame(64, 48, 0)).mean() < 12  # RGB order, not BGR
    assert read_video_frames(path, [1, 2], (32, 32)).shape == (2, 32, 32, 3)


def test_frame_folder(tmp_path):
    from PIL import Image

    folder = tmp_path / "clip"
    folder.mkdir()
    for i in range(6):
        Image.fromarray(gradient_frame(40, 30, i)).save(folder / f"{i:04d}.png")
    info = probe(folder)
    assert (info.frame_count, info.fps, info.width) == (6, None, 40)
    frames = read_video_frames(folder, [1, 5])
    assert (frames[1] == gradient_frame(40, 30, 5)).all()


def test_resample_indices_keeps_real_speed():
    assert resample_indices(5, 24, 24) == [0, 1, 2, 3, 4]
    assert resample_indices(5, None, 16) == [0, 1, 2, 3, 4]
    down = resample_indices(49, 24, 16)  # 2 s at 24 fps -> 2 s at 16 fps
    assert len(down) == 33 and down[:4] == [0, 1, 3, 4] and down[-1] == 48
    up = resample_indices(9, 8, 16)  # 1 s at 8 fps -> 1 s at 16 fps, frames repeated
    assert len(up) == 17 and up[:4] == [0, 0, 1, 1]
    assert len(resample_indices(300, 30, 16)) == 160


def test_resize_then_centre_crop():
    frame = np.zeros((720, 1280, 3), np.uint8)
    frame[:, 640:] = 255  # right half white
    out = resize_and_crop(frame, (832, 480))
    assert out.shape == (480, 832, 3)
    assert out[:, :400].max() == 0 and out[:, 432:].min() == 255  # centred: the edge stays in the middle
    assert crop_box(1280, 720, (480, 480)) == (280, 0, 720, 720)
    assert resize_and_crop(gradient_frame(20, 10), (40, 40)).shape == (40, 40, 3)  # upscaling covers

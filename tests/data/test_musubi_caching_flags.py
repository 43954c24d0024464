"""The caching tools accept every flag of musubi-tuner's WAN caching scripts and of musubi-tuner-gui's commands.

Flags: kohya-ss/musubi-tuner 30c658c4 `cache_latents.py` (setup_parser_common), `wan_cache_latents.py`
(wan_setup_parser), `cache_text_encoder_outputs.py` and `wan_cache_text_encoder_outputs.py`; the HunyuanVideo
VAE flags (`hv_setup_parser`: --vae_tiling, --vae_chunk_size, --vae_spatial_tile_sample_min_size) that
bmaltais/musubi-tuner-gui 1b5a41ed `lora_gui.py` passes to the WAN latent tool as well. Each is used, logged
as skipped, or an error (exit status 2) naming what to do instead. Also the dataset TOML note where this
trainer reads a musubi-tuner dataset differently (fps resampling without `source_fps`).
"""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from library.data.caching_args import add_vae_flags, common_parser, musubi_flag_problems, vae_tile_size
from library.data.dataset_config import parse_dataset_config

GUI_LATENT_FLAGS = ["--vae_dtype", "float16", "--vae_chunk_size", "32", "--vae_tiling",
                    "--vae_spatial_tile_sample_min_size", "256", "--device", "cpu", "--batch_size", "2",
                    "--num_workers", "1", "--skip_existing", "--keep_cache", "--console_width", "80",
                    "--console_back", "BLACK", "--console_num_images", "4", "--clip", "clip.pth", "--i2v"]


def _latent_parser():
    parser = common_parser("test")
    parser.add_argument("--vae", required=True)
    for flag in ("--vae_dtype", "--clip"):
        parser.add_argument(flag, default=None)
    parser.add_argument("--i2v", action="store_true")
    parser.add_argument("--vae_cache_cpu", action="store_true")
    add_vae_flags(parser)
    return parser


def test_every_gui_latent_flag_parses_and_each_says_what_it_does(caplog):
    caplog.set_level(logging.INFO)
    args = _latent_parser().parse_args(["--dataset_config", "d.toml", "--vae", "v.pth", *GUI_LATENT_FLAGS])
    assert musubi_flag_problems(args) is None
    assert vae_tile_size(args) == 256 and args.batch_size == 2 and args.num_workers == 1
    for text in ("--skip_existing: fresh caches are always reused", "--keep_cache: this tool never deletes",
                 "skipping --console_width, --console_back, --console_num_images", "skipping --vae_chunk_size 32",
                 "VAE tiling: frames larger than 256 px"):
        assert text in caplog.text, text


def test_vae_tiling_alone_means_musubis_256_pixels():
    args = _latent_parser().parse_args(["--dataset_config", "d.toml", "--vae", "v.pth", "--vae_tiling"])
    assert vae_tile_size(args) == 256
    args = _latent_parser().parse_args(["--dataset_config", "d.toml", "--vae", "v.pth"])
    assert vae_tile_size(args) is None


@pytest.mark.parametrize("flags, message", [
    (["--debug_mode", "image"], "tools/check_dataset.py"),
    (["--vae_spatial_tile_sample_min_size", "-8"], "give a tile side in pixels"),
])
def test_what_cannot_be_honoured_is_an_error(flags, message):
    args = _latent_parser().parse_args(["--dataset_config", "d.toml", "--vae", "v.pth", *flags])
    assert message in musubi_flag_problems(args)


def test_the_tools_exit_2_on_such_a_flag(tmp_path, caplog):
    import tools.cache_latents as latents
    import tools.cache_text_encoder_outputs as text

    assert latents.main(["--dataset_config", "d.toml", "--vae", "v.pth", "--debug_mode", "console"]) == 2
    assert text.main(["--dataset_config", "d.toml", "--t5", "t5.pth", "--debug_mode", "console"]) == 2
    assert "--debug_mode console" in caplog.text


def test_fps_resampling_without_source_fps_is_said_at_parse_time(caplog):
    """musubi-tuner takes every frame of a clip without `source_fps`; here a 30 fps clip is resampled to the
    model's fps: said once, with the frame counts, when the dataset TOML is read."""
    caplog.set_level(logging.WARNING)
    data = {"datasets": [{"video_directory": "/v", "cache_directory": "/c1", "target_frames": [1, 33]},
                         {"video_directory": "/w", "cache_directory": "/c2", "target_frames": [33], "source_fps": 30.0},
                         {"image_directory": "/i", "cache_directory": "/c3"}]}
    parse_dataset_config(data, Path("/data/dataset.toml"))
    notes = [r.getMessage() for r in caplog.records if "source_fps" in r.getMessage()]
    assert len(notes) == 1 and "[[datasets]] #0 set no `source_fps`" in notes[0] and "#1" not in notes[0]
    assert "a 33-frame clip filmed at 30 fps gives 17 frames at 16 fps (25 at 24 fps) here, all 33" in notes[0]
    caplog.clear()
    parse_dataset_config({"datasets": [{**data["datasets"][0], "target_fps": 30.0}]}, Path("/data/d.toml"))
    assert "source_fps" not in caplog.text

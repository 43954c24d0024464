"""The dataset TOML: every shipped example parses, inheritance, and each config mistake's message."""

from __future__ import annotations

from pathlib import Path

import pytest

from library.data.dataset_config import DatasetConfigError, load_dataset_config, round_frames

from .conftest import write_toml

EXAMPLES = sorted((Path(__file__).resolve().parents[2] / "dataset_configs").glob("*.toml"))


def test_examples_exist():
    names = {p.stem for p in EXAMPLES}
    assert {"character_images", "style_videos", "motion_videos", "mixed_images_videos"} <= names


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.stem)
def test_every_example_parses(path):
    config = load_dataset_config(path)
    assert config.train, "an example must have a training dataset"
    for spec in config.all:
        assert spec.batch_size >= 1 and spec.resolution[0] >= 256
        assert all((f - 1) % 4 == 0 for f in spec.target_frames)
        assert spec.cache_directory.is_absolute()


def test_example_values_follow_the_guide():
    character = load_dataset_config(EXAMPLES[[p.stem for p in EXAMPLES].index("character_images")])
    assert character.train[0].kind == "image" and character.train[0].resolution == (768, 768)
    assert character.validation[0].is_val and character.validation[0].table == "validation_datasets"
    motion = load_dataset_config(EXAMPLES[[p.stem for p in EXAMPLES].index("motion_videos")])
    assert motion.train[0].frame_extraction == "slide" and motion.train[0].target_frames == (21,)
    assert len(motion.validation) == 1 and motion.validation[0].frame_extraction == "head"


def test_general_inheritance_and_override(tmp_path):
    path = write_toml(tmp_path / "d.toml", """
[general]
resolution = [640, 384]
batch_size = 2
enable_bucket = true
target_frames = [1, 16]
[[datasets]]
image_directory = "imgs"
[[datasets]]
video_directory = "vids"
batch_size = 3
frame_extraction = "slide"
""")
    config = load_dataset_config(path)
    image, video = config.datasets
    assert image.kind == "image" and image.batch_size == 2 and image.resolution == (640, 384)
    assert image.target_frames == (1,)  # images are single frames whatever [general] says
    assert video.batch_size == 3 and video.target_frames == (1, 13) and video.enable_bucket
    assert image.source == (tmp_path / "imgs").resolve() and image.cache_directory == image.source
    assert config.general.batch_size == 2


def test_resolution_int_means_square(tmp_path):
    body = "[general]\nresolution = 512\n[[datasets]]\nimage_directory = 'a'\n"
    config = load_dataset_config(write_toml(tmp_path / "d.toml", body))
    assert config.datasets[0].resolution == (512, 512)


def test_round_frames():
    assert [round_frames(n) for n in (1, 4, 5, 16, 24, 81, 82)] == [1, 1, 5, 13, 21, 81, 81]


def _error(tmp_path, text: str) -> str:
    with pytest.raises(DatasetConfigError) as info:
        load_dataset_config(write_toml(tmp_path / "bad.toml", text))
    return str(info.value)


def test_unknown_key_names_the_closest_key_dataset_and_file(tmp_path):
    message = _error(tmp_path, "[[datasets]]\nimage_directory = 'a'\n"
                               "[[datasets]]\nimage_directory = 'b'\nbatchsize = 2\n")
    assert message == (f"{tmp_path / 'bad.toml'}: [[datasets]] #1: unknown key 'batchsize'; "
                       "did you mean 'batch_size'?")


def test_unknown_key_in_general(tmp_path):
    message = _error(tmp_path, "[general]\nresolutoin = 512\n[[datasets]]\nimage_directory = 'a'\n")
    assert message.endswith("[general]: unknown key 'resolutoin'; did you mean 'resolution'?")


def test_training_key_in_dataset_toml_is_an_error(tmp_path):
    message = _error(tmp_path, "[general]\nmin_timestep = 100\n[[datasets]]\nimage_directory = 'a'\n")
    assert "unknown key 'min_timestep'" in message and "valid keys" in message


def test_dataset_key_in_general_is_misplaced(tmp_path):
    message = _error(tmp_path, "[general]\nimage_directory = 'a'\n[[datasets]]\nimage_directory = 'a'\n")
    assert message.endswith("[general]: 'image_directory' belongs in each [[datasets]] table, not in [general]")


def test_video_key_in_image_dataset_is_misplaced(tmp_path):
    message = _error(tmp_path, "[[datasets]]\nimage_directory = 'a'\ntarget_frames = [1, 5]\n")
    assert "[[datasets]] #0: 'target_frames' is a video key but this is an image dataset (image_directory)" in message


def test_top_level_keys(tmp_path):
    assert "unknown top-level key 'dataset'; did you mean 'datasets'?" in _error(
        tmp_path, "[[dataset]]\nimage_directory = 'a'\n")
    assert "'batch_size' is a dataset key: put it in [general]" in _error(
        tmp_path, "batch_size = 1\n[[datasets]]\nimage_directory = 'a'\n")


def test_sources_and_cache_directories(tmp_path):
    assert "give exactly one of" in _error(tmp_path, "[[datasets]]\nimage_directory = 'a'\nvideo_directory = 'b'\n")
    assert "cache_directory is required for a JSONL dataset" in _error(
        tmp_path, "[[datasets]]\nimage_jsonl_file = 'a.jsonl'\n")
    assert "no [[datasets]] table" in _error(tmp_path, "[general]\nbatch_size = 1\n")


def test_two_datasets_sharing_a_cache_directory(tmp_path):
    message = _error(tmp_path, "[[datasets]]\nimage_directory = 'a'\ncache_directory = 'c'\n"
                               "[[validation_datasets]]\nimage_directory = 'b'\ncache_directory = 'c'\n")
    assert message == (f"{tmp_path / 'bad.toml'}: [[validation_datasets]] #0 ({(tmp_path / 'b').resolve()}) and "
                       f"[[datasets]] #0 share the cache directory {(tmp_path / 'c').resolve()}: "
                       "give each dataset its own cache_directory")


@pytest.mark.parametrize("line, expected", [
    ("batch_size = 0", "batch_size = 0 is not valid: expected a positive integer"),
    ("enable_bucket = 1", "enable_bucket = 1 is not valid: expected true or false"),
    ("caption_dropout_rate = 1.5", "expected a number between 0 and 1"),
    ("resolution = [512]", "expected an int >= 16 or [W, H]"),
    ("frame_extraction = 'heads'", "expected one of head, chunk, slide, uniform, full; did you mean 'head'?"),
    ("target_frames = []", "expected a list of positive frame counts"),
    ("source_fps = -3", "expected a positive number"),
])
def test_bad_values(tmp_path, line, expected):
    assert expected in _error(tmp_path, f"[[datasets]]\nvideo_directory = 'v'\n{line}\n")


def test_validation_split(tmp_path):
    config = load_dataset_config(write_toml(tmp_path / "d.toml", """
[[datasets]]
image_directory = "a"
[[datasets]]
image_directory = "b"
is_val = true
[[validation_datasets]]
video_directory = "c"
"""))
    assert [s.source.name for s in config.train] == ["a"]
    assert [s.source.name for s in config.validation] == ["b", "c"]
    assert all(s.is_val for s in config.validation)


def test_not_toml(tmp_path):
    assert "not valid TOML" in _error(tmp_path, "[[datasets]\n")

"""musubi-tuner's sample-prompt syntax, option by option (its `parse_prompt_line` in wan_generate_video.py and
`line_to_prompt_dict` in training/sampling_prompts.py, kohya-ss/musubi-tuner commit 30c658c): each option is
used, or noted once per file when it has no meaning here; no line is lost without a message, and a value
that breaks its rule is an error naming the line."""

from __future__ import annotations

import logging

import pytest

from library.sampling.prompts import PromptError, check_requests, parse_prompt_line, read_prompt_file
from library.wan.variants import get_variant

# option and value -> the SampleRequest field it sets and the value
USED = [
    ("--w 832", "width", 832), ("--h 480", "height", 480), ("--f 81", "frames", 81), ("--d 42", "seed", 42),
    ("--s 20", "steps", 20), ("--l 4.5", "guidance", 4.5), ("--g 6.0", "guidance", 6.0),
    ("--fs 3.0", "flow_shift", 3.0), ("--n blurry, low quality", "negative_prompt", "blurry, low quality"),
    ("--i start.png", "image", "start.png"), ("--W 640", "width", 640),  # options are case-insensitive
    ("--ei end.png", "end_image", "end.png"), ("--of target_index=1,control_index=0", "one_frame",
                                               "target_index=1,control_index=0"),
    ("--ci a.png --ci b.png", "control_images", ("a.png", "b.png")), ("--cn control.mp4", "control", "control.mp4"),
]
# musubi options for features this trainer does not have: the line renders, one note per file
NOTED = [("--cim mask.png", "control image masks (alpha) are not used by WAN one-frame inference"),
         ("--zz 3", "unknown option --zz is ignored")]
# values that break their option's rule -> the error
BAD = [("--w -64", "--w must be a positive number of pixels, got -64"),
       ("--h 0", "--h must be a positive number of pixels, got 0"),
       ("--f 6", "--f must be 1 + 4k frames"), ("--f 0", "--f must be 1 + 4k frames"),
       ("--s 0", "--s must be at least 1 step, got 0"), ("--s many", "--s needs an integer, got 'many'"),
       ("--d -1", "--d must be between 0 and 2**64 - 1"), ("--l nan", "--l must be a finite number"),
       ("--g inf", "--g must be a finite number"), ("--fs 0", "--fs must be greater than 0"),
       ("--fs -2", "--fs must be greater than 0"), ("--w", "--w needs an integer, got ''"),
       ("--i", "--i needs a file path")]


@pytest.mark.parametrize("option,field,value", USED)
def test_used_options(option, field, value):
    request = parse_prompt_line(f"a cat walks --s 3 {option}")
    assert request.prompt == "a cat walks" and getattr(request, field) == value


@pytest.mark.parametrize("option,message", NOTED)
def test_options_without_a_meaning_here_keep_the_line(option, message, tmp_path, caplog):
    path = tmp_path / "prompts.txt"
    path.write_text(f"one {option}\ntwo --w 32 {option}\nthree\n")
    with caplog.at_level(logging.WARNING):
        requests, errors = read_prompt_file(path)
    assert [r.prompt for r in requests] == ["one", "two", "three"] and errors == []
    assert requests[1].width == 32
    notes = [r.getMessage() for r in caplog.records if message in r.getMessage()]
    assert len(notes) == 1 and "(prompts.txt line 1, prompts.txt line 2)" in notes[0]  # once, naming the lines


@pytest.mark.parametrize("option,message", BAD)
def test_bad_values_are_errors_naming_the_line(option, message):
    with pytest.raises(PromptError) as info:
        parse_prompt_line(f"x {option}", "p.txt line 3")
    assert str(info.value).startswith(f"p.txt line 3: {message}")


def test_l_wins_over_g_and_says_so(caplog):
    with caplog.at_level(logging.WARNING):
        assert parse_prompt_line("x --g 7.5 --l 4").guidance == 4.0
    assert "--g and --l both set the CFG scale; --l is used" in caplog.text
    assert parse_prompt_line("x --g 7.5 --l 7.5").guidance == 7.5


def test_musubi_docs_batch_file(tmp_path):
    """The prompt file of musubi-tuner's docs/wan.md (batch mode), as written there."""
    path = tmp_path / "prompts.txt"
    path.write_text("A beautiful sunset over mountains --w 832 --h 480 --f 81 --d 42 --s 20\n"
                    "A busy city street at night --w 480 --h 832 --g 7.5 --n low quality, blurry\n")
    requests, errors = read_prompt_file(path)
    assert errors == []
    assert [(r.width, r.height, r.frames, r.seed, r.steps) for r in requests[:1]] == [(832, 480, 81, 42, 20)]
    assert (requests[1].guidance, requests[1].negative_prompt) == (7.5, "low quality, blurry")


def test_musubi_toml_and_json_prompt_files(tmp_path, caplog):
    """musubi's TOML form: a [prompt] table of shared values with [[prompt.subset]] entries; its keys
    (cfg_scale is the CFG scale and wins over guidance_scale, frame_count, sample_steps, ...)."""
    (tmp_path / "p.toml").write_text(
        '[prompt]\nwidth = 832\nheight = 480\nframe_count = 81\nsample_steps = 20\ncfg_scale = 5.0\n'
        'guidance_scale = 1.0\n\n[[prompt.subset]]\nprompt = "a cat"\nseed = 1\n\n'
        '[[prompt.subset]]\nprompt = "a dog"\nseed = 2\nwidth = 480\nend_image_path = "e.png"\n'
        'control_image_path = "c.png"\n')
    with caplog.at_level(logging.WARNING):
        requests, errors = read_prompt_file(tmp_path / "p.toml")
    assert errors == []
    assert [(r.prompt, r.seed, r.width, r.height, r.frames, r.steps, r.guidance) for r in requests] == [
        ("a cat", 1, 832, 480, 81, 20, 5.0), ("a dog", 2, 480, 480, 81, 20, 5.0)]
    assert requests[1].end_image == "e.png" and requests[0].end_image is None
    (tmp_path / "p.json").write_text('["a fox --w 64 --d 3", {"prompt": "an owl", "frame_count": 6}]')
    requests, errors = read_prompt_file(tmp_path / "p.json")
    assert [(r.prompt, r.width) for r in requests] == [("a fox", 64)]
    assert str(errors[0]).startswith("p.json entry 2: frame_count must be 1 + 4k frames")


def test_checked_against_the_variant_before_models_load(caplog):
    t2v, ti2v, i2v = get_variant("t2v-tiny"), get_variant("ti2v-tiny"), get_variant("i2v-tiny")
    lines = [parse_prompt_line(text, f"p line {i}") for i, text in enumerate(
        ["ok --w 32 --h 48", "odd --w 40", "img --i a.png --w 32"], 1)]
    with caplog.at_level(logging.WARNING):
        good, errors = check_requests(lines, t2v, "p")
    assert [r.prompt for r in good] == ["ok", "img"]
    assert str(errors[0]) == ("p line 2: width 40 is not a multiple of 16 (the VAE stride x the DiT patch of "
                              "t2v-tiny); use 32 or 48")
    assert "start images (--i) are ignored by the text-to-video model t2v-tiny" in caplog.text
    _, errors = check_requests(lines[:1], ti2v)
    assert "height 48 is not a multiple of 32" in str(errors[0]) and "use 32 or 64" in str(errors[0])
    _, errors = check_requests(lines[:1], i2v)
    assert "i2v-tiny is an image-to-video model and needs a start image" in str(errors[0])

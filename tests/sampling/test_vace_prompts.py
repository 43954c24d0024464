"""VACE inputs in prompt lines, prompt files and on the command line: parsed, resolved beside the prompt file,
and noted as ignored by models that are not VACE."""

from __future__ import annotations

import json
import logging

from library.sampling.prompts import check_requests, parse_prompt_line, read_prompt_file
from library.wan.variants import get_variant


def test_prompt_line_options():
    r = parse_prompt_line("a cat --cn c.mp4 --mk m.png --ri a.png,b.png --vs 0.7 --d 3")
    assert (r.control, r.mask, r.references, r.vace_scale, r.seed) == ("c.mp4", "m.png", "a.png,b.png", 0.7, 3)


def test_prompt_file_keys_resolve_beside_the_file(tmp_path):
    for name in ("c.mp4", "m.png", "r.png"):
        (tmp_path / name).write_bytes(b"x")
    path = tmp_path / "p.json"
    path.write_text(json.dumps([{"prompt": "a", "control_path": "c.mp4", "mask_path": "m.png",
                                 "ref_image_path": ["r.png"], "vace_scale": 0.5},
                                {"prompt": "b", "vace_video": "c.mp4", "vace_reference_image": "r.png"}]))
    (a, b), errors = read_prompt_file(path)
    assert not errors
    assert (a.control, a.mask, a.references, a.vace_scale) == (
        str(tmp_path / "c.mp4"), str(tmp_path / "m.png"), str(tmp_path / "r.png"), 0.5)
    assert b.control == str(tmp_path / "c.mp4") and b.references == str(tmp_path / "r.png")


def test_vace_inputs_are_noted_for_other_models(caplog):
    request = parse_prompt_line("a cat --cn c.mp4")
    with caplog.at_level(logging.WARNING):
        good, errors = check_requests([request], get_variant("t2v-tiny"))
    assert good == [request] and not errors
    assert "are for the Fun-Control and VACE models; ignored by t2v-tiny" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        check_requests([request], get_variant("vace-tiny"))
    assert "VACE" not in caplog.text


def test_an_inpaint_end_image_needs_more_than_one_frame():
    request = parse_prompt_line("a cat --i a.png --ei b.png --f 1")
    good, errors = check_requests([request], get_variant("i2v-14B-InP"))
    assert not good and "an end image (--ei) keeps the last frame of a video" in str(errors[0])

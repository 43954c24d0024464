"""tools/prepare_dataset.py against hostile sources: each bad file is dropped with its reason in the report
(from its header: nothing is decoded), every other source is still prepared, and nothing prints a
traceback."""

from __future__ import annotations

import json
import shutil

import pytest

from .conftest import assert_refused, dangling_link, run_tool
from .media import huge_png, png_64x48, png_header_bomb

LIMIT = ("is over the limit of 178,956,970 pixels per image or frame (a decompression bomb, or far larger than "
         "training needs): downscale it, or raise WAN_MAX_IMAGE_PIXELS if it is real")

# name: (make the bad source, environment, its reason after "unreadable: PATH: ")
SOURCES = {
    "PNG header claiming 10^12 pixels": (png_header_bomb, {}, f"1,000,000,000,000 pixels {LIMIT}"),
    "real 30000x30000 PNG": (huge_png, {}, f"900,000,000 pixels {LIMIT}"),
    "dangling link": (dangling_link, {}, "a symbolic link to {raw}/deleted_original.png, which does not exist"),
    "limit lowered by the environment": (
        png_64x48, {"WAN_MAX_IMAGE_PIXELS": "2000"},
        "64x48 (3,072 pixels) is over the limit of 2,000 pixels per image or frame (a decompression bomb, or far "
        "larger than training needs): downscale it, or raise WAN_MAX_IMAGE_PIXELS if it is real"),
}


@pytest.fixture(scope="module")
def prepared(demo_source, tmp_path_factory):
    """run(env) -> (raw folder, result, report.json items by source): one run per environment over two good
    clips, one good image and every bad source of SOURCES with that environment (named after its case)."""
    done = {}

    def run(env: dict):
        key = tuple(sorted(env.items()))
        if key not in done:
            folder = tmp_path_factory.mktemp("prepare")
            raw = folder / "raw"
            shutil.copytree(demo_source / "videos", raw)
            shutil.copy(demo_source / "images" / "img_000.png", raw)
            for case, (make, case_env, _) in SOURCES.items():
                if case_env == env:
                    make(raw / _bad_name(case))
            result = run_tool("prepare_dataset", raw, "--output_dir", folder / "out", "--resolution", "32",
                              "--frames", "5", "--quiet", env=env)
            report = json.loads((folder / "out" / "report.json").read_text())
            done[key] = raw, result, {entry["source"]: entry for entry in report["items"]}
        return done[key]
    return run


def _bad_name(case: str) -> str:
    return case.replace(" ", "_").replace("^", "") + ".png"


@pytest.mark.parametrize("case", SOURCES, ids=list(SOURCES))
def test_a_bad_source_is_dropped_with_its_reason(prepared, case):
    _, env, reason = SOURCES[case]
    raw, result, entries = prepared(env)
    bad = raw / _bad_name(case)
    message = f"{bad}: {reason.format(raw=raw)}"
    assert_refused(result, message, status=0)
    assert entries[str(bad)]["reasons"] == [f"unreadable: {message}"]
    good = [entries[str(raw / name)] for name in ("clip_000.mp4", "clip_001.mp4", "img_000.png")]
    assert all(entry["kind"] != "source" for entry in good)  # each still analysed into items


# name: (flags, what the command says; a first entry that is no flag replaces the input folder); each stops
# before anything is read or written
FLAGS = {
    "resolution not a multiple of 16": (
        ["--resolution", "500"], "error: --resolution 500 is not a multiple of 16, the bucket step of the WAN 2.1 VAE "
                                 "(32 for the WAN 2.2 VAE of ti2v-5B); use 496 or 512"),
    "resolution not a multiple of ti2v-5B's 32": (
        ["--resolution", "528", "--task", "ti2v-5B"],
        "error: --resolution 528 is not a multiple of 32, the bucket step of ti2v-5B; use 512 or 544"),
    "frames not 1 + 4k": (["--frames", "16"], "error: clip frames 16 is not 1 + 4k (WAN's VAE needs it); use 13 or 17"),
    "batch size 0": (["--batch_size", "0"], "error: argument --batch_size: '0' must be 1 or more"),
    "negative keep_best": (["--keep_best", "-3"], "error: argument --keep_best: '-3' must be 0 or more"),
    "fps not a number": (["--target_fps", "nan"], "error: argument --target_fps: 'nan' must be a finite number"),
    "no input folder": (["{tmp}/nowhere"], "error: input {tmp}/nowhere does not exist; pass folders of raw images "
                                          "and videos"),
    "unknown task": (["--task", "t2v-A15B"], "error: unknown WAN task 't2v-A15B'; valid tasks: "),
    "output folder is a file": (["--output_dir", "{tmp}/raw/img_000.png"],
                                "error: {tmp}/raw/img_000.png: already exists and is not a folder (a folder is needed "
                                "there); move it away or choose another path"),
}


@pytest.mark.parametrize("case", FLAGS, ids=list(FLAGS))
def test_bad_flags_are_refused(demo_source, tmp_path, case):
    flags, message = FLAGS[case]
    shutil.copytree(demo_source / "images", tmp_path / "raw")
    flags = [flag.format(tmp=tmp_path) for flag in flags]
    inputs = [flags.pop(0)] if not flags[0].startswith("--") else [tmp_path / "raw"]  # an input of its own
    result = run_tool("prepare_dataset", *inputs, "--output_dir", tmp_path / "out", *flags, "--quiet")
    assert_refused(result, message.format(tmp=tmp_path))
    assert not (tmp_path / "out").exists()

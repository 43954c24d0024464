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


@pytest.mark.parametrize("case", SOURCES, ids=list(SOURCES))
def test_a_bad_source_is_dropped_with_its_reason(demo_source, tmp_path, case):
    make, env, reason = SOURCES[case]
    raw = tmp_path / "raw"
    shutil.copytree(demo_source / "videos", raw)  # two good clips
    shutil.copy(demo_source / "images" / "img_000.png", raw)
    bad = raw / "bad.png"
    make(bad)
    result = run_tool("prepare_dataset", raw, "--output_dir", tmp_path / "out", "--resolution", "32", "--frames",
                      "5", "--quiet", env=env)
    message = f"{bad}: {reason.format(raw=raw)}"
    assert_refused(result, message, status=0)
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    entries = {entry["source"]: entry for entry in report["items"]}
    assert entries[str(bad)]["reasons"] == [f"unreadable: {message}"]
    others = [entry for source, entry in entries.items() if source != str(bad)]
    assert {entry["source"] for entry in others} == {str(raw / n) for n in ("clip_000.mp4", "clip_001.mp4", "img_000.png")}
    assert all(entry["kind"] != "source" for entry in others)  # each analysed into items

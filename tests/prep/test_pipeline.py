"""The whole preparation run: filters, clips, layout, TOML, report, idempotent reruns and the CLI."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import tomllib
from dataclasses import replace
from pathlib import Path

import cv2
import pytest

from library.prep.media import iter_frames, write_image
from library.prep.pipeline import PrepConfig, prepare_dataset
from library.prep.synthetic import make_image
from tests.prep.raw_media import IMAGES, SETTINGS, VIDEOS

REPO = Path(__file__).resolve().parents[2]
EXPECTED_DROP = {
    "shaky.mkv": "camera shake",
    "lighting_jump.mkv": "lighting change",
    "overlay.mkv": "static overlay",
    "motion_blur.mkv": "motion blur",
    "too_short.mkv": "too short",
    "blurred.png": "blur",
    "noisy.png": "noise",
    "jpeg_blocks.png": "compression artefacts",
    "clean_photo_copy.png": "near-duplicate",
    "broken.png": "unreadable",
}
EXPECTED_KEPT = {"clean_pan.mkv": 2, "hard_cut.mkv": 2, "letterboxed.mkv": 1, "clean_photo.png": 1}


def by_source(items):
    grouped = {}
    for item in items:
        grouped.setdefault(Path(item["source"]).name, []).append(item)
    return grouped


def tree_digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha1(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_each_defect_is_dropped_with_its_reason(prepared):
    _, result = prepared
    grouped = by_source(result.items)
    for name, label in EXPECTED_DROP.items():
        for item in grouped[name]:
            assert not item["kept"], name
            assert label in [r.split(":")[0] for r in item["reasons"]], (name, item["reasons"])


def test_clean_samples_pass_every_filter(prepared):
    _, result = prepared
    grouped = by_source(result.items)
    for name, count in EXPECTED_KEPT.items():
        assert [item["kept"] for item in grouped[name]] == [True] * count, grouped[name]
        assert all(item["reasons"] == [] for item in grouped[name])


def test_no_kept_clip_spans_the_hard_cut(prepared):
    _, result = prepared
    clips = by_source(result.items)["hard_cut.mkv"]
    assert clips[0]["cuts"] == [VIDEOS["hard_cut.mkv"].cut_at]
    for clip in clips:
        assert not clip["indices"][0] < 30 <= clip["indices"][-1]
        assert len(clip["indices"]) == SETTINGS.frames


def test_outputs_are_in_the_guide_layout(prepared):
    config, result = prepared
    out = config.output_dir
    kept = [i for i in result.items if i["kept"]]
    assert sorted(p.name for p in (out / "images").iterdir()) == ["photos__clean_photo.png"]
    assert len(list((out / "videos").iterdir())) == sum(1 for i in kept if i["kind"] == "clip") == 5
    frames = [f for _, f in iter_frames(out / "videos" / "clips__hard_cut_c001.mp4")]
    assert len(frames) == 17 and frames[0].shape == (64, 64, 3)
    assert cv2.VideoCapture(str(out / "videos" / "clips__hard_cut_c001.mp4")).get(cv2.CAP_PROP_FPS) == 24
    assert (out / "captions" / "photos__clean_photo.txt").read_text() == "a colourful abstract still life\n"


def test_letterbox_bars_are_cropped_from_the_output(prepared):
    config, result = prepared
    item = by_source(result.items)["letterboxed.mkv"][0]
    assert item["crop"][1] >= 12 and item["crop"][3] <= 96 - 12
    frames = [f for _, f in iter_frames(config.output_dir / item["output"])]
    grey = cv2.cvtColor(frames[0], cv2.COLOR_BGR2GRAY)
    assert grey[0].mean() > 30 and grey[-1].mean() > 30  # no black bar left at top or bottom


def test_dataset_toml_uses_the_musubi_schema(prepared):
    config, _ = prepared
    toml = tomllib.loads((config.output_dir / "dataset.toml").read_text())
    assert toml["general"]["resolution"] == [64, 64]
    assert toml["general"]["caption_extension"] == ".txt"
    assert {"batch_size", "enable_bucket"} <= set(toml["general"])
    images, videos = toml["datasets"]
    assert Path(images["image_directory"]) == (config.output_dir / "images").resolve()
    assert Path(videos["video_directory"]) == (config.output_dir / "videos").resolve()
    assert videos["target_frames"] == [17] and videos["frame_extraction"] == "head"
    assert videos["source_fps"] == 24.0
    assert images["cache_directory"] != videos["cache_directory"]


def test_dataset_toml_loads_with_the_trainers_dataset_parser(prepared):
    dataset_config = pytest.importorskip("library.data.dataset_config")
    config, _ = prepared
    parsed = dataset_config.load_dataset_config(config.output_dir / "dataset.toml")
    assert [spec.kind for spec in parsed.datasets] == ["image", "video"]
    assert parsed.datasets[1].target_frames == (17,)


def test_report_lists_every_input_worst_first(prepared, raw_dir):
    config, result = prepared
    report = json.loads((config.output_dir / "report.json").read_text())
    inputs = {p.name for p in raw_dir.rglob("*") if p.suffix in (".mkv", ".png")}
    assert inputs == set(VIDEOS) | set(IMAGES) | {"broken.png"}
    assert {Path(i["source"]).name for i in report["items"]} == inputs
    decisions = [i["kept"] for i in report["items"]]
    assert decisions == sorted(decisions)  # dropped first
    kept_scores = [i["score"] for i in report["items"] if i["kept"]]
    assert kept_scores == sorted(kept_scores)
    assert report["summary"]["kept"] == 6 and report["summary"]["sources"] == len(inputs)
    html = (config.output_dir / "report.html").read_text()
    assert html.count("data:image/jpeg;base64,") == sum(1 for i in result.items if i.get("thumb"))
    for name in inputs:
        assert name in html
    assert "camera shake: shake" in html and "http" not in html  # self-contained


def test_rerun_is_idempotent_and_skips_work(raw_dir, tmp_path):
    config = PrepConfig(inputs=(raw_dir,), output_dir=tmp_path / "out", analysis=SETTINGS, progress=False)
    first = prepare_dataset(config)
    before = tree_digest(config.output_dir)
    second = prepare_dataset(config)
    assert (second.analysed, second.written, second.removed) == (0, 0, 0)
    assert second.reused == first.analysed == 14
    assert tree_digest(config.output_dir) == before


def test_changed_source_and_thresholds(fresh_copy, tmp_path):
    config = PrepConfig(inputs=(fresh_copy,), output_dir=tmp_path / "out", analysis=SETTINGS, progress=False)
    prepare_dataset(config)
    (tmp_path / "out" / "captions" / "clips__clean_pan_c000.txt").write_text("hand-written caption\n")
    # The kept photo becomes blurred: it is analysed again, dropped, and its near-duplicate takes its place.
    write_image(fresh_copy / "photos" / "clean_photo.png", make_image(seed=8, blur_sigma=3.0))
    result = prepare_dataset(config)
    assert result.analysed == 1 and result.reused == 13
    images = sorted(p.name for p in (tmp_path / "out" / "images").iterdir())
    assert images == ["photos__clean_photo_copy.png"]
    # Only thresholds change: nothing is analysed, the items no longer kept are deleted.
    result = prepare_dataset(replace(config, keep_best=2))
    kept = [i for i in result.items if i["kept"]]
    assert result.analysed == 0 and len(kept) == 2 and result.removed == 4
    on_disk = [p.name for folder in ("images", "videos") for p in (tmp_path / "out" / folder).iterdir()]
    assert sorted(on_disk) == sorted(Path(i["output"]).name for i in kept)
    contenders = [i for i in result.items if i["kept"] or any(r.startswith("keep_best") for r in i["reasons"])]
    ranked = sorted(contenders, key=lambda i: -i["score"])
    assert [i["kept"] for i in ranked] == [True, True] + [False] * (len(ranked) - 2)
    assert (tmp_path / "out" / "captions" / "clips__clean_pan_c000.txt").read_text() == "hand-written caption\n"


def test_skipped_filter_keeps_the_item(raw_dir, tmp_path):
    config = PrepConfig(inputs=(raw_dir / "clips" / "shaky.mkv",), output_dir=tmp_path / "out", analysis=SETTINGS,
                        progress=False, disabled_filters=("shake",))
    result = prepare_dataset(config)
    assert [i["kept"] for i in result.items] == [True]


def test_cli_png_frames_and_keep_aspect(raw_dir, tmp_path):
    out = tmp_path / "out"
    relative = os.path.relpath(raw_dir / "clips", tmp_path)  # relative paths work too
    cmd = [sys.executable, str(REPO / "tools" / "prepare_dataset.py"), relative, "--output_dir", "out",
           "--resolution", "80", "--keep_aspect", "--video_format", "png", "--quiet"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "kept 5" in done.stdout
    folder = out / "videos" / "hard_cut_c000"  # names are relative to the input folder
    pngs = sorted(folder.glob("*.png"))
    assert len(pngs) == 17 and cv2.imread(str(pngs[0])).shape == (64, 96, 3)
    assert tomllib.loads((out / "dataset.toml").read_text())["general"]["enable_bucket"] is True


def test_cli_rejects_bad_frame_count_and_missing_input(tmp_path):
    tool = str(REPO / "tools" / "prepare_dataset.py")
    done = subprocess.run([sys.executable, tool, str(tmp_path), "--output_dir", str(tmp_path / "o"), "--frames", "16"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "16 is not 1 + 4k" in done.stderr
    done = subprocess.run([sys.executable, tool, str(tmp_path / "nope"), "--output_dir", str(tmp_path / "o")],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "does not exist" in done.stderr


def test_empty_input_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no images or videos"):
        prepare_dataset(PrepConfig(inputs=(tmp_path,), output_dir=tmp_path / "out", progress=False))


def test_clips_are_the_selected_source_frames_losslessly(tmp_path):
    """A 30 fps source becomes 24 fps by frame selection; mkv output is FFV1, so pixels can be compared."""
    from library.prep.scenes import selection_offsets
    from library.prep.standardize import resize_cover
    from library.prep.synthetic import ClipSpec, make_clip, write_lossless_video

    source = make_clip(ClipSpec(frames=30, seed=21))
    write_lossless_video(tmp_path / "raw" / "pan30.mkv", source, fps=30.0)
    config = PrepConfig(inputs=(tmp_path / "raw",), output_dir=tmp_path / "out", analysis=SETTINGS,
                        video_format="mkv", progress=False)
    result = prepare_dataset(config)
    (clip,) = result.items
    assert clip["indices"] == list(selection_offsets(17, 30.0, 24.0)) and clip["indices"][-1] == 20
    written = [f for _, f in iter_frames(tmp_path / "out" / clip["output"])]
    assert len(written) == 17
    for frame, index in zip(written, clip["indices"]):
        assert (frame == resize_cover(source[index], 64, 64)).all()
    # An output-only option rewrites the clip without analysing the source again.
    result = prepare_dataset(replace(config, color_normalize=True))
    assert (result.analysed, result.written) == (0, 1)
    assert not (next(iter_frames(tmp_path / "out" / clip["output"]))[1] == written[0]).all()


def test_output_inside_the_input_folder_is_not_read_back(fresh_copy):
    config = PrepConfig(inputs=(fresh_copy / "photos",), output_dir=fresh_copy / "photos" / "prepared",
                        analysis=SETTINGS, progress=False)
    first = prepare_dataset(config)
    second = prepare_dataset(config)
    assert len(first.items) == len(second.items) == len(IMAGES) + 1
    assert (second.analysed, second.written) == (0, 0)


def test_cli_arguments_map_onto_the_config(tmp_path):
    import importlib.util

    spec = importlib.util.spec_from_file_location("prepare_dataset_tool", REPO / "tools" / "prepare_dataset.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    args = tool.build_parser().parse_args([str(tmp_path), "--output_dir", str(tmp_path / "o"), "--task", "t2v-A14B",
                                           "--frames", "21", "--min_sharpness", "10", "--skip_filters", "shake",
                                           "overlay", "--keep_best", "300", "--keep_aspect"])
    config = tool.config_from_args(args)
    assert config.analysis.target_fps == 16.0 and config.analysis.frames == 21 and not config.analysis.square
    assert config.thresholds.min_sharpness == 10.0 and config.thresholds.max_shake == 0.6
    assert config.disabled_filters == ("shake", "overlay") and config.keep_best == 300
    args = tool.build_parser().parse_args([str(tmp_path), "--output_dir", "o", "--task", "ti2v-5B",
                                           "--target_fps", "30"])
    assert tool.config_from_args(args).analysis.target_fps == 30.0

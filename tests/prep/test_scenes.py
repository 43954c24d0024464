"""Cut detection and clip windows: clips never span a cut; a lighting jump is not a cut; fps by selection."""

from __future__ import annotations

import pytest

from library.prep.scenes import SceneClipper, check_frame_count, selection_offsets
from library.prep.synthetic import ClipSpec, make_clip


def run_clipper(video, **kwargs):
    clipper = SceneClipper(**{"frames": 9, "source_fps": 24.0, "target_fps": 24.0, **kwargs})
    windows = []
    for index, frame in enumerate(video):
        windows += clipper.push(index, frame)
    return clipper, windows + clipper.finish(len(video) - 1)


def test_hard_cut_is_found_and_never_inside_a_clip():
    frames = make_clip(ClipSpec(frames=60, seed=2, cut_at=27))
    clipper, windows = run_clipper(frames)
    assert clipper.cuts == [27]
    assert windows, "clips on both sides of the cut"
    for window in windows:
        assert not (window.start < 27 <= window.end), window
    assert any(w.end < 27 for w in windows) and any(w.start > 27 for w in windows)
    assert all(w.start >= 27 + clipper.margin for w in windows if w.start > 27)


@pytest.mark.parametrize("defect", [dict(light_jump_at=20), dict(jitter=3.0), dict(pan=(3.0, 1.0)), {}])
def test_no_false_cuts(defect):
    clipper, windows = run_clipper(make_clip(ClipSpec(frames=40, seed=4, **defect)))
    assert clipper.cuts == []
    assert [w.start for w in windows] == [0, 9, 18, 27]


def test_frame_selection_resamples_to_target_fps():
    assert selection_offsets(5, 24.0, 24.0) == (0, 1, 2, 3, 4)
    assert selection_offsets(5, 30.0, 24.0) == (0, 1, 3, 4, 5)  # every 1.25 source frames
    assert selection_offsets(5, 48.0, 24.0) == (0, 2, 4, 6, 8)
    assert selection_offsets(5, 12.0, 24.0) == (0, 1, 1, 2, 2)  # a slower source repeats frames
    clipper, windows = run_clipper(make_clip(ClipSpec(frames=30, seed=1)), frames=17, source_fps=30.0)
    assert len(windows) == 1 and windows[0].indices[-1] == 20 and len(windows[0].indices) == 17


def test_gap_and_max_clips():
    frames = make_clip(ClipSpec(frames=40, seed=1))
    _, windows = run_clipper(frames, gap=3, max_clips=2)
    assert [w.start for w in windows] == [0, 12]


def test_frame_count_must_be_one_plus_4k():
    check_frame_count(17)
    check_frame_count(21)
    with pytest.raises(ValueError, match="16 is not 1 \\+ 4k.*use 13 or 17"):
        check_frame_count(16)

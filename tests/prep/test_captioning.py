"""Captioning plumbing with tiny random-weight BLIP, BLIP-2 and Qwen2.5-VL models saved to local folders."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from library.prep.caption_files import caption_media, caption_path_for, compose, find_media, load_sample
from library.prep.captioning import VIDEO_INSTRUCTION, detect_family, load_captioner
from library.prep.media import write_clip, write_image
from library.prep.synthetic import ClipSpec, make_clip, make_image
from tests.prep import tiny_captioners

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("captioners")
    return {
        "blip": tiny_captioners.build_tiny_blip(root / "blip"),
        "blip2": tiny_captioners.build_tiny_blip2(root / "blip2"),
        "qwen2_5_vl": tiny_captioners.build_tiny_qwen2_5_vl(root / "qwen"),
    }


@pytest.fixture
def dataset(tmp_path):
    """The guide's layout: two images, an mp4 clip, a PNG-frame clip, one existing caption."""
    root = tmp_path / "training_dataset"
    write_image(root / "images" / "001.png", make_image(seed=1))
    write_image(root / "images" / "002.png", make_image(seed=2))
    write_clip(root / "videos" / "003.mp4", make_clip(ClipSpec(frames=9, seed=3)), fps=24)
    write_clip(root / "videos" / "004", make_clip(ClipSpec(frames=9, seed=4)), fps=24)
    (root / "captions").mkdir()
    (root / "captions" / "001.txt").write_text("a woman in a red coat\n")
    return root


class CountingCaptioner:
    """Wraps a captioner and records what it was asked to caption."""

    def __init__(self, inner):
        self.inner, self.calls = inner, []

    def caption(self, samples):
        self.calls.append([s.kind for s in samples])
        return self.inner.caption(samples)


def captions(root: Path) -> dict[str, str]:
    return {p.stem: p.read_text() for p in sorted((root / "captions").glob("*.txt"))}


def test_layout_and_sampling(dataset):
    media = find_media([dataset])
    assert [p.name for p in media] == ["001.png", "002.png", "003.mp4", "004"]
    assert caption_path_for(media[2]) == dataset / "captions" / "003.txt"
    loose = dataset / "images" / "001.png"
    assert caption_path_for(loose.rename(dataset / "loose.png")) == dataset / "loose.txt"
    sample = load_sample(dataset / "videos" / "003.mp4", frames=4)
    assert sample.kind == "video" and len(sample.frames) == 4 and sample.frames[0].size == (96, 64)
    assert len(load_sample(dataset / "videos" / "004", frames=4).frames) == 4


def test_compose_modes_trigger_and_prefix():
    assert compose("a cat runs", "", "overwrite", trigger="sks") == "sks, a cat runs"
    assert compose("a cat runs", "old", "overwrite") == "a cat runs"
    assert compose("a cat runs", "sks, a cat", "append", trigger="sks") == "sks, a cat, a cat runs"
    assert compose("runs", "", "overwrite", prefix="watercolor animation of a cat") == \
        "watercolor animation of a cat runs"


def test_families_are_read_from_config(models, tmp_path):
    for family, folder in models.items():
        assert detect_family(str(folder)) == family
    with pytest.raises(ValueError, match="no config.json"):
        detect_family(str(tmp_path))


def test_blip_overwrite_with_trigger_batched(models, dataset):
    captioner = CountingCaptioner(load_captioner(str(models["blip"]), max_new_tokens=6))
    stats = caption_media(find_media([dataset]), captioner, mode="overwrite", trigger="sks", batch_size=2,
                          frames=3, progress=False)
    assert (stats.written, stats.skipped) == (4, 0)
    assert captioner.calls == [["image", "image"], ["video", "video"]]
    written = captions(dataset)
    assert sorted(written) == ["001", "002", "003", "004"]
    assert all(text.startswith("sks, ") and text.endswith("\n") for text in written.values())
    assert "red coat" not in written["001"]


def test_skip_existing_leaves_captions_and_skips_the_model(models, dataset):
    captioner = CountingCaptioner(load_captioner(str(models["blip"]), max_new_tokens=6))
    stats = caption_media(find_media([dataset]), captioner, mode="skip_existing", batch_size=8, progress=False)
    assert (stats.written, stats.skipped) == (3, 1)
    assert captioner.calls == [["image"], ["video", "video"]]
    assert captions(dataset)["001"] == "a woman in a red coat\n"


def test_blip2_append_keeps_the_hand_written_part(models, dataset):
    captioner = load_captioner(str(models["blip2"]), max_new_tokens=5, prompt="Question: what is shown? Answer:")
    caption_media(find_media([dataset]), captioner, mode="append", batch_size=4, progress=False)
    written = captions(dataset)
    assert written["001"].startswith("a woman in a red coat, ") and len(written["001"]) > 25
    assert not any(text.startswith("Question") for text in written.values())  # the prompt is not echoed


def test_qwen2_5_vl_images_and_clips(models, dataset):
    captioner = load_captioner(str(models["qwen2_5_vl"]), max_new_tokens=5)
    samples = [load_sample(dataset / "images" / "002.png"), load_sample(dataset / "videos" / "003.mp4", frames=3)]
    prompt = captioner._prompt(samples[1], [6, 6, 6])
    assert prompt.count("<|vision_start|>") == 3 and prompt.count("<|image_pad|>") == 18
    assert VIDEO_INSTRUCTION in prompt
    texts = captioner.caption(samples)
    assert len(texts) == 2 and all(isinstance(t, str) for t in texts)
    stats = caption_media(find_media([dataset]), captioner, mode="overwrite", trigger="sks", batch_size=2,
                          frames=2, progress=False)
    assert stats.written == 4 and all(t.startswith("sks") for t in captions(dataset).values())


def test_cli_captions_a_dataset(models, dataset):
    tool = str(REPO / "tools" / "caption.py")
    done = subprocess.run([sys.executable, tool, str(dataset), "--model", str(models["blip"]), "--trigger", "ohwx",
                           "--max_new_tokens", "4", "--quiet"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "3 captions written, 1 kept as they were" in done.stdout
    assert captions(dataset)["002"].startswith("ohwx, ")
    done = subprocess.run([sys.executable, tool, str(dataset), "--model", str(dataset)], capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 2 and "no config.json" in done.stderr

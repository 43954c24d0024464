"""musubi-tuner's t2i-14B (text-to-image training of the WAN 2.1 14B model) on its tiny twin: images cached,
a LoRA trained, an image generated with it; videos and multi-frame requests are clear errors."""

from __future__ import annotations

import pytest

from library.wan.variants import get_variant
from tests.tasks.e2e import assert_comfyui_loads, cache, entry, generate, one_thread, train  # noqa: F401

TASK = "t2i-tiny"


def test_t2i_variant_is_the_t2v_14b_model():
    t2i, t2v = get_variant("t2i-14B"), get_variant("t2v-14B")
    assert t2i.shape_signature() == t2v.shape_signature() and t2i.images_only and t2i.num_frames == 1


def test_images_train_and_render(tmp_path, caplog):
    from library.prep.demo_dataset import write_demo_dataset
    from library.wan.tiny import write_tiny_model_set

    models = write_tiny_model_set(tmp_path / "models", TASK)
    toml = write_demo_dataset(tmp_path / "data", clips=1, images=2, width=32, height=32, frames=9)
    text = toml.read_text()
    images_only = tmp_path / "data" / "images.toml"
    images_only.write_text(text[: text.index("[[datasets]]")] + text[text.rindex("[[datasets]]"):])  # the stills
    cache(models, toml, TASK)
    with pytest.raises(ValueError, match="trains text-to-image on single frames; this dataset has multi-frame clips"):
        train(models, toml, TASK, tmp_path / "bad")
    lora = train(models, images_only, TASK, tmp_path / "out")
    assert_comfyui_loads(lora, TASK)
    sidecar = generate(models, TASK, tmp_path / "gen", lora)
    assert sidecar["settings"]["frames"] == 1 and sidecar["settings"]["task"] == TASK
    assert entry("generate_video_wan.py")(["--task", TASK, "--dit", str(models.dit), "--vae", str(models.vae),
                                          "--t5", str(models.t5), "--prompt", "a cat", "--video_length", "5"]) == 2
    assert "is text-to-image: it renders single images (frames 1, not 5)" in caplog.text

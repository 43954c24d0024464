"""WAN 2.1 I2V end to end on the tiny model: latents + image latents + CLIP tokens cached, two training steps
whose loss depends on the cached `clip_fea`, and a LoRA that holds the image cross-attention (k_img / v_img)."""

from __future__ import annotations

import pytest
import torch
from safetensors import safe_open

from library.config import config_from_dict, validate
from library.training.trainer import Trainer

TASK = "i2v-tiny-2.1"


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models run fastest on one thread (intra-op threads only add overhead on a busy machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """The tiny 2.1 I2V model set (with its CLIP file) and two cached 9-frame clips."""
    from library.data.dataset_config import load_dataset_config
    from library.data.latent_caching import cache_latents
    from library.data.text_caching import cache_text_encoder_outputs
    from library.prep.demo_dataset import write_demo_dataset
    from library.wan.tiny import write_tiny_model_set

    root = tmp_path_factory.mktemp("i2v21")
    models = write_tiny_model_set(root / "models", TASK)
    toml = write_demo_dataset(root / "data", clips=2, images=0, width=32, height=32, frames=9)
    text = toml.read_text()
    toml.write_text(text[: text.rindex("[[datasets]]")])  # clips only: I2V needs a first frame to condition on
    config = load_dataset_config(toml)
    summary = cache_latents(config, models.vae, task=TASK, clip_path=models.clip, progress=False)
    assert summary.cached == 2 and summary.ok
    cache_text_encoder_outputs(config, models.t5, tokenizer=models.tokenizer, dtype=torch.float32, progress=False)
    return {"models": models, "dataset": toml}


def _config(ws, out, **over):
    return validate(config_from_dict({
        "task": TASK, "dit": str(ws["models"].dit), "dataset_config": str(ws["dataset"]), "output_dir": str(out),
        "output_name": "lora", "network_dim": 4, "network_alpha": 4, "learning_rate": 5e-3,
        "optimizer_type": "AdamW", "max_train_steps": 2, "seed": 3, "max_data_loader_n_workers": 0, **over}))


def test_trains_with_cached_clip_tokens_and_saves_image_attention_loras(workspace, tmp_path):
    trainer = Trainer(_config(workspace, tmp_path))
    assert trainer.run() == 0
    with safe_open(str(tmp_path / "lora.safetensors"), "pt") as f:
        keys = list(f.keys())
        ups = {k: f.get_tensor(k) for k in keys if "lora_up" in k}
    for block in range(2):
        for module in ("k_img", "v_img"):
            name = f"lora_unet_blocks_{block}_cross_attn_{module}"
            assert f"{name}.lora_down.weight" in keys and f"{name}.lora_up.weight" in keys
    assert any(t.abs().sum() > 0 for k, t in ups.items() if "_img" in k)  # the image path received gradients


def test_loss_depends_on_the_cached_clip_tokens(workspace, tmp_path):
    """The same batch with its CLIP tokens zeroed gives another loss: clip_fea reaches the model."""
    trainer = Trainer(_config(workspace, tmp_path))
    trainer.setup()
    try:
        batch = next(iter(trainer.data.loader(0)))
        assert batch["clip_fea"].shape == (1, 257, 40)
        expert, pos = trainer.experts[0], (3, 0, 0)
        with torch.no_grad():
            real = trainer.loss(batch, expert, pos, sigma=0.5)
            blank = trainer.loss({**batch, "clip_fea": torch.zeros_like(batch["clip_fea"])}, expert, pos, sigma=0.5)
            with pytest.raises(ValueError, match="needs CLIP image features"):
                trainer.loss({**batch, "clip_fea": None}, expert, pos, sigma=0.5)
        assert torch.isfinite(real) and abs(real.item() - blank.item()) > 1e-6
    finally:
        trainer.cleanup()


def test_samples_during_training_use_the_clip_file(workspace, tmp_path):
    import cv2
    import numpy as np

    m = workspace["models"]
    image = tmp_path / "start.png"
    cv2.imwrite(str(image), np.random.default_rng(0).integers(0, 255, (32, 32, 3), dtype=np.uint8))
    prompts = tmp_path / "prompts.txt"
    prompts.write_text(f"a cat walks --i {image} --w 32 --h 32 --f 5 --s 2 --d 1\n")
    sampling = dict(sample_prompts=str(prompts), sample_at_first=True, vae=str(m.vae), t5=str(m.t5),
                    t5_tokenizer=str(m.tokenizer), max_train_steps=1)
    with pytest.raises(ValueError, match=r"sample_prompts with i2v-tiny-2\.1 \(WAN 2\.1 I2V\) needs `clip`"):
        Trainer(_config(workspace, tmp_path / "no_clip", **sampling)).run()
    assert Trainer(_config(workspace, tmp_path / "out", clip=str(m.clip), **sampling)).run() == 0
    assert sorted(p.suffix for p in (tmp_path / "out" / "sample").iterdir()) == [".json", ".mp4", ".png"]

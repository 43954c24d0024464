"""End-to-end training on tiny models from real caches: saved files and metadata, pinned losses, exact
resume after an interruption, 2-process data parallel = 1 process, non-finite losses, the GUI TOML."""

from __future__ import annotations

import csv
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from library.config import config_from_dict, load_config, validate
from library.training.trainer import NonFiniteLossError, Trainer
from library.wan.variants import get_variant
from tests.helpers import REPO, torchrun


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """Tiny T2V-A14B-style models (two experts) and a cached synthetic dataset of clips and stills."""
    from library.data.dataset_config import load_dataset_config
    from library.data.latent_caching import cache_latents
    from library.data.text_caching import cache_text_encoder_outputs
    from library.prep.demo_dataset import write_demo_dataset
    from library.wan.tiny import write_tiny_model_set

    root = tmp_path_factory.mktemp("train")
    models = write_tiny_model_set(root / "models", "t2v-tiny")
    toml = write_demo_dataset(root / "data", clips=3, images=3, width=32, height=32, frames=9)
    config = load_dataset_config(toml)
    cache_latents(config, models.vae, task="t2v-tiny", progress=False)
    cache_text_encoder_outputs(config, models.t5, tokenizer=models.tokenizer, dtype=torch.float32, progress=False)
    return {"root": root, "models": models, "dataset": toml}


def settings(ws, out: Path, **over) -> dict:
    m = ws["models"]
    return {"task": "t2v-tiny", "dit": str(m.dit), "dit_high_noise": str(m.dit_high_noise),
            "dataset_config": str(ws["dataset"]), "output_dir": str(out), "output_name": "lora",
            "network_dim": 4, "network_alpha": 4, "learning_rate": 5e-3, "optimizer_type": "AdamW",
            "max_train_steps": 8, "seed": 7, "max_data_loader_n_workers": 0, "timestep_sampling": "uniform",
            **over}


def train(ws, out, **over) -> Trainer:
    trainer = Trainer(validate(config_from_dict(settings(ws, out, **over))))
    assert trainer.run() == 0
    return trainer


def losses(out: Path) -> list[float]:
    with open(out / "loss.csv") as f:
        return [float(r["loss"]) for r in csv.DictReader(f) if r["kind"] == "train"]


def lora(path: Path) -> dict[str, torch.Tensor]:
    with safe_open(str(path), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def test_two_experts_train_save_and_carry_metadata(workspace, tmp_path):
    train(workspace, tmp_path, save_every_n_steps=4, save_last_n_steps=1)
    names = sorted(p.name for p in tmp_path.glob("*.safetensors"))
    assert names == ["lora_high_noise-step00000008.safetensors", "lora_high_noise.safetensors",
                     "lora_low_noise-step00000008.safetensors", "lora_low_noise.safetensors"]
    for expert in ("high_noise", "low_noise"):
        path = tmp_path / f"lora_{expert}.safetensors"
        with safe_open(str(path), "pt") as f:
            meta, keys = f.metadata(), list(f.keys())
        assert meta["modelspec.architecture"] == "wan2.2-t2v-tiny/lora" and meta["ss_expert"] == expert
        assert meta["ss_network_dim"] == "4" and meta["ss_steps"] == "8"
        assert json.loads(meta["ss_training_config"])["network_dim"] == 4
        assert meta["ss_num_train_items"] == "6" and meta["ss_total_batch_size"] == "1"  # 3 clips + 3 stills
        assert meta["ss_optimizer"] == "torch.optim.adamw.AdamW" and meta["ss_lr_scheduler"] == "constant"
        assert meta["ss_mixed_precision"] == "no" and meta["ss_max_train_steps"] == "8"
        assert sorted(d["kind"] for d in json.loads(meta["ss_datasets"])) == ["image", "video"]
        assert len(keys) == 2 * 10 * 3  # 2 blocks x 10 Linear targets x (down, up, alpha)
        assert "lora_unet_blocks_0_self_attn_q.lora_down.weight" in keys
        assert any(t.abs().sum() > 0 for k, t in lora(path).items() if "lora_up" in k)  # it trained
    assert (tmp_path / "loss.png").exists() and (tmp_path / "lora_config.toml").exists()
    assert len(losses(tmp_path)) == 8


def test_pinned_losses(workspace, tmp_path):
    """A regression guard on the whole loss computation (data, routing, noise, model, LoRA)."""
    train(workspace, tmp_path, max_train_steps=4)
    got = losses(tmp_path)
    pinned = [PINNED[i] for i in range(4)]
    assert got == pytest.approx(pinned, rel=1e-4), got


PINNED = [1.1532594, 1.2271786, 1.0291859, 1.1022540]


def test_interrupted_and_resumed_run_equals_an_uninterrupted_one(workspace, tmp_path, monkeypatch):
    full = tmp_path / "full"
    train(workspace, full, max_train_steps=8, gradient_accumulation_steps=2)
    part = tmp_path / "part"
    original = Trainer.after_step

    def interrupt_at_5(self, loss, bar):
        original(self, loss, bar)
        if self.state.global_step == 5:
            raise KeyboardInterrupt

    monkeypatch.setattr(Trainer, "after_step", interrupt_at_5)
    trainer = Trainer(validate(config_from_dict(settings(workspace, part, max_train_steps=8,
                                                         gradient_accumulation_steps=2))))
    assert trainer.run() == 130
    monkeypatch.setattr(Trainer, "after_step", original)
    assert (part / "lora-step00000005-state").is_dir()
    train(workspace, part, max_train_steps=8, gradient_accumulation_steps=2, resume="latest")
    assert losses(part) == pytest.approx(losses(full), rel=1e-6)
    for expert in ("high_noise", "low_noise"):
        a, b = lora(full / f"lora_{expert}.safetensors"), lora(part / f"lora_{expert}.safetensors")
        for key in a:
            torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-7)


def test_non_finite_losses_skip_then_stop_with_state(workspace, tmp_path, monkeypatch):
    from library.training import trainer as trainer_module

    monkeypatch.setattr(Trainer, "loss", lambda self, batch, expert, pos: torch.tensor(float("nan")))
    bad = Trainer(validate(config_from_dict(settings(workspace, tmp_path, save_state=True))))
    with pytest.raises(NonFiniteLossError, match=r"^3 non-finite losses \(NaN or infinite\) in a row, the last at "
                                                 r"step 2 on .*(clip_|img_).*saved in .*lora-step00000002-state"):
        bad.run()
    assert (tmp_path / "lora-step00000002-state" / "training_state.pt").is_file()
    assert trainer_module.MAX_BAD_STEPS == 3


def test_gui_toml_parses_and_trains(workspace, tmp_path):
    """A run TOML as musubi-tuner-gui writes it (tests/musubi_gui.py: its writer and defaults), with the GUI
    user's settings for this machine; the GUI's own command lines run in tests/test_musubi_gui.py."""
    from tests.musubi_gui import gui_fields, write_run_toml

    m = workspace["models"]
    prompts = tmp_path / "prompt.txt"
    prompts.write_text("a test prompt --w 32 --h 32 --f 1 --s 2\n")
    fields = gui_fields(
        architecture="wan", task="t2v-A14B", dit=str(m.dit), dit_high_noise=str(m.dit_high_noise), vae=str(m.vae),
        t5=str(m.t5), dataset_config=str(workspace["dataset"]), output_dir=str(tmp_path), max_train_steps=2,
        mixed_precision="no", network_module="networks.lora_wan", sdpa=True, gradient_checkpointing=True,
        sample_prompts=str(prompts), logging_dir=str(tmp_path / "logs"), log_with="tensorboard",
        timestep_boundary=875)
    cfg = validate(load_config(["--config_file", str(write_run_toml(fields)), "--task", "t2v-tiny",
                                "--max_data_loader_n_workers", "0"]))
    assert Trainer(cfg).run() == 0
    assert list(tmp_path.glob("*_high_noise.safetensors")) and list((tmp_path / "logs").rglob("events.*"))


def test_train_script_in_a_subprocess(workspace, tmp_path):
    out = subprocess.run(
        [sys.executable, str(REPO / "train_network_wan.py"), *sum(
            ([f"--{k}", str(v)] for k, v in settings(workspace, tmp_path, max_train_steps=2).items()), []),
         "--save_lora_format", "comfyui"],
        capture_output=True, text=True, timeout=300, cwd=tmp_path,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    keys = lora(tmp_path / "lora_low_noise.safetensors")
    assert "diffusion_model.blocks.0.self_attn.q.lora_A.weight" in keys


@pytest.mark.slow
def test_two_processes_equal_one_on_the_same_global_batch(workspace, tmp_path):
    """gloo on the CPU: 2 processes x batch 1 vs 1 process x batch 2 over the same two items."""
    root = tmp_path / "data2"
    shutil.copytree(workspace["dataset"].parent, root)
    base = workspace["dataset"].read_text().replace(str(workspace["dataset"].parent), str(root))
    images_only = base.split("[[datasets]]")[0] + "[[datasets]]" + base.split("[[datasets]]")[2]
    for name, batch in (("one.toml", 2), ("two.toml", 1)):
        text = images_only.replace("batch_size = 1", f"batch_size = {batch}")
        (root / name).write_text(text)
    for img in sorted((root / "images").iterdir())[2:]:  # keep exactly two items
        img.unlink()
    shutil.rmtree(root / "cache", ignore_errors=True)
    from library.data.dataset_config import load_dataset_config
    from library.data.latent_caching import cache_latents
    from library.data.text_caching import cache_text_encoder_outputs

    m = workspace["models"]
    config = load_dataset_config(root / "one.toml")
    cache_latents(config, m.vae, task="t2v-tiny", progress=False)
    cache_text_encoder_outputs(config, m.t5, tokenizer=m.tokenizer, dtype=torch.float32, progress=False)

    def flags(out, toml):
        # SGD: the update is linear in the gradient, so rounding noise is not amplified as Adam's
        # normalisation amplifies it for near-zero gradients
        s = settings(workspace, out, dataset_config=str(root / toml), max_train_steps=3,
                     optimizer_type="torch.optim.SGD", learning_rate=0.5)
        return sum(([f"--{k}", str(v)] for k, v in s.items()), [])

    single = subprocess.run([sys.executable, str(REPO / "train_network_wan.py"), *flags(tmp_path / "a", "one.toml")],
                            capture_output=True, text=True, timeout=300)
    assert single.returncode == 0, single.stderr[-3000:]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    double = subprocess.run([*torchrun(2), str(REPO / "train_network_wan.py"),
                             *flags(tmp_path / "b", "two.toml")], capture_output=True, text=True, timeout=300, env=env)
    assert double.returncode == 0, double.stderr[-3000:]
    for expert in ("high_noise", "low_noise"):
        a, b = lora(tmp_path / "a" / f"lora_{expert}.safetensors"), lora(tmp_path / "b" / f"lora_{expert}.safetensors")
        for key in a:
            torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-6)


def test_validation_loss_is_fixed_and_logged(workspace, tmp_path):
    from library.data.dataset_config import load_dataset_config
    from library.data.latent_caching import cache_latents
    from library.data.text_caching import cache_text_encoder_outputs

    m, data = workspace["models"], workspace["dataset"].parent
    toml = tmp_path / "with_val.toml"
    toml.write_text(workspace["dataset"].read_text() + (
        "\n[[validation_datasets]]\n"
        f'image_directory = "{(data / "images").as_posix()}"\n'
        f'cache_directory = "{(tmp_path / "val_cache").as_posix()}"\n'))
    config = load_dataset_config(toml)
    cache_latents(config, m.vae, task="t2v-tiny", progress=False)
    cache_text_encoder_outputs(config, m.t5, tokenizer=m.tokenizer, dtype=torch.float32, progress=False)
    trainer = train(workspace, tmp_path / "out", dataset_config=str(toml), validate_every_n_steps=2,
                    max_train_steps=4)
    with open(tmp_path / "out" / "loss.csv") as f:
        val_rows = [r for r in csv.DictReader(f) if r["kind"] == "val"]
    assert [int(r["step"]) for r in val_rows] == [0, 2, 4]  # 0: the baseline, before the first step
    assert trainer.validate() == pytest.approx(trainer.validate())  # same weights, same number
    assert trainer.validate() == pytest.approx(float(val_rows[-1]["loss"]), rel=1e-6)


def test_samples_during_training_do_not_change_the_losses(workspace, tmp_path):
    m = workspace["models"]
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("# samples\na panning shot of shapes --w 32 --h 32 --f 5 --d 3 --s 2\n"
                       "a still image --w 32 --h 32 --f 1 --d 4 --s 2 --l 2.0\n")
    common = dict(max_train_steps=4, network_dropout=0.1)
    train(workspace, tmp_path / "plain", **common)
    train(workspace, tmp_path / "sampled", **common, sample_prompts=str(prompts), sample_every_n_steps=2,
          sample_at_first=True, vae=str(m.vae), t5=str(m.t5), logging_dir=str(tmp_path / "logs"))
    assert losses(tmp_path / "sampled") == losses(tmp_path / "plain")
    names = sorted(p.name for p in (tmp_path / "sampled" / "sample").glob("*.mp4"))
    assert names == [f"lora_step{s:08d}_{i:02d}.mp4" for s in (0, 2, 4) for i in (0, 1)]
    assert list((tmp_path / "logs").rglob("events.*"))


def test_lora_trains_over_an_fp8_base(workspace, tmp_path):
    from library.wan.fp8 import FP8Linear

    trainer = train(workspace, tmp_path, fp8_base=True, fp8_scaled=True, max_train_steps=3)
    model = trainer.experts[0].model
    assert isinstance(model.blocks[0].self_attn.q, FP8Linear)
    assert model.blocks[0].self_attn.q.weight.dtype == torch.float8_e4m3fn
    up = lora(tmp_path / "lora_low_noise.safetensors")["lora_unet_blocks_0_self_attn_q.lora_up.weight"]
    assert up.dtype == torch.float32 and up.abs().sum() > 0  # fp32 LoRA, trained


def test_each_expert_trains_only_on_its_own_timesteps(workspace, tmp_path):
    trainer = Trainer(validate(config_from_dict(settings(workspace, tmp_path, max_train_steps=40,
                                                         timestep_sampling="sigmoid"))))
    trainer.setup()
    seen = {e.name: [] for e in trainer.experts}
    for expert in trainer.experts:
        expert.model.register_forward_pre_hook(
            lambda module, args, name=expert.name: seen[name].extend(args[1].flatten().tolist()))
    trainer.train()
    trainer.cleanup()
    boundary = 875.0  # t2v-tiny, like T2V-A14B
    assert seen["high_noise"] and min(seen["high_noise"]) >= boundary
    assert seen["low_noise"] and max(seen["low_noise"]) < boundary
    # the boundary splits the sigmoid distribution: the high-noise expert gets its share of the steps
    share = len(seen["high_noise"]) / (len(seen["high_noise"]) + len(seen["low_noise"]))
    assert 0.02 < share < 0.5


def _task_workspace(root: Path, task: str, images: int = 0):
    from library.data.dataset_config import load_dataset_config
    from library.data.latent_caching import cache_latents
    from library.data.text_caching import cache_text_encoder_outputs
    from library.prep.demo_dataset import write_demo_dataset
    from library.wan.tiny import write_tiny_model_set

    models = write_tiny_model_set(root / "models", task)
    toml = write_demo_dataset(root / "data", clips=2, images=images, width=64, height=64, frames=9)
    if not images:  # drop the (empty) image dataset
        text = toml.read_text()
        toml.write_text(text[: text.index("[[datasets]]", text.index("[[datasets]]") + 1)])
    config = load_dataset_config(toml)
    cache_latents(config, models.vae, task=task, progress=False)
    cache_text_encoder_outputs(config, models.t5, tokenizer=models.tokenizer, dtype=torch.float32, progress=False)
    return {"models": models, "dataset": toml}


@pytest.mark.parametrize("task,extra", [("i2v-tiny", {}), ("ti2v-tiny", {"i2v_probability": 0.5})])
def test_image_to_video_tasks_train(tmp_path, task, extra):
    ws = _task_workspace(tmp_path, task)
    seen = []
    trainer = Trainer(validate(config_from_dict(settings(ws, tmp_path / "out", task=task, max_train_steps=6,
                                                         **({} if get_variant(task).two_experts else
                                                            {"dit_high_noise": None}), **extra))))
    trainer.setup()
    for expert in trainer.experts:
        expert.model.register_forward_pre_hook(lambda m, args, kwargs: seen.append((args, kwargs)), with_kwargs=True)
    trainer.train()
    trainer.cleanup()
    args, kwargs = seen[0]
    if task == "i2v-tiny":  # 36 channels: 16 noisy + 4 mask + 16 image latent
        y = kwargs["y"]
        assert y.shape[1] == 20 and (y[:, :4, 0] == 1).all() and (y[:, :4, 1:] == 0).all()
    else:  # TI2V: per-token timesteps, 0 on the first frame when the image conditions the step
        timesteps = [a[1] for a, _ in seen]
        assert all(t.dim() == 2 for t in timesteps)
        per_frame = timesteps[0].shape[1] // 3  # 9 frames -> 3 latent frames
        assert any((t[:, :per_frame] == 0).all() and (t[:, per_frame:] > 0).all() for t in timesteps)
        assert any((t > 0).all() for t in timesteps)
    assert losses(tmp_path / "out") and all(math.isfinite(x) for x in losses(tmp_path / "out"))


def test_images_for_i2v_are_a_clear_error(tmp_path):
    ws = _task_workspace(tmp_path, "i2v-tiny", images=2)
    trainer = Trainer(validate(config_from_dict(settings(ws, tmp_path / "out", task="i2v-tiny"))))
    with pytest.raises(ValueError, match="single images give it nothing to learn"):
        trainer.run()


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_runs(workspace, tmp_path, precision):
    """bf16 / fp16 base weights with fp32 LoRA (fp16 goes through accelerate's optimizer wrapper and its
    gradient unscaling; the loss scaler itself only exists on CUDA)."""
    trainer = train(workspace, tmp_path, mixed_precision=precision, max_train_steps=3)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    assert trainer.experts[0].model.blocks[0].ffn[0].weight.dtype == dtype
    assert all(math.isfinite(x) for x in losses(tmp_path))
    assert lora(tmp_path / "lora_low_noise.safetensors")["lora_unet_blocks_0_ffn_0.lora_up.weight"].abs().sum() > 0


def test_compiled_blocks_train_like_eager_ones(workspace, tmp_path):
    """`compile` really compiles the blocks (with the LoRA hooks inside the graphs) and changes no loss.
    aot_eager runs dynamo and AOT autograd (where hooks and checkpointing could break) without a C++
    toolchain; inductor is the default on a GPU."""
    import torch._dynamo

    eager = train(workspace, tmp_path / "eager", max_train_steps=3, gradient_checkpointing=True)
    torch._dynamo.reset()
    compiled = train(workspace, tmp_path / "compiled", max_train_steps=3, gradient_checkpointing=True,
                     compile=True, compile_backend="aot_eager", compile_dynamic="true")
    for expert in compiled.experts:
        assert all(block._compiled_call_impl is not None for block in expert.model.blocks)
    assert all(block._compiled_call_impl is None for e in eager.experts for block in e.model.blocks)
    assert losses(tmp_path / "compiled") == pytest.approx(losses(tmp_path / "eager"), rel=1e-4)
    torch._dynamo.reset()


@pytest.fixture
def cuda_math_flags():
    """Saves the process-wide CUDA math flags and puts them back by assignment, the way torch exposes
    them (its backends serve them through `__getattr__`, so monkeypatch's delete at teardown fails)."""
    flags = [(torch.backends.cuda.matmul, "allow_tf32"), (torch.backends.cudnn, "allow_tf32"),
             (torch.backends.cudnn, "benchmark")]
    saved = [(owner, name, getattr(owner, name)) for owner, name in flags]
    yield
    for owner, name, value in saved:
        setattr(owner, name, value)


def test_cuda_flags_are_set(cuda_math_flags):
    from library.config.schema import CompileArgs
    from library.runtime.compiling import set_cuda_flags

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.benchmark = False
    set_cuda_flags(CompileArgs())
    assert not torch.backends.cuda.matmul.allow_tf32 and not torch.backends.cudnn.benchmark
    set_cuda_flags(CompileArgs(cuda_allow_tf32=True, cuda_cudnn_benchmark=True))
    assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.benchmark


def _random_lora(model, path: Path, seed: int, rank: int = 2, expert: str | None = None) -> dict:
    """A LoRA file with non-zero up weights for `model`; returns {module: fp32 delta at strength 1}."""
    from networks import lora_wan

    torch.manual_seed(seed)
    net = lora_wan.create_network(1.0, rank, rank, None, None, model)
    for lo in net.loras:
        torch.nn.init.normal_(lo.lora_up.weight, std=0.05)
    meta = {"ss_expert": expert} if expert else {}
    net.save_weights(path, dtype=torch.float32, metadata=meta)
    return {lo.official_name: lo.delta_weight() for lo in net.loras}


def test_base_weights_are_merged_per_expert_before_training(workspace, tmp_path):
    from library.training.engines.base_weights import assign_base_weights
    from library.wan.loading import load_dit

    m = workspace["models"]
    low, high = (load_dit(p, dtype=torch.float32, task="t2v-tiny") for p in (m.dit, m.dit_high_noise))
    shared = _random_lora(low, tmp_path / "shared.safetensors", 1)
    only_high = _random_lora(high, tmp_path / "style_high_noise.safetensors", 2)
    cfg = validate(config_from_dict(settings(workspace, tmp_path / "out", base_weights=[
        str(tmp_path / "shared.safetensors"), str(tmp_path / "style_high_noise.safetensors")],
        base_weights_multiplier=[0.5, 1.0])))
    trainer = Trainer(cfg)
    trainer.setup()
    try:
        got = {e.name: dict(e.model.named_parameters()) for e in trainer.experts}
        name = "blocks.1.cross_attn.v"
        want_low = low.get_parameter(name + ".weight") + 0.5 * shared[name]
        want_high = high.get_parameter(name + ".weight") + 0.5 * shared[name] + only_high[name]
        torch.testing.assert_close(got["low_noise"][name + ".weight"], want_low)
        torch.testing.assert_close(got["high_noise"][name + ".weight"], want_high)
        assert all(lo._handle is not None for e in trainer.experts for lo in e.network.loras)  # the LoRA to train
    finally:
        trainer.cleanup()
    assert [(s.path.name, e) for s, e in assign_base_weights(cfg.network, ["low_noise", "high_noise"])] == [
        ("shared.safetensors", "low_noise"), ("shared.safetensors", "high_noise"),
        ("style_high_noise.safetensors", "high_noise")]


def test_base_weights_for_another_model_are_a_clear_error(workspace, tmp_path):
    from library.sampling.loras import LoraError
    from safetensors.torch import save_file

    save_file({"lora_unet_blocks_0_self_attn_q.lora_down.weight": torch.zeros(2, 5120),
               "lora_unet_blocks_0_self_attn_q.lora_up.weight": torch.zeros(5120, 2)}, tmp_path / "big.safetensors",
              metadata={"modelspec.architecture": "wan2.2-t2v-a14b/lora"})
    trainer = Trainer(validate(config_from_dict(settings(workspace, tmp_path / "out",
                                                         base_weights=[str(tmp_path / "big.safetensors")]))))
    with pytest.raises(LoraError, match=r"big.safetensors: this LoRA was made for another model .*wan2.2-t2v-a14b"):
        trainer.setup()
    trainer.cleanup()


def test_scale_weight_norms_caps_every_module_delta(workspace, tmp_path):
    trainer = train(workspace, tmp_path, max_train_steps=3, learning_rate=5e-2, scale_weight_norms=1e-3)
    norms = [lo.delta_weight().norm().item() for e in trainer.experts for lo in e.network.loras]
    assert max(norms) <= 1e-3 * (1 + 1e-4) and max(norms) > 0.5e-3  # capped, and the cap was reached

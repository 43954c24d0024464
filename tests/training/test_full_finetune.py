"""Full fine-tuning (`finetune/fine_tune_wan.py`): which weights train, what is saved and how it loads,
fused backward pass = the plain step, full_bf16, exact resume, data parallel, and the config errors."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from library.config import ConfigError, config_from_dict, validate
from library.training.trainer import Trainer
from library.wan.loading import load_dit
from library.wan.variants import get_variant
from tests.helpers import REPO, torchrun
from tests.training.test_trainer import losses, workspace  # noqa: F401 - the shared tiny models and caches


def ft_settings(ws, out: Path, **over) -> dict:
    m = ws["models"]
    return {"task": "t2v-tiny", "dit": str(m.dit), "dataset_config": str(ws["dataset"]), "output_dir": str(out),
            "output_name": "ft", "full_fine_tune": True, "learning_rate": 1e-3, "optimizer_type": "AdamW",
            "max_train_steps": 4, "seed": 3, "max_data_loader_n_workers": 0, "timestep_sampling": "uniform",
            "save_precision": "fp32", **over}


def finetune(ws, out: Path, **over) -> Trainer:
    trainer = Trainer(validate(config_from_dict(ft_settings(ws, out, **over))))
    assert trainer.run() == 0
    return trainer


def tensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    with safe_open(str(path), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata()


def two_item_datasets(ws, tmp_path: Path) -> Path:
    """A copy of the workspace's cached stills cut to two items, as `one.toml` (batch 2, for one process) and
    `two.toml` (batch 1, for two processes): the same global batch either way."""
    root = tmp_path / "data2"
    shutil.copytree(ws["dataset"].parent, root)
    base = ws["dataset"].read_text().replace(str(ws["dataset"].parent), str(root))
    images_only = base.split("[[datasets]]")[0] + "[[datasets]]" + base.split("[[datasets]]")[2]
    for name, batch in (("one.toml", 2), ("two.toml", 1)):
        (root / name).write_text(images_only.replace("batch_size = 1", f"batch_size = {batch}"))
    for img in sorted((root / "images").iterdir())[2:]:
        img.unlink()
    return root


def test_selected_weights_train_and_the_saved_dit_loads(workspace, tmp_path):
    finetune(workspace, tmp_path, trainable_patterns=[r"blocks\.1\."], frozen_patterns=["norm", "modulation"])
    saved, meta = tensors(tmp_path / "ft_low_noise.safetensors")
    base = load_dit(workspace["models"].dit, dtype=torch.float32, task="t2v-tiny").state_dict()
    assert set(saved) == set(base)
    changed = {k for k in base if not torch.equal(saved[k], base[k])}
    assert changed and all(k.startswith("blocks.1.") and "norm" not in k and "modulation" not in k for k in changed)
    assert "blocks.1.ffn.0.weight" in changed and "blocks.1.self_attn.q.weight" in changed
    assert meta["modelspec.architecture"] == "wan2.2-t2v-tiny" and meta["ss_training_type"] == "full_fine_tune"
    assert meta["ss_expert"] == "low_noise" and meta["ss_steps"] == "4" and "ss_network_dim" not in meta
    tuned = load_dit(tmp_path / "ft_low_noise.safetensors", task="t2v-tiny")  # our loader (and ComfyUI's names)
    torch.testing.assert_close(tuned.get_parameter("blocks.1.ffn.0.weight"), saved["blocks.1.ffn.0.weight"])


def test_comfyui_names_and_bf16_by_default(workspace, tmp_path):
    finetune(workspace, tmp_path, max_train_steps=1, save_model_format="comfyui", save_precision=None)
    saved, _ = tensors(tmp_path / "ft_low_noise.safetensors")
    assert all(k.startswith("model.diffusion_model.") for k in saved)
    assert {t.dtype for t in saved.values()} == {torch.bfloat16}
    load_dit(tmp_path / "ft_low_noise.safetensors", task="t2v-tiny")


def test_two_experts_each_save_a_whole_dit(workspace, tmp_path):
    finetune(workspace, tmp_path, max_train_steps=2, dit_high_noise=str(workspace["models"].dit_high_noise))
    for expert in ("high_noise", "low_noise"):
        _, meta = tensors(tmp_path / f"ft_{expert}.safetensors")
        assert meta["ss_expert"] == expert


def test_fused_backward_pass_equals_the_plain_step(workspace, tmp_path):
    """One AdamW per tensor, stepped in the backward pass, gives the weights of one AdamW stepped after it
    (no clipping: fused clipping is per tensor by design)."""
    plain = finetune(workspace, tmp_path / "plain", max_grad_norm=0)
    fused = finetune(workspace, tmp_path / "fused", max_grad_norm=0, fused_backward_pass=True)
    assert type(fused.opt.optimizer).__name__ == "FusedBackwardOptimizer"
    assert all(p.grad is None for p in fused.opt.trainable)  # freed as soon as each tensor stepped
    assert losses(tmp_path / "fused") == pytest.approx(losses(tmp_path / "plain"), rel=1e-6)
    a, _ = tensors(tmp_path / "plain" / "ft_low_noise.safetensors")
    b, _ = tensors(tmp_path / "fused" / "ft_low_noise.safetensors")
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=1e-5, atol=1e-7)
    assert plain.opt.optimizer.param_groups[0]["lr"] == fused.opt.optimizer.param_groups[0]["lr"]


def test_fused_schedule_reaches_every_tensor(workspace, tmp_path):
    trainer = finetune(workspace, tmp_path, fused_backward_pass=True, lr_scheduler="linear", max_train_steps=3)
    rates = {g["lr"] for opt in trainer.opt.optimizer.inner for g in opt.param_groups}
    assert rates == {trainer.opt.scheduler.get_last_lr()[0]} and 1e-3 not in rates  # the schedule moved them all


def test_full_bf16_keeps_weights_and_optimizer_state_in_bf16(workspace, tmp_path):
    trainer = finetune(workspace, tmp_path, full_bf16=True, mixed_precision="bf16", max_train_steps=2,
                       fused_backward_pass=True)
    trained = trainer.experts[0].network.params
    assert {p.dtype for p in trained} == {torch.bfloat16, torch.float32}  # fp32: norms and modulation, as loaded
    pairs = [(p, opt.state[p]) for opt in trainer.opt.optimizer.inner for p in opt.param_groups[0]["params"]]
    assert len(pairs) == len(trained) and all(state for _, state in pairs)
    assert all(state["exp_avg"].dtype == state["exp_avg_sq"].dtype == p.dtype for p, state in pairs)
    assert sum(p.dtype == torch.bfloat16 for p, _ in pairs) > len(pairs) / 2


def test_fp32_masters_compute_in_bf16(workspace, tmp_path):
    trainer = finetune(workspace, tmp_path, mixed_precision="bf16", max_train_steps=1)
    model = trainer.experts[0].model
    assert model.compute_dtype == torch.bfloat16
    assert model.get_parameter("blocks.0.self_attn.q.weight").dtype == torch.float32


@pytest.mark.parametrize("extra", [{}, {"full_bf16": True, "mixed_precision": "bf16"}], ids=["fp32", "bf16"])
def test_interrupted_and_resumed_fine_tune_equals_an_uninterrupted_one(workspace, tmp_path, monkeypatch, extra):
    """Exact resume, including the stochastic rounding of full_bf16 (keyed by the restored step count)."""
    finetune(workspace, tmp_path / "whole", max_train_steps=6, fused_backward_pass=True, **extra)
    original = Trainer.after_step

    def interrupt_at_3(self, loss, bar):
        original(self, loss, bar)
        if self.state.global_step == 3:
            raise KeyboardInterrupt

    monkeypatch.setattr(Trainer, "after_step", interrupt_at_3)
    part = tmp_path / "part"
    assert Trainer(validate(config_from_dict(ft_settings(workspace, part, max_train_steps=6,
                                                         fused_backward_pass=True, **extra)))).run() == 130
    monkeypatch.setattr(Trainer, "after_step", original)
    finetune(workspace, part, max_train_steps=6, fused_backward_pass=True, resume="latest", **extra)
    assert losses(part) == pytest.approx(losses(tmp_path / "whole"), rel=1e-6)
    a, _ = tensors(tmp_path / "whole" / "ft_low_noise.safetensors")
    b, _ = tensors(part / "ft_low_noise.safetensors")
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=1e-5, atol=1e-7)


def test_resume_with_another_trainable_set_is_a_clear_error(workspace, tmp_path):
    finetune(workspace, tmp_path, max_train_steps=1, save_state=True)
    with pytest.raises(ValueError, match="resume with the same trainable_patterns"):
        finetune(workspace, tmp_path, max_train_steps=2, resume="latest", trainable_patterns=[r"blocks\.0\."])


def test_bucketed_gradient_averaging():
    """Averaging over processes in buckets gives each gradient back in place (a fake 2-process mean)."""
    from library.training.optimization import Optimization

    params = [torch.nn.Parameter(torch.zeros(n)) for n in (3, 5, 2, 7)]
    for i, p in enumerate(params[:3]):
        p.grad = torch.full_like(p, float(i + 1))
    calls = []

    class TwoProcesses:
        num_processes = 2

        def reduce(self, t, reduction):
            calls.append(t.numel())
            return t * 0.5  # the other process contributed zeros

    opt = Optimization(None, None, params, total_steps=1)
    opt.average_gradients(TwoProcesses(), bucket_elements=6)
    assert calls == [8, 9]  # [3 + 5], [2 + 7]
    assert [p.grad.tolist() for p in params] == [[0.5] * 3, [1.0] * 5, [1.5] * 2, [0.0] * 7]


@pytest.mark.parametrize("over,message", [
    ({"fp8_base": True}, "`fp8_base` cannot be used with full fine-tuning (fp8 weights cannot be trained)"),
    ({"blocks_to_swap": 4}, "`blocks_to_swap` cannot be used with full fine-tuning"),
    ({"network_weights": "x.safetensors"}, "`network_weights` cannot be used with full fine-tuning (it is a LoRA"),
    ({"full_bf16": True}, "`full_bf16` needs `mixed_precision` = 'bf16'"),
    ({"fused_backward_pass": True, "gradient_accumulation_steps": 2}, "cannot accumulate gradients"),
    ({"fused_backward_pass": True, "mixed_precision": "fp16"}, "cannot use fp16 loss scaling"),
    ({"trainable_patterns": ["blocks.(("]}, r"`trainable_patterns`: 'blocks.\(\(' is not a valid regular"),
    ({"full_fine_tune": False, "fused_backward_pass": True}, "`fused_backward_pass` is for full fine-tuning"),
    ({"fsdp": True, "fused_backward_pass": True}, "`fused_backward_pass` and `fsdp` cannot be combined"),
    ({"fsdp_cpu_offload": True}, "`fsdp_cpu_offload` needs `fsdp` = true"),
    ({"fsdp": True, "sample_prompts": "p.txt", "sample_every_n_steps": 5}, "samples during training are not available"),
])
def test_config_errors(workspace, tmp_path, over, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")
                       if "\\" not in message else message):
        validate(config_from_dict(ft_settings(workspace, tmp_path, **over)))


def test_patterns_that_select_nothing_are_a_clear_error(workspace, tmp_path):
    with pytest.raises(ValueError, match="leave no DiT parameter to train"):
        finetune(workspace, tmp_path, trainable_patterns=["no_such_layer"])


def test_fine_tune_script_in_a_subprocess(workspace, tmp_path):
    s = ft_settings(workspace, tmp_path, max_train_steps=2)
    del s["full_fine_tune"]  # the entry script turns it on
    out = subprocess.run([sys.executable, str(REPO / "finetune" / "fine_tune_wan.py"),
                          *sum(([f"--{k}", str(v)] for k, v in s.items()), [])],
                         capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    assert (tmp_path / "ft_low_noise.safetensors").is_file()


@pytest.mark.slow
def test_two_processes_equal_one_with_the_fused_backward_pass(workspace, tmp_path):
    """gloo on the CPU: the per-tensor averaging inside the backward pass equals one process on the
    same global batch (SGD: the update is linear in the gradient)."""
    root = two_item_datasets(workspace, tmp_path)

    def flags(out, toml):
        s = ft_settings(workspace, out, dataset_config=str(root / toml), max_train_steps=2, fused_backward_pass=True,
                        optimizer_type="torch.optim.SGD", learning_rate=0.1, max_grad_norm=0)
        return sum(([f"--{k}", str(v)] for k, v in s.items()), [])

    script = str(REPO / "train_network_wan.py")
    single = subprocess.run([sys.executable, script, *flags(tmp_path / "a", "one.toml")], capture_output=True,
                            text=True, timeout=300)
    assert single.returncode == 0, single.stderr[-3000:]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    double = subprocess.run([*torchrun(2), script, *flags(tmp_path / "b", "two.toml")], capture_output=True,
                            text=True, timeout=300, env=env)
    assert double.returncode == 0, double.stderr[-3000:]
    a, _ = tensors(tmp_path / "a" / "ft_low_noise.safetensors")
    b, _ = tensors(tmp_path / "b" / "ft_low_noise.safetensors")
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=1e-4, atol=1e-6)


def _torchrun(script: Path, flags: list[str], timeout: int = 400):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run([*torchrun(2), str(script), *flags], capture_output=True, text=True, timeout=timeout, env=env)


@pytest.mark.slow
def test_fsdp_shards_train_like_one_process_and_resume_exactly(workspace, tmp_path):
    """FSDP2 over 2 gloo processes (batch 1 each) = 1 process with batch 2 on the same items, with global
    gradient clipping; host-memory shards with checkpointing change nothing; then a sharded run stopped at
    step 2 and resumed from its per-process state ends where the uninterrupted sharded run does."""
    root = two_item_datasets(workspace, tmp_path)
    script = REPO / "train_network_wan.py"

    def flags(out, toml, **over):
        s = ft_settings(workspace, out, dataset_config=str(root / toml), optimizer_type="torch.optim.SGD",
                        learning_rate=0.1, max_grad_norm=0.05, **over)
        return sum(([f"--{k}", str(v)] for k, v in s.items()), [])

    single = subprocess.run([sys.executable, str(script), *flags(tmp_path / "a", "one.toml", max_train_steps=4)],
                            capture_output=True, text=True, timeout=300)
    assert single.returncode == 0, single.stderr[-3000:]
    sharded = _torchrun(script, flags(tmp_path / "b", "two.toml", max_train_steps=4, fsdp=True))
    assert sharded.returncode == 0, sharded.stderr[-3000:]
    assert "sharded over 2 processes" in sharded.stderr
    a, _ = tensors(tmp_path / "a" / "ft_low_noise.safetensors")
    b, _ = tensors(tmp_path / "b" / "ft_low_noise.safetensors")
    assert any(not torch.equal(a[k], load) for k, load in
               load_dit(workspace["models"].dit, dtype=torch.float32, task="t2v-tiny").state_dict().items())
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=1e-4, atol=1e-6)

    offloaded = _torchrun(script, flags(tmp_path / "d", "two.toml", max_train_steps=4, fsdp=True, fsdp_cpu_offload=True,
                                        gradient_checkpointing=True))
    assert offloaded.returncode == 0, offloaded.stderr[-3000:]
    d, _ = tensors(tmp_path / "d" / "ft_low_noise.safetensors")
    for key in b:  # host-memory shards and recomputed blocks change no number
        torch.testing.assert_close(d[key], b[key], rtol=1e-6, atol=1e-8)

    first = _torchrun(script, flags(tmp_path / "c", "two.toml", max_train_steps=2, fsdp=True,
                                    save_state_on_train_end=True))
    assert first.returncode == 0, first.stderr[-3000:]
    state = tmp_path / "c" / "ft-state"
    assert (state / "training_state.pt").is_file() and (state / "training_state.rank1.pt").is_file()
    second = _torchrun(script, flags(tmp_path / "c", "two.toml", max_train_steps=4, fsdp=True, resume="latest"))
    assert second.returncode == 0, second.stderr[-3000:]
    c, _ = tensors(tmp_path / "c" / "ft_low_noise.safetensors")
    for key in b:
        torch.testing.assert_close(c[key], b[key], rtol=1e-5, atol=1e-7)
    with pytest.raises(ValueError, match="holds the shards of 2 processes but this run has 1"):
        finetune(workspace, tmp_path / "c", max_train_steps=5, fsdp=True, resume="latest",
                 dataset_config=str(root / "two.toml"))


def test_samples_during_a_bf16_fine_tune(workspace, tmp_path):
    """fp32 master weights computing in bf16: samples are rendered under the same autocast as training."""
    m = workspace["models"]
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a test prompt --w 32 --h 32 --f 1 --s 2\n")
    finetune(workspace, tmp_path, max_train_steps=1, mixed_precision="bf16", vae=str(m.vae), t5=str(m.t5),
             sample_prompts=str(prompts), sample_at_first=True)
    assert list((tmp_path / "sample").glob("ft_step00000000_00.mp4"))


@pytest.mark.parametrize("example", sorted((REPO / "finetune" / "examples").glob("*.toml")), ids=lambda p: p.name)
def test_shipped_examples_are_valid(example, workspace, tmp_path):
    """Every example parses and validates as given (its model paths swapped for the tiny ones)."""
    from library.config import load_config

    import tomllib

    tiny = {"ti2v-5B": "ti2v-tiny", "t2v-A14B": "t2v-tiny"}[tomllib.loads(example.read_text())["task"]]
    m = workspace["models"]
    cfg = validate(load_config(["--full_fine_tune", "--config_file", str(example), "--task", tiny,
                                "--dit", str(m.dit), "--dataset_config", str(workspace["dataset"])]))
    assert cfg.finetune.full_fine_tune and cfg.loop.mixed_precision == "bf16"


@pytest.mark.parametrize("flag", ["ACCELERATE_USE_FSDP", "ACCELERATE_USE_DEEPSPEED"])
def test_an_accelerate_fsdp_or_deepspeed_launch_is_a_clear_error(workspace, tmp_path, monkeypatch, flag):
    monkeypatch.setenv(flag, "true")
    trainer = Trainer(validate(config_from_dict(ft_settings(workspace, tmp_path))))
    with pytest.raises(RuntimeError, match="accelerate launch --multi_gpu --num_processes N"):
        trainer.setup()


def test_stochastic_rounding_is_unbiased():
    from library.training.engines.fused import stochastic_round_bf16

    gen = torch.Generator().manual_seed(0)
    x = torch.full((200_000,), 1.0 + 2.0**-10)  # an eighth of the way from 1 to the next bf16 value (1 + 2^-7)
    out = stochastic_round_bf16(x, gen)
    assert set(out.unique().tolist()) == {1.0, 1.0 + 2.0**-7}
    assert out.float().mean().item() == pytest.approx(1.0 + 2.0**-10, abs=2e-5)
    assert x.to(torch.bfloat16).unique().tolist() == [1.0]  # nearest rounding loses it
    exact = torch.tensor([1.5, -2.25, 0.0])
    assert torch.equal(stochastic_round_bf16(exact, gen).float(), exact)


def test_bf16_weights_keep_updates_below_the_bf16_step():
    """SGD steps of 1e-4 on weights at 1.0 (bf16 step 2^-7 = 0.0078): nearest rounding never moves them;
    the fused optimizer's stochastic rounding moves them by the right amount on average."""
    from library.training.engines.fused import FusedBackwardOptimizer

    def run(seed):
        w = torch.nn.Parameter(torch.ones(50_000, dtype=torch.bfloat16))
        opt = FusedBackwardOptimizer([{"params": [w], "lr": 1e-4}], lambda g: torch.optim.SGD(g, lr=1e-4),
                                     stochastic_seed=seed)
        for _ in range(50):
            (w.float().sum()).backward()  # gradient 1 everywhere: each step subtracts 1e-4
            opt.step()
        return w

    plain = torch.ones(50_000, dtype=torch.bfloat16)
    for _ in range(50):
        plain = (plain.float() - 1e-4).to(torch.bfloat16)
    assert torch.equal(plain, torch.ones_like(plain))
    w = run(5)
    assert w.dtype == torch.bfloat16
    assert w.float().mean().item() == pytest.approx(1.0 - 50 * 1e-4, abs=2e-4)
    assert torch.equal(run(5), w) and not torch.equal(run(6), w)  # keyed randomness: reproducible


def test_adamw_state_stays_bf16_under_stochastic_rounding(workspace, tmp_path):
    trainer = finetune(workspace, tmp_path, full_bf16=True, mixed_precision="bf16", max_train_steps=2,
                       fused_backward_pass=True)
    assert trainer.opt.optimizer.steps == 2 and trainer.opt.optimizer.stochastic_seed == 3


def test_full_fine_tuning_autocasts_without_the_weight_cache(workspace, tmp_path):
    """The bf16 copies of fp32 masters are not cached for the whole forward pass (the planner counts on it);
    LoRA training keeps the default."""
    seen = {}

    def spy(name):
        def hook(module, args):
            seen[name] = (torch.is_autocast_enabled("cpu"), torch.is_autocast_cache_enabled())
        return hook

    for name, over in (("full", {}), ("lora", {"full_fine_tune": False, "network_dim": 2})):
        trainer = Trainer(validate(config_from_dict(ft_settings(workspace, tmp_path / name, max_train_steps=1,
                                                                mixed_precision="bf16", **over))))
        trainer.setup()
        trainer.experts[0].model.blocks[0].register_forward_pre_hook(spy(name))
        trainer.train()
        trainer.cleanup()
    assert seen == {"full": (True, False), "lora": (True, True)}


@pytest.mark.parametrize("task,extra", [("i2v-tiny", {}), ("ti2v-tiny", {"i2v_probability": 0.5}),
                                        ("i2v-tiny-2.1", {})])
def test_image_to_video_variants_fine_tune(tmp_path, task, extra):
    """The conditioning paths (36-channel I2V, TI2V per-token timesteps, 2.1 CLIP tokens) train all weights,
    including the image-only layers (k_img / v_img, the CLIP projection) of WAN 2.1 I2V."""
    from library.data.dataset_config import load_dataset_config
    from library.data.latent_caching import cache_latents
    from library.data.text_caching import cache_text_encoder_outputs
    from library.prep.demo_dataset import write_demo_dataset
    from library.wan.tiny import write_tiny_model_set

    models = write_tiny_model_set(tmp_path / "models", task)
    toml = write_demo_dataset(tmp_path / "data", clips=2, images=0, width=32, height=32, frames=9)
    toml.write_text(toml.read_text()[: toml.read_text().rindex("[[datasets]]")])  # clips only (I2V)
    config = load_dataset_config(toml)
    cache_latents(config, models.vae, task=task, clip_path=models.clip, progress=False)
    cache_text_encoder_outputs(config, models.t5, tokenizer=models.tokenizer, dtype=torch.float32, progress=False)
    ws = {"models": models, "dataset": toml}
    finetune(ws, tmp_path / "out", max_train_steps=2, task=task, **extra)
    name = "ft_low_noise.safetensors" if get_variant(task).two_experts else "ft.safetensors"
    saved, _ = tensors(tmp_path / "out" / name)
    base = load_dit(ws["models"].dit, dtype=torch.float32, task=task).state_dict()
    changed = {k for k in base if not torch.equal(saved[k], base[k])}
    assert "blocks.0.self_attn.q.weight" in changed and "patch_embedding.weight" in changed
    if task == "i2v-tiny-2.1":
        assert "blocks.0.cross_attn.k_img.weight" in changed and any(k.startswith("img_emb.") for k in changed)


def test_auto_memory_picks_a_full_fine_tuning_rung_this_config_allows(workspace, tmp_path, monkeypatch):
    from library.training.planning import lora as memory_plan
    from library.training.data import build_data
    from library.training.planning.auto import auto_full_settings, largest_bucket
    from library.training.planning.full import FullSettings, FullWorkload, estimate_full

    cfg = validate(config_from_dict(ft_settings(workspace, tmp_path, auto_memory=True, mixed_precision="bf16")))
    trainer = Trainer(cfg)
    trainer.setup()  # no CUDA here: auto_memory keeps the configured settings
    assert trainer.cfg is cfg
    data = build_data(cfg, trainer.variant, trainer.accelerator, 0)
    trainer.cleanup()
    width, height, frames, batch = largest_bucket(data)
    work = FullWorkload(trainer.variant, width, height, frames, batch, 0, "AdamW")
    first = estimate_full(work, FullSettings()).total

    def card(gib):
        monkeypatch.setattr(memory_plan, "detect_vram_gb", lambda device=None: gib)

    card(80.0)
    big = auto_full_settings(cfg, trainer.variant, data, "cpu", 1)
    assert not big.finetune.full_bf16 and not big.memory.gradient_checkpointing  # the fastest rung fits
    card(memory_plan.CUDA_CONTEXT_GIB + first / memory_plan.FRAGMENTATION * 0.99)  # just below the first rung
    small = auto_full_settings(cfg, trainer.variant, data, "cpu", 1)
    assert small.memory.gradient_checkpointing or small.finetune.full_bf16
    card(memory_plan.CUDA_CONTEXT_GIB + 0.01)  # nothing fits: the most frugal allowed rung
    accumulating = validate(config_from_dict(ft_settings(workspace, tmp_path, auto_memory=True, mixed_precision="bf16",
                                                         gradient_accumulation_steps=2)))
    frugal = auto_full_settings(accumulating, trainer.variant, data, "cpu", 1)
    assert frugal.finetune.full_bf16 and not frugal.finetune.fused_backward_pass  # fused cannot accumulate
    assert auto_full_settings(cfg, trainer.variant, data, "cpu", 1).finetune.fused_backward_pass


def test_pinned_fine_tune_losses(workspace, tmp_path):
    """A regression guard on full fine-tuning's maths (masters, AdamW over every weight, fused step)."""
    finetune(workspace, tmp_path, max_train_steps=6, fused_backward_pass=True)
    got = losses(tmp_path)
    assert got == pytest.approx(PINNED_FULL, rel=1e-4), got


PINNED_FULL = [1.0896056, 1.2140143, 1.1474444, 1.1796938, 1.0629091, 1.1063093]

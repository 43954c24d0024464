"""generate_video_wan.py and tools/compare_checkpoints.py in a subprocess, on tiny models (CPU)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.helpers import REPO
from tests.sampling.conftest import load_models, make_tiny_sets, write_lora


def _run(script, *args, cwd=None):
    env = dict(os.environ, OMP_NUM_THREADS="1")  # tiny models: threads only add overhead
    proc = subprocess.run([sys.executable, str(REPO / script), *map(str, args)], capture_output=True, text=True,
                          timeout=300, cwd=cwd, env=env)
    return proc.returncode, proc.stdout + proc.stderr


def _model_args(s):
    args = ["--task", s.task, "--dit", s.dit, "--vae", s.vae, "--t5", s.t5, "--tokenizer", s.tokenizer]
    return args + (["--dit_high_noise", s.dit_high_noise] if s.dit_high_noise else [])


@pytest.fixture(scope="module")
def tiny_sets(tmp_path_factory):
    return make_tiny_sets(tmp_path_factory.mktemp("tiny_models"))


@pytest.fixture(scope="module")
def t2v_lora(tiny_sets, tmp_path_factory):
    """A per-expert LoRA pair for t2v-tiny, and the folder of a fake training run with checkpoints."""
    folder = tmp_path_factory.mktemp("loras")
    models = load_models(tiny_sets["t2v-tiny"], text_encoder=False)
    for expert in ("high_noise", "low_noise"):
        write_lora(models.experts[expert], folder / f"style_{expert}.safetensors", models.variant, expert)
        for step in (5, 10):
            write_lora(models.experts[expert], folder / "run" / f"style_{expert}-step{step:08d}.safetensors",
                       models.variant, expert, seed=step, steps=step)
    return folder


def test_sweep_with_base_and_a_bad_prompt_line(tiny_sets, t2v_lora, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("# a comment\na cat walks --d 3\na dog --zz 4 --d 5\na bird flies --f 6 --d 4\n")
    rc, log = _run("generate_video_wan.py", *_model_args(tiny_sets["t2v-tiny"]), "--from_file", prompts,
                   "--lora", f"{t2v_lora / 'style_high_noise.safetensors'}:0.8", "--lora_strength_sweep", "0.5,1.0",
                   "--compare_base", "--steps", "2", "--frames", "5", "--width", "32", "--height", "32",
                   "--output_dir", tmp_path / "out", "--output_name", "t")
    assert rc == 1, log  # one line failed, the others rendered
    assert "prompts.txt: unknown option --zz is ignored" in log and "(prompts.txt line 3)" in log
    assert "prompts.txt line 4: --f must be 1 + 4k frames" in log and "got 6; use 5 or 9" in log
    sidecar = json.loads((tmp_path / "out" / "t_sweep.json").read_text())
    assert [c["label"] for c in sidecar["columns"]] == ["base", "strength 0.5", "strength 1"]
    rows = [(r["prompt"], r["seed"], r["frames"]) for r in sidecar["rows"]]
    assert rows == [("a cat walks", 3, 5), ("a dog", 5, 5)]
    assert sorted(lo["expert"] for lo in sidecar["loras"]) == ["high_noise", "low_noise"]  # the pair, found by name
    assert sidecar["loras"][0]["strength"] == 0.8 and "prompts.txt line 4" in sidecar["prompt_errors"][0]
    assert (tmp_path / "out" / "t_sweep.mp4").stat().st_size > 0 and (tmp_path / "out" / "t_sweep.png").is_file()


def test_ti2v_image_to_video_with_frames_and_sidecar(tiny_sets, tmp_path):
    import cv2
    import numpy as np

    cv2.imwrite(str(tmp_path / "start.png"), np.full((50, 70, 3), 200, np.uint8))
    rc, log = _run("generate_video_wan.py", *_model_args(tiny_sets["ti2v-tiny"]), "--prompt", "a cat --d 9",
                   "--image", tmp_path / "start.png", "--steps", "2", "--frames", "5", "--sampler", "euler",
                   "--save_frames", "--output_dir", tmp_path / "out", "--output_name", "v")
    assert rc == 0, log
    sidecar = json.loads((tmp_path / "out" / "v_00_seed9.json").read_text())
    s = sidecar["settings"]
    assert (s["task"], s["sampler"], s["steps"], s["seed"], s["fps"], s["width"], s["height"]) == \
        ("ti2v-tiny", "euler", 2, 9, 24, 64, 64)
    assert s["image"].endswith("start.png") and sidecar["models"]["vae"].endswith(".pth")
    assert sidecar["files"] == {"video": "v_00_seed9.mp4", "contact_sheet": "v_00_seed9.png",
                                "frames": "v_00_seed9_frames"}
    assert len(list((tmp_path / "out" / "v_00_seed9_frames").glob("*.png"))) == 5


def test_bad_inputs_fail_clearly(tiny_sets, tmp_path):
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(b"\x00" * 20)
    rc, log = _run("generate_video_wan.py", *_model_args(tiny_sets["i2v-tiny"]), "--prompt", "a cat",
                   "--lora", broken, "--steps", "1", "--output_dir", tmp_path / "out")
    assert rc == 2 and "broken.safetensors: not a readable .safetensors LoRA file" in log
    assert "loaded" not in log  # checked before any model is loaded
    assert not (tmp_path / "out").exists()
    import cv2
    import numpy as np

    cv2.imwrite(str(tmp_path / "start.png"), np.full((32, 32, 3), 90, np.uint8))
    (tmp_path / "p.txt").write_text("no image here --d 1\nwith an image --d 2 --i start.png\n")
    rc, log = _run("generate_video_wan.py", *_model_args(tiny_sets["i2v-tiny"]), "--from_file", tmp_path / "p.txt",
                   "--steps", "1", "--frames", "1", "--width", "32", "--height", "32", "--output_dir",
                   tmp_path / "out", "--output_name", "i")
    assert rc == 1 and "p.txt line 1: i2v-tiny is an image-to-video model and needs a start image" in log
    assert sorted(p.name for p in (tmp_path / "out").glob("*.mp4")) == ["i_00_seed2.mp4"]  # the other rendered


def test_entry_scripts_import_this_repos_library(tmp_path):
    """With another `library` package first on the path (sd-scripts installs one), --help still works."""
    fake = tmp_path / "site" / "library"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("raise ImportError('the wrong library package was imported')\n")
    env = dict(os.environ, PYTHONPATH=str(tmp_path / "site"))
    for script in ("generate_video_wan.py", "wan_generate_video.py", "tools/compare_checkpoints.py"):
        proc = subprocess.run([sys.executable, str(REPO / script), "--help"], env=env, cwd=tmp_path,
                              capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0 and "--task" in proc.stdout, proc.stderr


def test_compare_checkpoints_cli(tiny_sets, t2v_lora, tmp_path):
    rc, log = _run("tools/compare_checkpoints.py", t2v_lora / "run", *_model_args(tiny_sets["t2v-tiny"]),
                   "--prompt", "a cat --d 1", "--steps", "2", "--frames", "1", "--width", "32", "--height", "32",
                   "--include_base", cwd=tmp_path)
    assert rc == 0, log
    (sidecar_path,) = (t2v_lora / "run" / "compare").glob("checkpoints_*.json")
    sidecar = json.loads(sidecar_path.read_text())
    assert [c["label"] for c in sidecar["columns"]] == ["base", "step 5", "step 10"]
    assert sidecar["columns"][1]["experts"] == ["high_noise", "low_noise"]
    assert sidecar_path.with_suffix(".mp4").is_file() and sidecar_path.with_suffix(".png").is_file()
    page = sidecar_path.with_suffix(".html").read_text()  # the grid as a page: a video per cell, relative links
    cells = sorted(p.name for p in (sidecar_path.parent / f"{sidecar_path.stem}_cells").glob("*.mp4"))
    assert len(cells) == 3 and all(f'src="{sidecar_path.stem}_cells/{c}"' in page for c in cells)
    assert "<th>step 10</th>" in page and "<script" not in page


def test_fp8_base_generation(tiny_sets, tmp_path):
    """--fp8_base / --fp8_scaled load the DiT experts through the training code's fp8 path."""
    rc, log = _run("generate_video_wan.py", *_model_args(tiny_sets["t2v-tiny"]), "--prompt", "a cat --d 3",
                   "--steps", "2", "--frames", "5", "--fp8_base", "--fp8_scaled", "--output_dir", tmp_path / "out",
                   "--output_name", "f")
    assert rc == 0, log
    assert (tmp_path / "out" / "f_00_seed3.mp4").stat().st_size > 0
    rc, log = _run("generate_video_wan.py", *_model_args(tiny_sets["t2v-tiny"]), "--prompt", "x", "--fp8_scaled",
                   "--output_dir", tmp_path / "out")
    assert rc != 0 and "--fp8_scaled needs --fp8_base" in log


def test_attention_and_vae_cache_flags(tiny_sets, tmp_path):
    """musubi's --attn_mode names, --split_attn and --vae_cache_cpu change no pixel; an attention kernel that
    is not installed is a clear error."""
    common = [*_model_args(tiny_sets["t2v-tiny"]), "--prompt", "a cat --d 3", "--steps", "2", "--frames", "5",
              "--save_frames", "--output_name", "g"]
    rc, log = _run("generate_video_wan.py", *common, "--output_dir", tmp_path / "a")
    assert rc == 0, log
    rc, log = _run("generate_video_wan.py", *common, "--output_dir", tmp_path / "b", "--attn_mode", "torch",
                   "--split_attn", "--vae_cache_cpu")
    assert rc == 0, log
    frames = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*.png"))
    assert frames and all((tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes() for f in frames)
    try:
        import sageattention  # noqa: F401
    except ImportError:
        rc, log = _run("generate_video_wan.py", *common, "--output_dir", tmp_path / "c", "--attn_mode", "sageattn")
        assert rc != 0 and "install `sageattention`" in log


def test_compare_checkpoints_of_a_full_fine_tune(tiny_sets, tmp_path):
    """Whole-DiT checkpoints (full fine-tuning) replace the experts' weights column by column."""
    import torch
    from safetensors.torch import save_file

    from library.wan.loading import load_dit

    s = tiny_sets["t2v-tiny"]
    run = tmp_path / "run"
    run.mkdir()
    for expert, path in (("high_noise", s.dit_high_noise), ("low_noise", s.dit)):
        state = load_dit(path, task="t2v-tiny").state_dict()
        for step in (5, 10):
            changed = {k: (v + 0.05 * step * torch.randn_like(v)) if k == "head.head.weight" else v
                       for k, v in state.items()}
            save_file({k: v.contiguous() for k, v in changed.items()},
                      run / f"ft_{expert}-step{step:08d}.safetensors", metadata={"ss_steps": str(step)})
    rc, log = _run("tools/compare_checkpoints.py", run, *_model_args(s), "--prompt", "a cat --d 1", "--steps", "2",
                   "--frames", "1", "--width", "32", "--height", "32", "--include_base", cwd=tmp_path)
    assert rc == 0, log
    (sidecar_path,) = (run / "compare").glob("checkpoints_*.json")
    columns = json.loads(sidecar_path.read_text())["columns"]
    assert [c["label"] for c in columns] == ["base", "step 5", "step 10"]
    assert [c.get("kind") for c in columns] == [None, "whole DiT", "whole DiT"]


def test_whole_dit_columns_swap_the_expert_weights(tiny_sets, tmp_path):
    import torch
    from safetensors.torch import save_file

    from library.evaluation.compare import checkpoint_columns
    from library.training.checkpoints import find_checkpoints

    s = tiny_sets["t2v-tiny"]
    models = load_models(s, text_encoder=False)
    base = models.experts["low_noise"].get_parameter("head.head.weight").clone()
    state = {k: v.contiguous() for k, v in models.experts["low_noise"].state_dict().items()}
    save_file({**state, "head.head.weight": state["head.head.weight"] + 1.0}, tmp_path / "ft_low_noise.safetensors")
    columns = checkpoint_columns(models, find_checkpoints(tmp_path), include_base=True,
                                 base_files={"low_noise": s.dit, "high_noise": s.dit_high_noise})
    assert [c.label for c in columns] == ["base", "final"]
    columns[1].setup()
    torch.testing.assert_close(models.experts["low_noise"].get_parameter("head.head.weight"), base + 1.0)
    columns[0].setup()  # back to the base weights
    torch.testing.assert_close(models.experts["low_noise"].get_parameter("head.head.weight"), base)

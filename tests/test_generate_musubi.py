"""musubi-tuner's `wan_generate_video.py` command lines on `generate_video_wan.py` / `wan_generate_video.py`, on
tiny models (CPU). Every flag of musubi's parse_args (kohya-ss/musubi-tuner commit 30c658c,
src/musubi_tuner/wan_generate_video.py) is in a table here: it works (with its effect asserted) or it is a
clear error (exit 2, before any model loads). Numbers are checked too (issue 15)."""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from tests.helpers import REPO
from tests.sampling.conftest import load_models, make_tiny_sets, write_lora


def _entry():
    spec = importlib.util.spec_from_file_location("generate_video_wan", REPO / "generate_video_wan.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


MAIN = _entry()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    sets = make_tiny_sets(tmp_path_factory.mktemp("tiny_models"))
    s = sets["t2v-tiny"]
    folder = tmp_path_factory.mktemp("loras")
    models = load_models(s, text_encoder=False)
    for expert in ("high_noise", "low_noise"):
        write_lora(models.experts[expert], folder / f"style_{expert}.safetensors", models.variant, expert)
    return sets, folder


def _models(s) -> list[str]:
    return ["--task", s.task, "--dit", str(s.dit), "--dit_high_noise", str(s.dit_high_noise), "--vae", str(s.vae),
            "--t5", str(s.t5)]


def _run(argv, caplog) -> tuple[int, str]:
    caplog.clear()
    with caplog.at_level(logging.INFO):
        rc = MAIN([str(a) for a in argv])
    return rc, caplog.text


def _sidecar(folder) -> dict:
    (path,) = folder.glob("*.json")
    return json.loads(path.read_text())


# ---- the flags that work: one musubi command line with all of them, each effect asserted ----------------

# flag(s) -> what must hold afterwards (sidecar `j`, settings `s`, log `log`, output folder `out`)
WORKS = {
    "--video_size 32 48 (height, width)": lambda j, s, log, out: (s["height"], s["width"]) == (32, 48),
    "--video_length 5": lambda j, s, log, out: s["frames"] == 5,
    "--infer_steps 3": lambda j, s, log, out: s["steps"] == 3,
    "--save_path": lambda j, s, log, out: out.is_dir(),
    "--fps 12": lambda j, s, log, out: s["fps"] == 12,
    "--flow_shift 3.5": lambda j, s, log, out: s["flow_shift"] == 3.5,
    "--guidance_scale 4": lambda j, s, log, out: s["guidance_low_noise"] == 4.0,
    "--guidance_scale_high_noise 2": lambda j, s, log, out: s["guidance_high_noise"] == 2.0,
    "--seed 5": lambda j, s, log, out: s["seed"] == 5,
    "--negative_prompt": lambda j, s, log, out: s["negative_prompt"] == "blurry",
    "--prompt": lambda j, s, log, out: s["prompt"] == "a cat walks",
    "--sample_solver vanilla": lambda j, s, log, out: s["sampler"] == "euler",
    "--timestep_boundary 500": lambda j, s, log, out: s["boundary"] == 0.5,
    "--cfg_skip_mode / --cfg_apply_ratio": lambda j, s, log, out: (s["cfg_skip_mode"], s["cfg_apply_ratio"]) ==
    ("late", 0.67) and "guidance per step (A: CFG, S: CFG skipped, L: CFG + skip-layer guidance): LAS" in log,
    "--slg_layers / --slg_mode / --slg_scale / --slg_start / --slg_end": lambda j, s, log, out:
        (s["slg_mode"], s["slg_layers"], s["slg_scale"], s["slg_end"]) == ("uncond", [1], 2.0, 0.5),
    "--lora_weight / --lora_multiplier": lambda j, s, log, out: any(
        lo["expert"] == "low_noise" and lo["strength"] == 0.7 for lo in j["loras"]),
    "--lora_weight_high_noise": lambda j, s, log, out: any(
        lo["expert"] == "high_noise" and lo["strength"] == 1.0 for lo in j["loras"]),
    "--include_patterns / --exclude_patterns": lambda j, s, log, out: all(
        "-> low_noise: 4 modules applied" in lo["report"] for lo in j["loras"] if lo["expert"] == "low_noise"),
    "--output_type both": lambda j, s, log, out: len(list(out.glob("*_latent.safetensors"))) == 1 and len(
        list(out.glob("*.mp4"))) == 1,
    "--trim_tail_frames 4": lambda j, s, log, out: s["trim_tail_frames"] == 4 and len(
        list(out.glob("*_frames/*.png"))) == 1,
    "--fp8 --fp8_scaled": lambda j, s, log, out: "fp8 (per-tensor scaled): 20 Linear layers" in log,
    "--fp8_t5": lambda j, s, log, out: j["models"]["t5_fp8"] is True,
    "--vae_dtype float32 --vae_cache_cpu --device cpu": lambda j, s, log, out: j["models"]["device"] == "cpu",
    "--attn_mode torch --split_attn": lambda j, s, log, out: True,  # pixel-identical: tests/test_generate.py
    "--offload_inactive_dit": lambda j, s, log, out: True,  # the moves: tests/sampling/test_guidance.py
    "--compile --compile_backend eager": lambda j, s, log, out: "compiled 2 blocks (backend eager" in log,
    "--cpu_noise": lambda j, s, log, out: s["noise"] == "cpu" and "--cpu_noise: the noise is always drawn" in log,
    "--force_v2_1_time_embedding": lambda j, s, log, out: "already use one timestep embedding" in log,
    "--disable_numpy_memmap": lambda j, s, log, out: "memory-mapped safetensors either way" in log,
    "--use_pinned_memory_for_block_swap": lambda j, s, log, out: "always uses pinned host memory" in log,
    "--fp8_fast": lambda j, s, log, out: "fp8_fast: fp8 matmuls need an NVIDIA GPU" in log,  # CPU: bf16
    "--blocks_to_swap 1 (CUDA only; ignored with a note on the CPU)": lambda j, s, log, out:
        "block swap needs a CUDA device" in log,
}


@pytest.fixture(scope="module")
def musubi_run(tiny, tmp_path_factory):
    sets, loras = tiny
    out = tmp_path_factory.mktemp("musubi") / "out"
    argv = [*_models(sets["t2v-tiny"]), "--video_size", 32, 48, "--video_length", 5, "--infer_steps", 3,
            "--save_path", out, "--fps", 12, "--flow_shift", 3.5, "--guidance_scale", 4, "--guidance_scale_high_noise",
            2, "--seed", 5, "--negative_prompt", "blurry", "--prompt", "a cat walks", "--sample_solver", "vanilla",
            "--timestep_boundary", 500, "--cfg_skip_mode", "late", "--cfg_apply_ratio", 0.67, "--slg_layers", 1,
            "--slg_mode", "uncond", "--slg_scale", 2, "--slg_start", 0, "--slg_end", 0.5,
            "--lora_weight", loras / "style_low_noise.safetensors", "--lora_multiplier", 0.7,
            "--lora_weight_high_noise", loras / "style_high_noise.safetensors", "--include_patterns", "cross_attn",
            "--exclude_patterns", "blocks_1_", "--output_type", "both", "--trim_tail_frames", 4, "--save_frames",
            "--fp8", "--fp8_scaled", "--fp8_t5", "--vae_dtype", "float32", "--vae_cache_cpu", "--device", "cpu",
            "--attn_mode", "torch", "--split_attn", "--offload_inactive_dit", "--compile", "--compile_backend",
            "eager", "--cpu_noise", "--force_v2_1_time_embedding", "--disable_numpy_memmap",
            "--use_pinned_memory_for_block_swap", "--fp8_fast", "--blocks_to_swap", 1]
    handler = _Collect()  # module scope: no caplog, a handler of our own
    logging.getLogger().addHandler(handler)
    level = logging.getLogger().level
    logging.getLogger().setLevel(logging.INFO)
    try:
        rc = MAIN([str(a) for a in argv])
    finally:
        logging.getLogger().removeHandler(handler)
        logging.getLogger().setLevel(level)
    return rc, handler.text(), out


class _Collect(logging.Handler):
    def __init__(self):
        super().__init__(logging.INFO)
        self.lines = []

    def emit(self, record):
        self.lines.append(record.getMessage())

    def text(self) -> str:
        return "\n".join(self.lines)


@pytest.mark.parametrize("flag", list(WORKS))
def test_musubi_flag_works(musubi_run, flag):
    rc, log, out = musubi_run
    assert rc == 0, log[-3000:]
    sidecar = _sidecar(out)
    assert WORKS[flag](sidecar, sidecar["settings"], log, out), flag


# ---- the flags that are clear errors, and numbers outside their rules ------------------------------------

ERRORS = {
    "--control_path c.mp4": "--control_path: control videos are for the Fun-Control models",
    "--mask_path m.png": "--mask_path: masks and reference images are for the VACE models",
    "--video_path v.mp4": "--video_path (video-to-video) is not supported",
    "--one_frame_inference target_index=1": "give target_index=N and control_index=A",
    "--one_frame_inference target_index=1,control_index=0 --control_image_path a.png":
        "one-frame inference is for the WAN 2.1 I2V and FLF2V models (i2v-14B, flf2v-14B), not t2v-tiny",
    "--control_image_mask_path m.png": "--control_image_mask_path: WAN one-frame inference uses no masks",
    "--task i2v-14B-FC --prompt x": "i2v-14B-FC is a Fun-Control model and needs a control video",
    "--width -64": "--width must be a positive number of pixels, got -64",
    "--height 0": "--height must be a positive number of pixels, got 0",
    "--width 40": "--width 40 is not a multiple of 16 (the VAE stride x the DiT patch of t2v-tiny); use 32 or 48",
    "--video_size 40 32": "--height 40 is not a multiple of 16",
    "--frames 0": "--frames (--video_length) must be 1 + 4k frames",
    "--video_length 6": "--frames (--video_length) must be 1 + 4k frames",
    "--steps 0": "--steps (--infer_steps) must be at least 1 step, got 0",
    "--seed -1": "--seed must be between 0 and 2**64 - 1, got -1",
    "--guidance_scale nan": "--guidance_scale must be a finite number",
    "--guidance_scale_high_noise inf": "--guidance_scale_high_noise must be a finite number",
    "--flow_shift 0": "--flow_shift must be greater than 0",
    "--fps -1": "--fps must be greater than 0",
    "--timestep_boundary 1200": "--timestep_boundary must be between 0 and 1 (or 0 and 1000)",
    "--blocks_to_swap 2": "--blocks_to_swap must be between 0 and 1 (t2v-tiny has 2 blocks), got 2",
    "--trim_tail_frames -1": "--trim_tail_frames must be 0 or more",
    "--cfg_apply_ratio 1.5 --cfg_skip_mode late": "--cfg_apply_ratio must be between 0 and 1, got 1.5",
    "--slg_layers 2 --slg_mode original": "--slg_layers 2: t2v-tiny has blocks 0 to 1",
    "--slg_layers a,b --slg_mode original": "--slg_layers must be block indices separated by commas",
    "--slg_start 0.6 --slg_end 0.2": "--slg_start 0.6 is after --slg_end 0.2",
    "--slg_scale nan": "--slg_scale must be a finite number",
    "--lora_multiplier nan": "--lora_multiplier must be a finite number",
    "--lora style.safetensors:inf": "--lora style.safetensors:inf: the strength must be a finite number",
    "--lora_weight a.safetensors --lora_multiplier 1 2": "2 LoRA multipliers for 1 LoRA files",
    "--include_patterns ( ": "--include_patterns: '(' is not a valid regex",
    "--lora_strength_sweep 0.5,nan --lora a.safetensors": "--lora_strength_sweep must be finite numbers",
    "--latent_path x.safetensors --output_type latent": "--latent_path decodes latents: use --output_type video",
}


@pytest.mark.parametrize("flags", list(ERRORS))
def test_clear_errors_before_anything_loads(tiny, tmp_path, caplog, flags):
    sets, _ = tiny
    argv = [*_models(sets["t2v-tiny"]), "--prompt", "a cat", "--save_path", tmp_path / "out", *flags.split(" ")]
    rc, log = _run([a for a in argv if a != ""], caplog)
    assert rc == 2 and ERRORS[flags] in log, log
    assert "loaded" not in log and not (tmp_path / "out").exists()


def test_all_problems_are_listed_at_once(tiny, tmp_path, caplog):
    sets, _ = tiny
    rc, log = _run([*_models(sets["t2v-tiny"]), "--prompt", "a", "--width", -64, "--height", 0, "--frames", 0,
                    "--steps", 0], caplog)
    assert rc == 2 and all(f"--{n}" in log for n in ("width", "height", "frames (--video_length)", "steps"))
    rc, log = _run(["--task", "t2v-tiny", "--prompt", "a"], caplog)
    assert rc == 2 and "--dit is required (or --ckpt_dir" in log and "--vae is required" in log


# ---- musubi's documented command lines, both entry points ---------------------------------------------------


def _subprocess(script, argv, cwd, stdin=None):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, str(REPO / script), *map(str, argv)], capture_output=True, text=True,
                          timeout=300, cwd=cwd, env=env, input=stdin)
    return proc.returncode, proc.stdout + proc.stderr


def test_musubi_docs_command_runs_unchanged_on_both_entry_points(tiny, tmp_path):
    """docs/wan.md's T2V example (`--fp8 --task t2v-1.3B --video_size 832 480 --video_length 81 --infer_steps 20
    --prompt ... --save_path path/to/save.mp4 --output_type both --dit ... --vae ... --t5 ... --attn_mode torch`)
    with the tiny model's task, paths and sizes; both scripts write the same latents."""
    sets, _ = tiny
    s = sets["t2v-tiny"]
    common = ["--fp8", "--task", "t2v-tiny", "--video_size", 48, 32, "--video_length", 5, "--infer_steps", 2,
              "--prompt", "prompt for the video", "--output_type", "both", "--dit", s.dit, "--vae", s.vae,
              "--t5", s.t5, "--attn_mode", "torch", "--seed", 42]
    latents = []
    for script in ("wan_generate_video.py", "generate_video_wan.py"):
        out = tmp_path / script / "save.mp4"  # musubi makes --save_path a folder, whatever its name
        rc, log = _subprocess(script, [*common, "--save_path", out], tmp_path)
        assert rc == 0, log
        (latent,) = out.glob("*_latent.safetensors")
        with safe_open(str(latent), framework="pt") as fh:
            meta = fh.metadata()
            latents.append(fh.get_tensor("latent"))
        assert latents[-1].shape == (16, 2, 6, 4)  # [C, F, h, w], musubi's layout
        assert (meta["seeds"], meta["height"], meta["width"], meta["video_length"], meta["infer_steps"]) == \
            ("42", "48", "32", "5", "2")
        assert len(list(out.glob("*.mp4"))) == 1
    torch.testing.assert_close(latents[0], latents[1], rtol=0, atol=0)


def test_batch_and_interactive_modes(tiny, tmp_path):
    """docs/wan.md's batch file with `--from_file`, and `--interactive` prompts from standard input."""
    sets, _ = tiny
    s = sets["t2v-tiny"]
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("A beautiful sunset over mountains --w 32 --h 32 --f 5 --d 42 --s 2\n"
                       "A busy city street at night --w 32 --h 48 --g 7.5 --n low quality, blurry --s 2 --f 1\n")
    rc, log = _subprocess("wan_generate_video.py", [*_models(s), "--from_file", prompts, "--save_path", "batch"],
                          tmp_path)
    assert rc == 0, log
    settings = [json.loads(p.read_text())["settings"] for p in sorted((tmp_path / "batch").glob("*.json"))]
    assert [(x["seed"], x["height"], x["guidance_low_noise"]) for x in settings][0] == (42, 32, 3.0)  # the default
    assert (settings[1]["height"], settings[1]["guidance_low_noise"], settings[1]["negative_prompt"]) == \
        (48, 7.5, "low quality, blurry")
    rc, log = _subprocess("wan_generate_video.py", [*_models(s), "--interactive", "--save_path", "inter",
                                                    "--infer_steps", 2, "--video_length", 1, "--video_size", 32, 32],
                          tmp_path, stdin="a red fox --d 3\n# a comment\nbad one --f 6\na blue owl --d 4\n")
    assert rc == 1, log  # one line was bad, the others rendered
    assert "stdin line 3: --f must be 1 + 4k frames" in log
    videos = sorted(p.name.split("_", 1)[1] for p in (tmp_path / "inter").glob("*.mp4"))
    assert videos == ["00_seed3.mp4", "01_seed4.mp4"]


# ---- outputs, latents read back, merged models, release folders ---------------------------------------------


def test_output_types_and_latents_decoded_again(tiny, tmp_path, caplog):
    sets, _ = tiny
    s = sets["t2v-tiny"]
    base = [*_models(s), "--prompt", "a cat --d 9", "--infer_steps", 2, "--video_length", 5, "--video_size", 32, 32]
    for kind in ("video", "images", "latent", "latent_images"):
        rc, log = _run([*base, "--output_type", kind, "--save_path", tmp_path / kind, "--output_name", "o"], caplog)
        assert rc == 0, log
    names = {kind: sorted(p.name for p in (tmp_path / kind).iterdir()) for kind in ("video", "images", "latent")}
    assert names == {"video": ["o_00_seed9.json", "o_00_seed9.mp4", "o_00_seed9.png"],
                     "images": ["o_00_seed9", "o_00_seed9.json"],
                     "latent": ["o_00_seed9.json", "o_00_seed9_latent.safetensors"]}
    frames = sorted((tmp_path / "latent_images" / "o_00_seed9").glob("*.png"))
    assert len(frames) == 5
    rc, log = _run(["--task", "t2v-tiny", "--vae", s.vae, "--latent_path",
                    tmp_path / "latent" / "o_00_seed9_latent.safetensors", "--output_type", "images", "--save_path",
                    tmp_path / "decoded", "--output_name", "d"], caplog)
    assert rc == 0 and "loaded t2v-tiny" not in log, log  # the VAE alone
    decoded = sorted((tmp_path / "decoded" / "d_o_00_seed9_latent").glob("*.png"))
    assert [p.read_bytes() for p in decoded] == [p.read_bytes() for p in frames]  # the same pixels
    sidecar = _sidecar(tmp_path / "decoded")
    assert (sidecar["settings"]["seed"], sidecar["settings"]["prompt"]) == ("9", "a cat")
    rc, log = _run([*base, "--output_type", "latent", "--no_metadata", "--save_path", tmp_path / "bare"], caplog)
    (latent,) = (tmp_path / "bare").iterdir()  # no sidecar
    with safe_open(str(latent), framework="pt") as fh:
        assert not fh.metadata()
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x00" * 16)
    rc, log = _run(["--task", "t2v-tiny", "--vae", s.vae, "--latent_path", bad, tmp_path / "none.safetensors",
                    "--save_path", tmp_path / "d2"], caplog)
    assert rc == 1 and "bad.safetensors: not a readable latent file" in log and "none.safetensors does not exist" in log


def test_save_merged_model(tiny, tmp_path, caplog):
    from library.lora_tools.merge import merge_into_dit

    sets, loras = tiny
    s = sets["t2v-tiny"]
    low, high = loras / "style_low_noise.safetensors", loras / "style_high_noise.safetensors"
    rc, log = _run([*_models(s), "--lora_weight", low, "--lora_multiplier", 0.5, "--lora_weight_high_noise", high,
                    "--exclude_patterns", "ffn", "--save_merged_model", tmp_path / "merged.safetensors"], caplog)
    assert rc == 0, log
    assert sorted(p.name for p in tmp_path.glob("merged*")) == ["merged_high_noise.safetensors",
                                                                 "merged_low_noise.safetensors"]
    reference = merge_into_dit(s.dit, [(low, 0.5)], tmp_path / "ref.safetensors", "bf16", expert="low_noise",
                               patterns=[(None, "ffn")])
    got, want = load_file(str(tmp_path / "merged_low_noise.safetensors")), load_file(str(reference.output))
    assert all(torch.equal(got[k], want[k]) for k in want)
    base = load_file(str(s.dit))
    assert torch.equal(got["blocks.0.ffn.0.weight"], base["blocks.0.ffn.0.weight"].bfloat16())  # excluded
    assert not torch.equal(got["blocks.0.self_attn.q.weight"], base["blocks.0.self_attn.q.weight"].bfloat16())
    assert not list(tmp_path.glob("*.mp4"))


def test_ckpt_dir_and_musubi_tasks(tiny, tmp_path, caplog):
    """An official release folder fills the model paths; t2i-14B is its own (1-frame) task."""
    from library.sampling.commands import generate_parser
    from library.sampling.musubi import normalise

    sets, _ = tiny
    s = sets["t2v-tiny"]
    release = tmp_path / "Wan2.2-T2V-tiny"
    for sub, src in (("low_noise_model", s.dit), ("high_noise_model", s.dit_high_noise)):
        (release / sub).mkdir(parents=True)
        os.symlink(src, release / sub / "diffusion_pytorch_model.safetensors")
    os.symlink(s.vae, release / "Wan2.1_VAE.pth")
    os.symlink(s.t5, release / "models_t5_umt5-xxl-enc-bf16.pth")
    os.symlink(s.tokenizer.parent, release / "google")
    rc, log = _run(["--task", "t2v-tiny", "--ckpt_dir", release, "--prompt", "a cat --d 1", "--infer_steps", 1,
                    "--video_length", 1, "--video_size", 32, 32, "--save_path", tmp_path / "out"], caplog)
    assert rc == 0, log
    files = _sidecar(tmp_path / "out")["models"]
    assert files["dit"].endswith("low_noise_model") and files["dit_high_noise"].endswith("high_noise_model")
    assert files["vae"].endswith("Wan2.1_VAE.pth") and files["t5"].endswith("models_t5_umt5-xxl-enc-bf16.pth")
    args = generate_parser().parse_args(["--task", "t2i-14B", "--prompt", "x", "--lazy_loading", "--compile_args",
                                         "inductor", "max-autotune-no-cudagraphs", "False", "True"])
    assert normalise(args) == []
    assert (args.task, args.offload_inactive_dit) == ("t2i-14B", True)
    assert (args.compile_backend, args.compile_mode, args.compile_dynamic, args.compile_fullgraph) == \
        ("inductor", "max-autotune-no-cudagraphs", "false", True)
    assert generate_parser().parse_args(["--prompt", "x"]).task == "t2v-14B"  # musubi's default task


def test_image_path_starts_an_i2v_video(tiny, tmp_path, caplog):
    import cv2
    import numpy as np

    sets, _ = tiny
    cv2.imwrite(str(tmp_path / "start.png"), np.full((40, 40, 3), 120, np.uint8))
    rc, log = _run([*_models(sets["i2v-tiny"]), "--image_path", tmp_path / "start.png", "--prompt", "a cat --d 2",
                    "--infer_steps", 1, "--video_length", 1, "--video_size", 32, 32, "--save_path", tmp_path / "o"],
                   caplog)
    assert rc == 0, log
    assert _sidecar(tmp_path / "o")["settings"]["image"] == str(tmp_path / "start.png")

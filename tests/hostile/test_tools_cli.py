"""The tools in tools/ and generate_video_wan.py against bad files and bad arguments: damaged, empty or
cut LoRA files, a DiT that is a pickle running a command or holds NaN, numbers that cannot mean anything
(a strength of nan, -24 GiB of memory, a height of 0), unknown tasks, folders without what the tool needs.
Each is one message naming the file, flag or item and what to do, exit status 2 and no traceback (argparse
reports a bad flag value the same way); nothing is written. A render that comes out NaN is not saved."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from library.wan.variants import VARIANTS

from . import model_files as mf
from .conftest import REPO, assert_refused, run_tool

LORA_UNREADABLE = ("not a readable .safetensors LoRA file ({why}); the file is damaged, truncated or not a LoRA: "
                   "export or download it again")
REFUSED = ("refused: unpickling it would import posix.system (code, not weights), so it was not loaded; a model "
           "file holds tensors only: use the model's .safetensors release, or a file from a source you trust")
TASKS = ", ".join(sorted({v.name for v in VARIANTS.values()}))  # every registered task, in the message's order


def _cut_lora(f: Path) -> Path:
    return mf.truncated(mf.tiny_lora(f / "whole.safetensors"), f / "cut.safetensors")


# name: (tool, its arguments from (folder, models), the message, formatted with folder=...)
CASES = {
    "convert_lora: random bytes": (
        "convert_lora", lambda f, m: [mf.random_bytes(f / "l.safetensors"), f / "o.safetensors", "--format", "comfyui"],
        "error: {folder}/l.safetensors: " + LORA_UNREADABLE.format(why="header too large")),
    "convert_lora: zero bytes": (
        "convert_lora", lambda f, m: [mf.zero_bytes(f / "l.safetensors"), f / "o.safetensors", "--format", "comfyui"],
        "error: {folder}/l.safetensors: " + LORA_UNREADABLE.format(why="empty: 0 bytes")),
    "convert_lora: truncated": (
        "convert_lora", lambda f, m: [_cut_lora(f), f / "o.safetensors", "--format", "comfyui"],
        "error: {folder}/cut.safetensors: " + LORA_UNREADABLE.format(why="incomplete metadata, file not fully "
                                                                        "covered")),
    "convert_lora: no such file": (
        "convert_lora", lambda f, m: [f / "gone.safetensors", f / "o.safetensors", "--format", "comfyui"],
        "error: {folder}/gone.safetensors: no such file or folder; check the path"),
    "convert_lora: a DiT, not a LoRA": (
        "convert_lora", lambda f, m: [m.dit, f / "o.safetensors", "--format", "comfyui"],
        "keys are not LoRA down / up / alpha tensors (e.g. ['blocks.0.cross_attn.k.bias', "),
    "resize_lora: random bytes": (
        "resize_lora", lambda f, m: ["--model", mf.random_bytes(f / "l.safetensors"), "--save_to", f / "o.safetensors",
                                     "--new_rank", "1"],
        "error: {folder}/l.safetensors: " + LORA_UNREADABLE.format(why="header too large")),
    "resize_lora: --new_rank 0": (
        "resize_lora", lambda f, m: ["--model", mf.tiny_lora(f / "l.safetensors"), "--save_to", f / "o.safetensors",
                                     "--new_rank", "0"],
        "argument --new_rank: '0' must be 1 or more"),
    "resize_lora: --new_alpha nan": (
        "resize_lora", lambda f, m: ["--model", mf.tiny_lora(f / "l.safetensors"), "--save_to", f / "o.safetensors",
                                     "--new_rank", "1", "--new_alpha", "nan"],
        "argument --new_alpha: 'nan' must be a finite number"),
    "merge_lora: --strengths nan": (
        "merge_lora", lambda f, m: ["--dit", m.dit, "--loras", mf.tiny_lora(f / "l.safetensors"), "--strengths", "nan",
                                    "--save_to", f / "o.safetensors"],
        "argument --strengths/--ratios: 'nan' must be a finite number"),
    "merge_lora: a DiT that runs a command": (
        "merge_lora", lambda f, m: ["--dit", mf.code_pickle(f / "evil.pth", f / "PWNED", zipped=True), "--loras",
                                    mf.tiny_lora(f / "l.safetensors"), "--save_to", f / "o.safetensors"],
        "error: {folder}/evil.pth: " + REFUSED),
    "merge_lora: a truncated LoRA": (
        "merge_lora", lambda f, m: ["--merge_into_lora", "--loras", _cut_lora(f), "--save_to", f / "o.safetensors"],
        "error: {folder}/cut.safetensors: " + LORA_UNREADABLE.format(why="incomplete metadata, file not fully "
                                                                        "covered")),
    "extract_lora: an empty base": (
        "extract_lora", lambda f, m: ["--model_org", mf.zero_bytes(f / "base.safetensors"), "--model_tuned", m.dit,
                                      "--save_to", f / "o.safetensors"],
        "error: {folder}/base.safetensors: is empty (0 bytes), too short to be a safetensors file"),
    "check_lora: an unknown task": (
        "check_lora", lambda f, m: [mf.tiny_lora(f / "l.safetensors"), "--task", "t2v-A15B"],
        f"error: unknown WAN task 't2v-A15B'; valid tasks: {TASKS}"),
    "check_lora: a --dit of random bytes": (
        "check_lora", lambda f, m: [mf.tiny_lora(f / "l.safetensors"), "--dit", mf.random_bytes(f / "d.safetensors")],
        "error: {folder}/d.safetensors: not a safetensors file, or truncated"),
    "plan_memory: --vram_gb -24": (
        "plan_memory", lambda f, m: ["--vram_gb", "-24"], "argument --vram_gb: '-24' must be greater than 0"),
    "plan_memory: --height 0": (
        "plan_memory", lambda f, m: ["--vram_gb", "24", "--height", "0"], "argument --height: '0' must be 1 or more"),
    "plan_memory: --vram_gb nan": (
        "plan_memory", lambda f, m: ["--vram_gb", "nan"], "argument --vram_gb: 'nan' must be a finite number"),
    "plan_memory: an unknown task": (
        "plan_memory", lambda f, m: ["--vram_gb", "24", "--task", "t2v-A15B"],
        f"error: unknown WAN task 't2v-A15B'; valid tasks: {TASKS}"),
    "plan_memory: a config that is not TOML": (
        "plan_memory", lambda f, m: ["--vram_gb", "24", "--config_file", mf.random_bytes(f / "c.toml", 64)],
        "error: {folder}/c.toml: "),
    "pick_checkpoint: a folder without checkpoints": (
        "pick_checkpoint", lambda f, m: [f], "error: {folder}: no checkpoints (NAME.safetensors, "),
    "compare_checkpoints: a folder without checkpoints": (
        "compare_checkpoints", lambda f, m: [f, "--task", "t2v-tiny", "--dit", m.dit, "--vae", m.vae, "--t5", m.t5],
        "{folder}: no checkpoints"),
    "caption: an input that does not exist": (
        "caption", lambda f, m: [f / "missing", "--model", f], "error: {folder}/missing does not exist"),
    "caption: a model folder without config.json": (
        "caption", lambda f, m: [mf.zero_bytes(f / "a.png"), "--model", f],
        "error: {folder}: no config.json; pass a transformers model folder or a hub id"),
    "caption: --batch_size 0": (
        "caption", lambda f, m: [f, "--model", f, "--batch_size", "0"], "argument --batch_size: '0' must be 1 or more"),
    "sweep: a --vary key that does not exist": (
        "sweep", lambda f, m: ["--config_file", _sweep_config(f, m), "--vary", "learnin_rate=1e-4,2e-4"],
        "error: sweep variant learnin_rate-1e-4: command line: unknown key 'learnin_rate'; did you mean "
        "'learning_rate'?"),
    "sweep: nothing to sweep": (
        "sweep", lambda f, m: ["--config_file", _sweep_config(f, m)], "error: nothing to sweep: pass --preset_sweep"),
    "sweep: a variant's value the config refuses": (
        "sweep", lambda f, m: ["--config_file", _sweep_config(f, m), "--vary", "learning_rate=1e-4,-1"],
        "`learning_rate` = -1.0 must be greater than 0"),
    "benchmark_wan: --frames 0": (
        "benchmark_wan", lambda f, m: ["--frames", "0"], "argument --frames: '0' must be 1 or more"),
    "benchmark_data: --num_workers -1": (
        "benchmark_data", lambda f, m: ["--num_workers", "-1"], "argument --num_workers: '-1' must be 0 or more"),
    "benchmark_training: an unknown task": (
        "benchmark_training", lambda f, m: ["--task", "t2v-A15B", "--steps", "1"],
        f"error: unknown WAN task 't2v-A15B'; valid tasks: {TASKS}"),
}


def _sweep_config(folder: Path, models) -> Path:
    path = folder / "base.toml"
    path.write_text(f'task = "t2v-tiny"\ndit = "{Path(models.dit).as_posix()}"\noutput_dir = "{folder.as_posix()}"\n'
                    f'dataset_config = "{(folder / "dataset.toml").as_posix()}"\n')
    return path


@pytest.mark.parametrize("case", CASES, ids=list(CASES))
def test_a_tool_refuses_bad_input(tiny_models, tmp_path, case):
    tool, args, message = CASES[case]
    work = tmp_path / "work"
    work.mkdir()
    result = run_tool(tool, *args(work, tiny_models), cwd=tmp_path)
    assert_refused(result, message.format(folder=work))
    assert not list(work.glob("o*.safetensors")) and not (work / "PWNED").exists()


def _generate(models, folder: Path, *extra) -> subprocess.CompletedProcess:
    args = ["--task", models.task, "--dit", models.dit, "--dit_high_noise", models.dit_high_noise, "--vae",
            models.vae, "--t5", models.t5, "--tokenizer", models.tokenizer, "--output_dir", folder / "out",
            "--prompt", "a cat walks --w 32 --h 32 --f 5 --s 2 --d 3", *extra]
    return subprocess.run([sys.executable, str(REPO / "generate_video_wan.py"), *map(str, args)], cwd=folder,
                          capture_output=True, text=True, timeout=300)


def test_generation_refuses_a_dit_with_nan_weights(tiny_models, tmp_path):
    bad = mf.with_value(tiny_models.dit_high_noise, tmp_path / "nan.safetensors", "head.head.weight")
    result = _generate(tiny_models, tmp_path, "--dit_high_noise", bad)
    assert_refused(result, f"{bad}: tensor 'head.head.weight' holds 1 NaN and 0 infinite values")
    assert not (tmp_path / "out").exists()


def test_a_render_that_comes_out_nan_is_not_saved(tiny_models, tmp_path):
    lora = mf.tiny_lora(tmp_path / "diverged.safetensors", up=float("nan"))
    result = _generate(tiny_models, tmp_path, "--lora", lora)
    assert_refused(result, "--prompt 1: the latents of 'a cat walks' hold NaN or infinite values, so nothing was "
                           "saved for it", status=1)
    assert not list(tmp_path.rglob("*.mp4"))

"""The end-to-end demo on the CPU: train a LoRA on a tiny WAN 2.2-architecture model (two experts, random
weights written in the official formats) from a synthetic captioned dataset, with the real tools:

    1. tiny models and a dataset of clips and stills  (library/wan/tiny.py, library/prep/demo_dataset.py)
    2. tools/cache_latents.py, tools/cache_text_encoder_outputs.py
    3. train_network_wan.py --config_file demo_output/demo_lora.toml   (with samples during training)
    4. generate_video_wan.py: base model and the LoRA at strengths 0.5 / 0.7 / 0.9 / 1.0, side by side
    5. tools/pick_checkpoint.py, tools/report.py (report.html with the strength sweep), tools/check_lora.py on
       the two final files, then tools/registry.py add: version 1 in a production registry
    6. tools/sweep.py: three learning rates, one step each, judged together in sweep.html

    python demo.py [--output demo_output] [--steps 60]

Outputs: OUTPUT/train/ holds one LoRA per expert (`demo_lora_high_noise.safetensors`,
`demo_lora_low_noise.safetensors`), step checkpoints, loss.csv and the plots, the resolved config, sample/
(videos rendered during training), strength_sweep/ (the strength-sweep grid) and report.html, which shows
all of it; OUTPUT/registry/ the versioned pair with its training_notes.md; OUTPUT/sweep/ three short runs
and sweep.html.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent
sys.path.insert(0, str(REPO))  # our `library`, not sd-scripts' package of that name


def run(args: list[str], what: str) -> None:
    print(f"\n== {what}: {' '.join(Path(a).name if a.endswith('.py') else a for a in args)}", flush=True)
    subprocess.run([sys.executable, *args], check=True)


PROMPTS = ("# Kohya sample-prompt syntax: --w/--h size, --f frames, --d seed, --s steps\n"
           "a colourful abstract painting, the camera pans right slowly --w 64 --h 64 --f 9 --d 1 --s 8\n"
           "a mosaic of discs and squares, still image --w 64 --h 64 --f 1 --d 2 --s 8\n")


def write_training_toml(path: Path, models, dataset: Path, out: Path, steps: int, prompts: Path | None) -> Path:
    path.write_text(
        "# Written by demo.py: a flat TOML as the Kohya GUIs write it.\n"
        'task = "t2v-tiny"\n'
        f'dit = "{models.dit.as_posix()}"\n'
        f'dit_high_noise = "{models.dit_high_noise.as_posix()}"\n'
        f'dataset_config = "{dataset.as_posix()}"\n'
        f'output_dir = "{out.as_posix()}"\n'
        'output_name = "demo_lora"\n'
        'network_module = "networks.lora_wan"\n'
        "network_dim = 8\nnetwork_alpha = 8\n"
        'optimizer_type = "AdamW"\nlearning_rate = 2e-3\n'
        'lr_scheduler = "cosine_with_restarts"\nlr_scheduler_num_cycles = 2\nlr_warmup_steps = 0.05\n'
        f"max_train_steps = {steps}\nsave_every_n_steps = {max(1, steps // 2)}\nsave_state = true\n"
        'timestep_sampling = "shift"\ndiscrete_flow_shift = 3.0\n'
        'mixed_precision = "no"\ngradient_checkpointing = true\nseed = 42\nmax_data_loader_n_workers = 0\n'
        f"validate_every_n_steps = {max(1, steps // 3)}\n"
        + (f'vae = "{models.vae.as_posix()}"\nt5 = "{models.t5.as_posix()}"\n'
           f'sample_prompts = "{prompts.as_posix()}"\nsample_every_n_steps = {max(1, steps // 2)}\n' if prompts else "")
    )
    return path


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", default="demo_output")
    parser.add_argument("--steps", type=int, default=60)
    args = parser.parse_args()
    start = time.perf_counter()
    out = Path(args.output).resolve()

    from library.prep.demo_dataset import write_demo_dataset
    from library.wan.tiny import write_tiny_model_set

    models = write_tiny_model_set(out / "models", "t2v-tiny")
    dataset = write_demo_dataset(out / "dataset", clips=8, images=8, width=64, height=64, frames=17)
    validation = out / "validation"  # two of the stills as a validation set: the report's validation curve
    for name in ("img_000", "img_001"):
        for kind, ext in (("images", ".png"), ("captions", ".txt")):
            (validation / kind).mkdir(parents=True, exist_ok=True)
            shutil.copyfile(dataset.parent / kind / f"{name}{ext}", validation / kind / f"{name}{ext}")
    dataset.write_text(dataset.read_text() + (
        "\n[[validation_datasets]]\n"
        f'image_directory = "{(validation / "images").as_posix()}"\n'
        f'cache_directory = "{(validation / "cache").as_posix()}"\n'))
    print(f"tiny models in {out / 'models'}, dataset in {dataset.parent}")
    run([str(REPO / "tools" / "cache_latents.py"), "--dataset_config", str(dataset), "--vae", str(models.vae),
         "--task", "t2v-tiny", "--no_progress"], "cache latents")
    run([str(REPO / "tools" / "cache_text_encoder_outputs.py"), "--dataset_config", str(dataset), "--t5",
         str(models.t5), "--tokenizer", str(models.tokenizer), "--task", "t2v-tiny", "--no_progress"],
        "cache text encoder outputs")
    prompts = out / "prompts.txt"
    prompts.write_text(PROMPTS)
    toml = write_training_toml(out / "demo_lora.toml", models, dataset, out / "train", args.steps, prompts)
    run([str(REPO / "train_network_wan.py"), "--config_file", str(toml)], "train")
    train = out / "train"
    run([str(REPO / "generate_video_wan.py"), "--task", "t2v-tiny", "--dit", str(models.dit), "--dit_high_noise",
         str(models.dit_high_noise), "--vae", str(models.vae), "--t5", str(models.t5), "--from_file", str(prompts),
         "--lora", str(train / "demo_lora_high_noise.safetensors"),
         "--lora", str(train / "demo_lora_low_noise.safetensors"),
         "--lora_strength_sweep", "0.5,0.7,0.9,1.0", "--compare_base", "--output_dir", str(train / "strength_sweep"),
         "--output_name", "demo"], "strength sweep")
    run([str(REPO / "tools" / "pick_checkpoint.py"), str(train)], "which checkpoint to test first")
    run([str(REPO / "tools" / "report.py"), str(train)], "report.html with the strength sweep")
    pair = [str(train / "demo_lora_high_noise.safetensors"), str(train / "demo_lora_low_noise.safetensors")]
    run([str(REPO / "tools" / "check_lora.py"), *pair, "--task", "t2v-tiny"], "check the LoRA files")
    registry = out / "registry"
    shutil.rmtree(registry, ignore_errors=True)  # the demo's own registry starts empty on every run
    run([str(REPO / "tools" / "registry.py"), "add", *pair, "--root", str(registry), "--type", "character",
         "--subject", "demo", "--changes", "first version", "--dataset", "synthetic clips and stills"],
        "version it for production")
    sweep = out / "sweep"
    shutil.rmtree(sweep, ignore_errors=True)  # a fresh sweep on every run (a rerun would skip finished variants)
    # one step each, no samples, kept short: the demo shows the machinery; a real sweep runs whole trainings
    base = write_training_toml(out / "sweep_base.toml", models, dataset, sweep, 1, None)
    run([str(REPO / "tools" / "sweep.py"), "--config_file", str(base), "--vary", "learning_rate=2e-3,2e-2,1e-1",
         "--set", "lr_warmup_steps=0"], "A/B test of three learning rates")
    loras = sorted(p.name for p in train.glob("demo_lora_*noise.safetensors"))
    print(f"\ndone in {time.perf_counter() - start:.0f} s:\n  LoRAs: {', '.join(loras)} in {train}\n"
          f"  the run's report (plots, saves, samples, strength sweep): {train / 'report.html'}\n"
          f"  strength sweep (base, 0.5, 0.7, 0.9, 1.0): {train / 'strength_sweep'}\n"
          f"  three learning rates compared: {sweep / 'sweep.html'}\n"
          f"  registry with the first version and its training notes: {registry}\n"
          "(the weights are random: the videos are structured noise, and the loss monitor may report a plateau,\n"
          " which is true of a random tiny model after a few dozen steps; with real weights both mean something)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The end-to-end demo on the CPU: train a LoRA on a tiny WAN 2.2-architecture model (two experts, random
weights written in the official formats) from a synthetic captioned dataset, with the real tools:

    1. tiny models and a dataset of clips and stills  (library/wan/tiny.py, library/prep/demo_dataset.py)
    2. tools/cache_latents.py, tools/cache_text_encoder_outputs.py
    3. train_network_wan.py --config_file demo_output/demo_lora.toml

    python demo.py [--output demo_output] [--steps 60]

Outputs land in OUTPUT/train/: one LoRA per expert (`demo_lora_high_noise.safetensors`,
`demo_lora_low_noise.safetensors`), step checkpoints, loss.csv and loss.png, the resolved config.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent
sys.path.insert(0, str(REPO))  # our `library`, not sd-scripts' package of that name


def run(args: list[str], what: str) -> None:
    print(f"\n== {what}: {' '.join(Path(a).name if a.endswith('.py') else a for a in args)}", flush=True)
    subprocess.run([sys.executable, *args], check=True)


def write_training_toml(path: Path, models, dataset: Path, out: Path, steps: int) -> Path:
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
    print(f"tiny models in {out / 'models'}, dataset in {dataset.parent}")
    run([str(REPO / "tools" / "cache_latents.py"), "--dataset_config", str(dataset), "--vae", str(models.vae),
         "--task", "t2v-tiny", "--no_progress"], "cache latents")
    run([str(REPO / "tools" / "cache_text_encoder_outputs.py"), "--dataset_config", str(dataset), "--t5",
         str(models.t5), "--tokenizer", str(models.tokenizer), "--task", "t2v-tiny", "--no_progress"],
        "cache text encoder outputs")
    toml = write_training_toml(out / "demo_lora.toml", models, dataset, out / "train", args.steps)
    run([str(REPO / "train_network_wan.py"), "--config_file", str(toml)], "train")
    loras = sorted(p.name for p in (out / "train").glob("demo_lora_*noise.safetensors"))
    print(f"\ndone in {time.perf_counter() - start:.0f} s: {', '.join(loras)}; loss curve {out / 'train' / 'loss.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Training-loop overhead: our full step (data loader, expert routing, keyed noise, LoRA hooks, logging,
optimizer, schedule) against a bare PyTorch loop doing the same maths on the same model, in one run.

    python tools/benchmark_training.py [--steps 60] [--task t2v-tiny] [--size 64] [--frames 17] [--threads 1]

Builds tiny random-weight models and a cached synthetic dataset in a temp folder first (about 20 s).
Prints seconds per step for both loops and the overhead; target <= 10%.

Both loops run on one CPU thread by default (`OMP_NUM_THREADS=1` before torch is imported, and
`torch.set_num_threads`): with a thread pool per process the tiny model's step time is decided by how the
machine's cores happen to be shared at the moment, and the ratio of two such numbers is noise.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")  # before torch is imported (see above); --threads sets the count
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # our `library`, never another package of that name (sd-scripts has one)


def prepare(folder: Path, task: str, size: int, frames: int):
    import torch

    from library.data.dataset_config import load_dataset_config
    from library.data.latent_caching import cache_latents
    from library.data.text_caching import cache_text_encoder_outputs
    from library.prep.demo_dataset import write_demo_dataset
    from library.wan.tiny import write_tiny_model_set

    models = write_tiny_model_set(folder / "models", task)
    toml = write_demo_dataset(folder / "data", clips=8, images=0, width=size, height=size, frames=frames,
                              target_frames=(frames,))
    text = toml.read_text()
    toml.write_text(text[: text.index("[[datasets]]", text.index("[[datasets]]") + 1)])  # the clips only
    config = load_dataset_config(toml)
    cache_latents(config, models.vae, task=task, progress=False)
    cache_text_encoder_outputs(config, models.t5, tokenizer=models.tokenizer, dtype=torch.float32, progress=False)
    return models, toml


def ours(trainer, steps: int) -> float:
    """Seconds per optimizer step of the real loop (`Trainer.train`), after warm-up steps."""
    from tqdm import tqdm

    trainer.opt.total_steps = trainer.state.global_step + steps
    start = time.perf_counter()
    bar = tqdm(disable=True)
    while trainer.state.global_step < trainer.opt.total_steps:
        for batch in trainer.data.loader(trainer.state.epoch):
            loss = trainer.micro_step(batch)
            trainer.optimizer_step()
            trainer.after_step(loss, bar)
            if trainer.state.global_step >= trainer.opt.total_steps:
                break
        else:
            trainer.state.epoch += 1
    return (time.perf_counter() - start) / steps


def bare(trainer, steps: int) -> float:
    """The same maths with nothing around it: batches preloaded, one expert, torch.randn noise."""
    import torch

    expert = trainer.experts[0]
    batches = [b for b in trainer.data.loader(0)]
    params = [p for p in expert.network.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    start = time.perf_counter()
    for i in range(steps):
        batch = batches[i % len(batches)]
        x0 = batch["latents"]
        sigma = torch.rand(x0.shape[0])
        noise = torch.randn_like(x0)
        s = sigma.view(-1, 1, 1, 1, 1)
        pred = expert.model((1 - s) * x0 + s * noise, sigma * 1000, batch["context"])
        loss = ((pred - (noise - x0)) ** 2).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
    return (time.perf_counter() - start) / steps


def main(argv: list[str] | None = None) -> int:
    from library.errors import positive_int

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=positive_int, default=60)
    parser.add_argument("--task", default="t2v-tiny")
    parser.add_argument("--size", type=positive_int, default=64, help="frame width and height of the synthetic clips")
    parser.add_argument("--frames", type=positive_int, default=17)
    parser.add_argument("--rounds", type=positive_int, default=5,
                        help="interleaved rounds; the best of each loop is shown")
    parser.add_argument("--threads", type=positive_int, default=1, help="CPU threads for both loops (default 1)")
    args = parser.parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)

    import logging

    logging.disable(logging.WARNING)
    from library.config import config_from_dict, validate
    from library.training.trainer import Trainer

    with tempfile.TemporaryDirectory(prefix="wan_train_bench_") as tmp:
        folder = Path(tmp)
        models, toml = prepare(folder, args.task, args.size, args.frames)
        cfg = validate(config_from_dict({
            "task": args.task, "dit": str(models.dit), "dataset_config": str(toml), "output_dir": str(folder / "out"),
            "network_dim": 8, "network_alpha": 8, "learning_rate": 1e-4, "max_train_steps": 10**6, "seed": 1,
            "max_data_loader_n_workers": 0, "timestep_sampling": "uniform",
        }))
        trainer = Trainer(cfg)
        trainer.setup()
        ours(trainer, 5), bare(trainer, 5)  # warm-up both
        timings = {"ours": [], "bare": []}
        for _ in range(args.rounds):  # interleaved rounds: both loops see the same machine load
            timings["ours"].append(ours(trainer, args.steps))
            timings["bare"].append(bare(trainer, args.steps))
        trainer.cleanup()
    o, b = min(timings["ours"]), min(timings["bare"])
    print(f"task {args.task}, clips {args.size}x{args.size}x{args.frames}, {args.steps} steps x {args.rounds} rounds "
          f"(best), {args.threads} CPU thread{'s' if args.threads > 1 else ''}")
    print(f"our training loop: {o * 1000:.1f} ms/step")
    print(f"bare PyTorch loop: {b * 1000:.1f} ms/step")
    print(f"overhead: {(o / b - 1) * 100:+.1f}% (target <= 10%)")
    return 0


if __name__ == "__main__":
    from library.errors import run_cli

    sys.exit(run_cli(main))

"""The caching tools launched as two CPU processes with `torch.distributed.run`: each process caches its
own share, every item is cached exactly once, and the caches are the tensors a single process writes."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import torchrun

REPO = Path(__file__).resolve().parents[2]
SUMMARY = re.compile(r"^(latents|text encoder outputs): (\d+) cached, (\d+) reused \(fresh\), (\d+) skipped$", re.M)
LAUNCH_VARS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def run_tool(tool: str, args: list[str], processes: int, cwd: Path) -> list[tuple[str, int, int, int]]:
    """Run tools/`tool` in one process, or in `processes` CPU processes under torch.distributed.run;
    returns each process's summary line as (what, cached, reused, skipped)."""
    env = {k: v for k, v in os.environ.items() if k not in LAUNCH_VARS}
    # unbuffered, as on a terminal or under PYTHONUNBUFFERED: the summaries must not depend on buffering
    env.update(OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="", PYTHONUNBUFFERED="1")
    launch = [sys.executable]
    if processes > 1:
        launch = torchrun(processes)
    result = subprocess.run([*launch, str(REPO / "tools" / tool), *args, "--no_progress"], cwd=cwd, env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    return [(what, int(c), int(r), int(s)) for what, c, r, s in SUMMARY.findall(result.stdout)]


def make_dataset(root: Path, source: Path | None = None) -> Path:
    """The tiny demo dataset at `root`; a byte copy of `source`'s media when given (same items, own caches)."""
    from library.prep.demo_dataset import write_demo_dataset

    if source is None:
        return write_demo_dataset(root, clips=3, images=3, width=32, height=32, frames=9)
    shutil.copytree(source, root)
    toml = root / "dataset.toml"
    toml.write_text(toml.read_text().replace(source.as_posix(), root.as_posix()))
    return toml


def cache_files(root: Path) -> dict[str, Path]:
    return {p.relative_to(root).as_posix(): p for p in sorted((root / "cache").rglob("*.safetensors"))}


def cache_both(toml: Path, models, processes: int, cwd: Path):
    latents = run_tool("cache_latents.py", ["--dataset_config", str(toml), "--vae", str(models.vae),
                                            "--task", "t2v-tiny"], processes, cwd)
    text = run_tool("cache_text_encoder_outputs.py", ["--dataset_config", str(toml), "--t5", str(models.t5),
                                                      "--tokenizer", str(models.tokenizer)], processes, cwd)
    return latents, text


@pytest.mark.slow
def test_two_cpu_processes_cache_each_item_once_and_match_one_process(tmp_path, tiny_models):
    from safetensors.torch import load_file

    models = tiny_models["t2v-tiny"]
    single_toml = make_dataset(tmp_path / "single")
    split_toml = make_dataset(tmp_path / "split", source=tmp_path / "single")
    (one_latents,), (one_text,) = cache_both(single_toml, models, 1, tmp_path)
    two_latents, two_text = cache_both(split_toml, models, 2, tmp_path)

    single, split = cache_files(tmp_path / "single"), cache_files(tmp_path / "split")
    latent_files = [name for name in single if "/t5/" not in name]
    text_files = [name for name in single if "/t5/" in name]
    assert one_latents == ("latents", 6, 0, 0) and len(latent_files) == 6  # 3 clips + 3 stills
    assert one_text[0] == "text encoder outputs" and one_text[1] > 1 and one_text[2:] == (0, 0)
    # each of the two processes cached its own half, and the halves add up to the single run: nothing twice
    assert sorted(two_latents) == [("latents", 3, 0, 0)] * 2
    assert len(two_text) == 2 and all(what == one_text[0] and cached > 0 for what, cached, _, _ in two_text)
    assert sum(s[1] for s in two_text) == one_text[1] and sum(s[2] + s[3] for s in two_text) == 0
    assert len(text_files) >= one_text[1]  # a caption shared by both datasets is written into both

    assert split.keys() == single.keys()
    for name in single:
        ours, reference = load_file(split[name]), load_file(single[name])
        assert ours.keys() == reference.keys()
        assert all(ours[key].equal(reference[key]) for key in ours), name


def _report_in_process(rank: int, world_size: int, folder: str) -> None:
    """One of two gloo processes: run_and_report on a summary of its own, stdout captured to a file."""
    import contextlib
    import io

    import torch.distributed as dist

    from library.data.caching_args import run_and_report
    from library.data.latent_caching import CacheSummary

    dist.init_process_group("gloo", init_method=f"file://{folder}/store", rank=rank, world_size=world_size)
    try:
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            summary = CacheSummary("latents", cached=rank + 1)
            if rank == 1:
                summary.errors.append("dataset 2: no usable item")
            code = run_and_report(lambda: summary)
        Path(folder, f"rank{rank}.txt").write_text(f"{code}\n{out.getvalue()}")
    finally:
        if dist.is_initialized():  # run_and_report shuts the group down itself once the reports are gathered
            dist.destroy_process_group()


def test_rank_zero_prints_every_process_summary_in_one_write(tmp_path):
    """Two processes printing their summaries on one unbuffered stdout interleave text and newlines
    (the lines then match nothing); rank 0 prints them all instead, in rank order."""
    import torch.multiprocessing as mp

    mp.start_processes(_report_in_process, args=(2, str(tmp_path)), nprocs=2, start_method="spawn")
    code0, *lines0 = (tmp_path / "rank0.txt").read_text().splitlines()
    code1, *lines1 = (tmp_path / "rank1.txt").read_text().splitlines()
    assert lines1 == [] and code1 == "1"
    assert code0 == "1"  # a failure on any process is rank 0's exit status too
    assert lines0 == ["latents: 1 cached, 0 reused (fresh), 0 skipped",
                      "latents: 2 cached, 0 reused (fresh), 0 skipped", "  ERROR dataset 2: no usable item"]

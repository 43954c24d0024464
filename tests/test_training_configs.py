"""The shipped LoRA training configs (training_configs/): each parses and validates as written, its
dataset config exists, and the memory planner says its settings fit the card its name states at the
dataset's largest item (resolution x frames), with the preset's rank and the config's optimizer."""

from __future__ import annotations

import re
import tomllib

import pytest

from library.config import load_config, validate
from library.training.planning.lora import CUDA_CONTEXT_GIB, FRAGMENTATION, Settings, Workload, estimate
from library.wan.variants import get_variant
from tests.helpers import REPO

CONFIGS = sorted((REPO / "training_configs").glob("*.toml"))


def largest_item(dataset_toml) -> tuple[int, int, int, int]:
    """(width, height, frames, batch) of the most expensive dataset in a dataset TOML."""
    data = tomllib.loads(dataset_toml.read_text())
    general = data.get("general", {})
    best = None
    for ds in data.get("datasets", []):
        merged = {**general, **ds}
        res = merged.get("resolution", [960, 544])
        width, height = (res, res) if isinstance(res, int) else res
        frames = max(merged.get("target_frames", [1])) if "video_directory" in ds or "video_jsonl_file" in ds else 1
        item = (width, height, frames, merged.get("batch_size", 1))
        if best is None or item[0] * item[1] * item[2] * item[3] > best[0] * best[1] * best[2] * best[3]:
            best = item
    return best


def test_there_are_configs_for_every_wan22_model():
    tasks = {tomllib.loads(p.read_text())["task"] for p in CONFIGS}
    assert {"t2v-A14B", "i2v-A14B", "ti2v-5B"} <= tasks


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_config_is_valid_and_fits_its_card(path):
    dataset = REPO / tomllib.loads(path.read_text())["dataset_config"]
    assert dataset.is_file(), f"{path.name}: {dataset} is not a shipped dataset config"
    cfg = validate(load_config(["--config_file", str(path), "--dataset_config", str(dataset)]))
    card = int(re.search(r"_(\d+)gb\.toml$", path.name).group(1))
    width, height, frames, batch = largest_item(dataset)
    m, n = cfg.memory, cfg.network
    experts = 2 if cfg.model.dit_high_noise else 1
    workload = Workload(get_variant(cfg.model.task), width, height, frames, batch, n.network_dim,
                        cfg.optimizer.optimizer_type, experts)
    settings = Settings(fp8=m.fp8_base, checkpointing=m.gradient_checkpointing,
                        offload_activations=m.gradient_checkpointing_cpu_offload, blocks_to_swap=m.blocks_to_swap,
                        offload_inactive=m.offload_inactive_dit)
    total = estimate(workload, settings).total
    budget = (card - CUDA_CONTEXT_GIB) * FRAGMENTATION
    assert total <= budget, f"{path.name}: {total:.1f} GiB estimated > {budget:.1f} usable on {card} GB"
    assert cfg.run.preset and cfg.loop.mixed_precision == "bf16"

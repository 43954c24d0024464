"""tools/check_dataset.py and tools/cache_latents.py against hostile media and dataset TOMLs: a bad item is
skipped with its reason (the rest is checked or cached), a bad dataset TOML stops the tool with the dataset
and key named, and nothing prints a traceback."""

from __future__ import annotations

from pathlib import Path

import pytest

from .conftest import add_image, assert_refused, copy_demo, dangling_link, run_tool
from .media import huge_png, png_64x48, png_header_bomb

LIMIT = ("is over the limit of 178,956,970 pixels per image or frame (a decompression bomb, or far larger than "
         "training needs): downscale it, or raise WAN_MAX_IMAGE_PIXELS if it is real")


def _config_line(old: str, new: str):
    def edit(root: Path) -> None:
        toml = root / "dataset.toml"
        toml.write_text(toml.read_text().replace(old, new))
    return edit


def _cache_folder_is_a_file(root: Path) -> None:
    (root / "cache").write_text("a file where the cache folder should be")


# name: (make the bad input in the demo copy, environment, the file the message is about, its reason)
ITEMS = {
    "PNG header claiming 10^12 pixels": (
        lambda root: add_image(root, "bomb.png", png_header_bomb), {}, "images/bomb.png",
        f"1,000,000,000,000 pixels {LIMIT}"),
    "real 30000x30000 PNG": (
        lambda root: add_image(root, "huge.png", huge_png), {}, "images/huge.png", f"900,000,000 pixels {LIMIT}"),
    "dangling image link": (
        lambda root: add_image(root, "gone.png", dangling_link), {}, "images/gone.png",
        "is a symbolic link to {root}/images/deleted_original.png, which does not exist; fix or remove the link"),
    "limit lowered by the environment": (
        lambda root: add_image(root, "big.png", png_64x48), {"WAN_MAX_IMAGE_PIXELS": "2000"}, "images/big.png",
        "64x48 (3,072 pixels) is over the limit of 2,000 pixels per image or frame (a decompression bomb, or far "
        "larger than training needs): downscale it, or raise WAN_MAX_IMAGE_PIXELS if it is real"),
}

# name: (edit the demo copy, the message; both tools refuse the dataset TOML)
CONFIGS = {
    "resolution not a multiple of the bucket step": (
        _config_line("resolution = [32, 32]", "resolution = [60, 60]"),
        "dataset.toml: [[datasets]] #0 ({root}/images): resolution = [60, 60] is not a multiple of 16 (the WAN 2.1 "
        "VAE's stride 8 x the DiT patch 2): buckets would silently crop or shrink every item; use [48, 48] or "
        "[64, 64]"),
    "cache folder is a file": (
        _cache_folder_is_a_file,
        "dataset.toml: [[datasets]] #0 ({root}/images): cache_directory {root}/cache/images is inside {root}/cache, "
        "which is a file, not a folder (or a broken link); point cache_directory at a folder"),
}


@pytest.fixture(scope="module")
def item_runs(demo_source, tiny_models, tmp_path_factory):
    """run(env) -> (demo copy, check_dataset result, cache_latents result) for one demo copy holding every
    bad item of ITEMS with that environment: one run of each tool per environment, not per item."""
    done = {}

    def run(env: dict):
        key = tuple(sorted(env.items()))
        if key not in done:
            root = copy_demo(demo_source, tmp_path_factory.mktemp("items"))
            for make, case_env, _, _ in ITEMS.values():
                if case_env == env:
                    make(root)
            check = run_tool("check_dataset", "--dataset_config", root / "dataset.toml", env=env)
            cached = run_tool("cache_latents", "--dataset_config", root / "dataset.toml", "--vae", tiny_models.vae,
                              "--device", "cpu", "--no_progress", env=env)
            done[key] = root, check, cached
        return done[key]
    return run


@pytest.mark.parametrize("case", ITEMS, ids=list(ITEMS))
def test_check_dataset_reports_the_bad_item(item_runs, case):
    _, env, name, reason = ITEMS[case]
    root, result, _ = item_runs(env)
    output = assert_refused(result, f"ERROR   #0 {root / name}: {reason.format(root=root)}", status=1)
    assert "#1 " in output.split("ERROR", 1)[0]  # the report was written in full


@pytest.mark.parametrize("case", ITEMS, ids=list(ITEMS))
def test_cache_latents_skips_the_bad_item_and_caches_the_rest(item_runs, case):
    _, env, name, reason = ITEMS[case]
    root, _, result = item_runs(env)
    bad = sum(1 for _, case_env, _, _ in ITEMS.values() if case_env == env)
    output = assert_refused(result, f"  skipped {root / name}: {reason.format(root=root)}", status=0)
    assert len(list((root / "cache").rglob("*.safetensors"))) == 4  # the demo's 2 images and 2 clips
    assert f"latents: 4 cached, 0 reused (fresh), {bad} skipped" in output


@pytest.mark.parametrize("case", CONFIGS, ids=list(CONFIGS))
def test_a_bad_dataset_toml_stops_both_tools(demo, tiny_models, case):
    edit, message = CONFIGS[case]
    edit(demo)
    message = message.format(root=demo)
    assert_refused(run_tool("check_dataset", "--dataset_config", demo / "dataset.toml"), message, status=1)
    assert_refused(run_tool("cache_latents", "--dataset_config", demo / "dataset.toml", "--vae", tiny_models.vae,
                            "--device", "cpu", "--no_progress"), f"error: {demo / message}")


# name: (tool, its flags after --dataset_config (str.format'ed with root and the tiny model files), the message)
FLAGS = {
    "latents: batch size 0": ("cache_latents", "--vae {vae} --batch_size 0",
                              "error: argument --batch_size: '0' must be 1 or more"),
    "latents: negative workers": ("cache_latents", "--vae {vae} --num_workers -1",
                                  "error: argument --num_workers: '-1' must be 0 or more"),
    "latents: unknown device": ("cache_latents", "--vae {vae} --device gpu0",
                                "error: argument --device: 'gpu0' is not a device; use cpu, cuda or cuda:N"),
    "latents: unknown task": ("cache_latents", "--vae {vae} --device cpu --task t2v-A15B",
                              "error: --task: unknown WAN task 't2v-A15B'; valid tasks: "),
    "latents: VAE file missing": ("cache_latents", "--vae {root}/missing.pth --device cpu",
                                  "error: {root}/missing.pth"),
    "text: encoder file missing": ("cache_text_encoder_outputs", "--t5 {root}/none.pth --device cpu",
                                   "error: text encoder {root}/none.pth does not exist"),
    "text: tokenizer missing": ("cache_text_encoder_outputs", "--t5 {t5} --tokenizer {root}/tok --device cpu",
                                "error: tokenizer {root}/tok does not exist"),
    "latents: dataset config is a folder": ("cache_latents", "--vae {vae} --device cpu --dataset_config {root}",
                                            "error: dataset config {root} is a folder; give the dataset TOML file in "
                                            "it"),
    "check: unknown task": ("check_dataset", "--task t2v-A15B", "error: unknown WAN task 't2v-A15B'"),
    "check: --json inside a file": ("check_dataset", "--json {root}/dataset.toml/lint.json",
                                    "error: cannot write --json {root}/dataset.toml/lint.json: Not a directory "
                                    "({root}/dataset.toml)"),
}


@pytest.mark.parametrize("case", FLAGS, ids=list(FLAGS))
def test_bad_flags_are_refused(demo, tiny_models, case):
    tool, flags, message = FLAGS[case]
    values = {"root": demo, "vae": tiny_models.vae, "t5": tiny_models.t5}
    flags = flags.format(**values).split()
    assert_refused(run_tool(tool, "--dataset_config", demo / "dataset.toml", *flags, "--no_progress"
                            if tool != "check_dataset" else "--goal=character"), message.format(**values))
    assert not (demo / "cache").exists()  # refused before anything was written

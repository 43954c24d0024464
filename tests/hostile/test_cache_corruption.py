"""Cache files whose data was damaged or overwritten after caching (zeroed, random), or that come from before
content checksums: the caching tools rebuild them and say so; training names the file and the commands that
rebuild it instead of training on it."""

from __future__ import annotations

import shutil

import pytest

from .conftest import assert_refused, copy_demo, overwrite_tensor_data, run_tool

CORRUPT = ("corrupt cache file (its content does not match the checksum written with it: damaged or overwritten "
           "after caching)")
# name: (latents or text, the dataset (0 images, 1 videos), how the data is overwritten, the reason given)
DAMAGE = {
    "zeroed latents": ("latents", 0, "zeros", CORRUPT),
    "random latents": ("latents", 1, "random", CORRUPT),
    "random text encoder output": ("text", 0, "random", CORRUPT),
}


@pytest.fixture(scope="module")
def cached_demo(demo_source, tiny_models, tmp_path_factory):
    """The demo dataset with both caches built once by the real tools; tests work on copies."""
    root = copy_demo(demo_source, tmp_path_factory.mktemp("cached_demo"))
    for tool, flags in _caching(tiny_models):
        assert_refused(run_tool(tool, "--dataset_config", root / "dataset.toml", *flags), "0 skipped", status=0)
    return root


def _caching(models):
    common = ["--device", "cpu", "--no_progress"]
    return [("cache_latents", ["--vae", models.vae, *common]),
            ("cache_text_encoder_outputs", ["--t5", models.t5, "--tokenizer", models.tokenizer, *common])]


@pytest.fixture
def demo_cached(cached_demo, tmp_path):
    root = tmp_path / "demo"
    shutil.copytree(cached_demo, root)
    return root


def _victim(root, kind, dataset):
    folder = root / "cache" / ("images", "videos")[dataset]
    return sorted(folder.glob("*_wan21.safetensors") if kind == "latents" else (folder / "t5").glob("*.safetensors"))[0]


@pytest.fixture(scope="module")
def rebuilt(cached_demo, tiny_models, tmp_path_factory):
    """(copy of the cached demo with every DAMAGE applied, {tool: its result}) after one run of each tool."""
    root = tmp_path_factory.mktemp("rebuilt") / "demo"
    shutil.copytree(cached_demo, root)
    for kind, dataset, how, _ in DAMAGE.values():
        overwrite_tensor_data(_victim(root, kind, dataset), how)
    return root, {tool: run_tool(tool, "--dataset_config", root / "dataset.toml", *flags)
                  for tool, flags in _caching(tiny_models)}


@pytest.mark.parametrize("case", DAMAGE, ids=list(DAMAGE))
def test_the_caching_tool_rebuilds_a_damaged_file(rebuilt, case):
    kind, dataset, _, reason = DAMAGE[case]
    root, results = rebuilt
    tool = "cache_latents" if kind == "latents" else "cache_text_encoder_outputs"
    output = assert_refused(results[tool], f"  rebuilt {_victim(root, kind, dataset)}: {reason}", status=0)
    cached = sum(1 for k, _, _, _ in DAMAGE.values() if k == kind)
    assert f": {cached} cached, " in output  # only the damaged ones


@pytest.mark.parametrize("case", DAMAGE, ids=list(DAMAGE))
def test_training_names_the_damaged_file_and_the_command(demo_cached, case):
    from library.data.dataset_config import load_dataset_config
    from library.data.datasets import CacheError, build_train_datasets

    kind, dataset, how, reason = DAMAGE[case]
    victim = overwrite_tensor_data(_victim(demo_cached, kind, dataset), how)
    damaged = build_train_datasets(load_dataset_config(demo_cached / "dataset.toml"), "t2v-tiny")[dataset]
    damaged.check_caches()  # the metadata is intact: only reading the data shows the damage
    with pytest.raises(CacheError) as info:
        for index in range(len(damaged)):
            damaged[index]
    folder = demo_cached / ("images", "videos")[dataset]
    assert str(info.value).startswith(f"{demo_cached / 'dataset.toml'}: [[datasets]] #{dataset} ({folder}): "
                                      f"{victim}: {reason}. Nothing was trained on it; rebuild it")
    assert f"python tools/cache_latents.py --dataset_config {demo_cached / 'dataset.toml'}" in str(info.value)


def test_a_damaged_file_read_in_a_loader_worker_is_named_without_a_traceback(demo_cached):
    from library.data.dataset_config import load_dataset_config
    from library.data.datasets import CacheError, batch_loader, build_train_datasets

    victim = overwrite_tensor_data(_victim(demo_cached, "latents", 0), "random")
    datasets = build_train_datasets(load_dataset_config(demo_cached / "dataset.toml"), "t2v-tiny")
    with pytest.raises(CacheError) as info:
        for _ in batch_loader(datasets, seed=0, epoch=0, num_workers=1):
            pass
    assert str(info.value).startswith(f"{demo_cached / 'dataset.toml'}: [[datasets]] #0 ({demo_cached / 'images'}): "
                                      f"{victim}: {CORRUPT}. Nothing was trained on it")
    assert "Traceback" not in str(info.value) and "DataLoader worker" not in str(info.value)


def test_caches_from_before_checksums_train_and_are_rebuilt_once(demo_cached, tiny_models, caplog):
    from library.data.dataset_config import load_dataset_config
    from library.data.datasets import CacheError, build_train_datasets

    for path in (demo_cached / "cache").rglob("*.safetensors"):
        overwrite_tensor_data(path, "strip")
    images = build_train_datasets(load_dataset_config(demo_cached / "dataset.toml"), "t2v-tiny")[0]
    assert images[0]["latents"].abs().sum() > 0  # read unverified, with one warning
    assert "written before cache files had content checksums: it and any like it are read unverified" in caplog.text
    tool, flags = _caching(tiny_models)[0]
    assert_refused(run_tool(tool, "--dataset_config", demo_cached / "dataset.toml", *flags),
                   "  rebuilt 4 cache file(s) written before cache files had content checksums (once", status=0)
    assert "rebuilt" not in run_tool(tool, "--dataset_config", demo_cached / "dataset.toml", *flags).stdout  # once
    zeroed = overwrite_tensor_data(_victim(demo_cached, "text", 0), "zeros")  # still an old one: implausible, refused
    images = build_train_datasets(load_dataset_config(demo_cached / "dataset.toml"), "t2v-tiny")[0]
    with pytest.raises(CacheError, match=f"{zeroed}: corrupt cache file \\(t5 is all zeros; it has no content "
                                         "checksum\\)"):
        for index in range(len(images)):
            images.get(index, 0)


@pytest.mark.parametrize("text", ["[1, 2]", '{"img_000_32x32": "not a record"}',
                                  '{"img_000_32x32": {"fingerprint": 3}}', "not json"])
def test_a_damaged_skip_list_is_ignored(demo_cached, text, caplog):
    from library.data.dataset_config import load_dataset_config
    from library.data.datasets import build_train_datasets

    (demo_cached / "cache" / "images" / "skipped_wan21_r0.json").write_text(text)
    images = build_train_datasets(load_dataset_config(demo_cached / "dataset.toml"), "t2v-tiny")[0]
    assert len(images) == 2 and images.skips == []

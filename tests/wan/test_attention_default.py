"""The attention backend when none is asked for (issue 17, lever 1): FlashAttention 3 on a Hopper GPU where
`flash_attn_interface` imports (and registers its torch custom ops), else SDPA; chosen once per process and
logged; an explicit backend (`sdpa = true` included, as the musubi-tuner GUI writes it) is exactly that one.
CPU only: faked device capabilities and the stand-in FA3 package of tests/wan/attention_standins.py."""

from __future__ import annotations

import argparse
import logging

import pytest
import torch

from library.config import load_config, validate
from library.sampling.cli import ATTN_MODES, add_model_args
from library.wan import attention as attn
from library.wan.model import WanModel
from library.wan.variants import get_variant
from tests.musubi_gui import gui_fields, write_run_toml
from tests.wan import attention_standins


@pytest.fixture
def fresh(monkeypatch):
    """No stand-in packages, a fresh choice (default and SDPA) and import cache."""
    attention_standins.uninstall()
    for name, value in (("_IMPORTED", {}), ("_TRACEABLE", {"sdpa": True}), ("_SDPA", attn._SdpaChoice()),
                        ("_DEFAULT", attn._DefaultChoice())):
        monkeypatch.setattr(attn, name, value)
    yield monkeypatch
    attention_standins.uninstall()


def _gpu(monkeypatch, capability):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: capability is not None)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)


@pytest.mark.parametrize("capability, error, traceable, expected", [
    (None, None, True, "sdpa"), ((8, 0), None, True, "sdpa"), ((8, 9), None, True, "sdpa"),
    ((10, 0), None, True, "sdpa"), ((12, 0), None, True, "sdpa"), ((9, 0), "No module named x", True, "sdpa"),
    ((9, 0), None, False, "sdpa"), ((9, 0), None, True, "flash3")])
def test_default_plan(capability, error, traceable, expected):
    plan = attn.default_plan(capability, error, traceable)
    assert plan.backend == expected and plan.reason
    if capability == (9, 0) and error:
        assert "not installed" in plan.reason and error in plan.reason


def test_hopper_with_fa3_installed_defaults_to_flash3_once_and_logged(fresh, caplog):
    _gpu(fresh, (9, 0))
    attention_standins.install()
    with caplog.at_level(logging.INFO, logger=attn.__name__):
        models = [WanModel(get_variant("t2v-tiny")) for _ in range(3)]
        for model in models:
            model.set_attention_backend(attn.AUTO)
    assert [m.attention_backend for m in models] == ["flash3"] * 3
    lines = [r.getMessage() for r in caplog.records if "no backend set" in r.getMessage()]
    assert lines == ["attention: no backend set: flash3 (sm90: FlashAttention 3 is installed)"]
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 6, 2, 8) for _ in range(3))
    before = attention_standins.CALLS["flash3"]
    attn.attention(q, k, v, models[0].attention_backend)
    assert attention_standins.CALLS["flash3"] == before + 1  # the FA3 kernel ran
    assert attn.check_backend("sdpa") == "sdpa"  # named explicitly: exactly that backend


@pytest.mark.parametrize("capability, why", [((9, 0), "not installed"), ((8, 9), "Hopper (sm90) GPUs only"),
                                             (None, "no CUDA device")])
def test_without_fa3_or_hopper_the_default_is_sdpa(fresh, caplog, capability, why):
    _gpu(fresh, capability)
    if capability != (9, 0):
        attention_standins.install()  # installed, but not usable on this GPU
    with caplog.at_level(logging.INFO, logger=attn.__name__):
        assert attn.check_backend(attn.AUTO) == "sdpa"
    assert why in caplog.text and "no backend set: sdpa" in caplog.text
    q, k, v = (torch.randn(1, 6, 2, 8) for _ in range(3))
    assert torch.equal(attn.attention(q, k, v, attn.AUTO), attn.attention(q, k, v, "sdpa"))


def test_an_fa3_build_without_torch_custom_ops_is_not_the_default(fresh, caplog):
    _gpu(fresh, (9, 0))
    attention_standins.install()
    fresh.setattr(attn, "_PACKAGE_OPS", {**attn._PACKAGE_OPS, "flash3": (("no_such_namespace", "fwd"),)})
    with caplog.at_level(logging.INFO, logger=attn.__name__):
        assert attn.check_backend(attn.AUTO) == "sdpa"
    assert "registers no torch custom ops" in caplog.text


def test_configs_without_an_attention_flag_get_the_default_and_the_guis_sdpa_stays_sdpa(fresh, tmp_path):
    """musubi-tuner-gui writes `sdpa = true` when its sdpa box is ticked (the widget's default is unticked, but
    the GUI's shipped `config.toml` of interface defaults ticks it; an unticked box is left out of the TOML):
    ticked stays sdpa on an FA3 Hopper machine, unticked is the default."""
    _gpu(fresh, (9, 0))
    attention_standins.install()
    user = {"architecture": "wan", "task": "t2v-A14B", "dataset_config": "/data/dataset.toml",
            "dit": "/models/low.safetensors", "vae": "/models/vae.safetensors", "t5": "/models/t5.pth",
            "network_module": "networks.lora_wan", "output_dir": str(tmp_path)}
    for ticked, expected in ((True, "sdpa"), (False, "flash3")):
        fields = gui_fields(**user, sdpa=ticked, output_name=f"lora_{ticked}")
        text = write_run_toml(fields).read_text()
        assert ("sdpa = true" in text) == ticked
        cfg = validate(load_config(["--config_file", str(tmp_path / f"lora_{ticked}_20250101-120000.toml")]))
        assert cfg.attention.attention_backend == ("sdpa" if ticked else attn.AUTO)
        model = WanModel(get_variant("t2v-tiny"))
        model.set_attention_backend(cfg.attention.attention_backend)  # as training's assemble does
        assert model.attention_backend == expected


def test_generation_defaults_to_auto_and_musubis_torch_is_sdpa():
    parser = argparse.ArgumentParser()
    add_model_args(parser)
    assert ATTN_MODES[parser.parse_args([]).attn_mode] == attn.AUTO
    assert ATTN_MODES[parser.parse_args(["--attn_mode", "torch"]).attn_mode] == "sdpa"

"""`network_module` selects the network that trains, for real: this trainer's LoRA, LyCORIS (`lycoris.kohya`)
when installed, or a clear error.

LyCORIS is not installed in the test environment, so a stand-in with LyCORIS's kohya interface (the calls
musubi-tuner makes, `training/trainer_base.py` at kohya-ss/musubi-tuner 30c658c4; the signatures of
`lycoris/kohya.py` at KohakuBlueleaf/LyCORIS f49d30d) is registered in `sys.modules` as `lycoris.kohya`. It
records how it is called and builds its modules from this trainer's LoRA, so a run through it trains.
"""

from __future__ import annotations

import logging
import sys
import types

import pytest
import toml
import torch
from safetensors import safe_open

from library.config import ConfigError, config_from_dict, validate
from library.training.trainer import Trainer
from networks import lora_wan
from tests.training.test_trainer import settings, workspace  # noqa: F401  (the module-scoped fixture)

CALLS: list[dict] = []


class FakeLycorisNetwork(torch.nn.Module):
    """LyCORIS's kohya network interface, built on this trainer's LoRA modules."""

    def __init__(self, unet, dim, alpha):
        super().__init__()
        self.inner = lora_wan.create_network(1.0, dim, alpha, None, None, unet)
        self.loras: list = []

    def apply_to(self, text_encoder, unet, apply_text_encoder=None, apply_unet=None):
        assert text_encoder is None and apply_text_encoder is False and apply_unet is True
        self.inner.apply_to()
        self.loras = self.inner.loras

    def prepare_optimizer_params(self, text_encoder_lr=None, unet_lr=1e-4, learning_rate=None):
        self.requires_grad_(True)
        return [{"params": {id(p): p for p in self.inner.parameters()}.values(), "lr": unet_lr}], ["unet"]

    def load_weights(self, file):
        return {}

    def apply_max_norm_regularization(self, max_norm_value, device):
        return 0, 0, 0


def _create_network(multiplier, network_dim, network_alpha, vae, text_encoder, unet, **kwargs):
    preset = toml.load(kwargs["preset"])
    CALLS.append({"dim": network_dim, "alpha": network_alpha, "kwargs": kwargs, "preset": preset,
                  "unet": type(unet).__name__})
    return FakeLycorisNetwork(unet, network_dim, network_alpha)


@pytest.fixture()
def fake_lycoris(monkeypatch):
    package, kohya, config = (types.ModuleType(n) for n in ("lycoris", "lycoris.kohya", "lycoris.config"))
    kohya.create_network = _create_network
    config.PRESET = {"full": {"unet_target_module": ["WanAttentionBlock", "QwenImageTransformerBlock"]}}
    package.kohya, package.config = kohya, config
    for name, module in (("lycoris", package), ("lycoris.kohya", kohya), ("lycoris.config", config)):
        monkeypatch.setitem(sys.modules, name, module)
    CALLS.clear()
    return CALLS


def test_lycoris_kohya_really_trains_when_installed(workspace, tmp_path, fake_lycoris):  # noqa: F811
    cfg = validate(config_from_dict(settings(
        workspace, tmp_path, network_module="lycoris.kohya", max_train_steps=2, network_dim=4, network_alpha=2,
        network_args=["algo=lokr", "factor=8", "use_tucker=true"])))
    assert Trainer(cfg).run() == 0
    assert len(fake_lycoris) == 2  # one network per expert, each created by the module named
    call = fake_lycoris[0]
    assert call["dim"] == 4 and call["alpha"] == 2.0 and call["unet"] == "WanModel"
    assert call["kwargs"]["algo"] == "lokr" and call["kwargs"]["factor"] == "8"  # strings, as musubi passes them
    assert "WanBlock" in call["preset"]["unet_target_module"]  # our block beside musubi's WanAttentionBlock
    for expert in ("high_noise", "low_noise"):
        with safe_open(str(tmp_path / f"lora_{expert}.safetensors"), "pt") as f:
            assert f.metadata()["ss_network_module"] == "lycoris.kohya"
            assert any(k.startswith("inner.lora_unet_blocks_0_") for k in f.keys())


def test_lycoris_not_installed_says_how_to_install():
    with pytest.raises(ConfigError, match=r"pip install lycoris-lora"):
        validate(config_from_dict({"dit": "d.safetensors", "dataset_config": "d.toml",
                                   "network_module": "lycoris.kohya"}))
    from library.training.engines.lycoris import import_lycoris

    with pytest.raises(ConfigError, match=r"install it with `pip install lycoris-lora`"):
        import_lycoris()


@pytest.mark.parametrize("module", ["networks.resize", "networks.lora", "lycoris.kohya.locon"])
def test_other_network_modules_are_refused_by_name(module):
    with pytest.raises(ConfigError, match=r"network_module = .* is not one of 'networks.lora_wan', 'lycoris.kohya'"):
        config_from_dict({"network_module": module})


def test_the_engine_refuses_an_unchecked_module(caplog):
    """A config built without the schema's check still cannot train a module it did not name."""
    from library.training.engines.lora import attach_lora

    cfg = types.SimpleNamespace(network=types.SimpleNamespace(network_module="networks.resize"))
    expert = types.SimpleNamespace(name="dit")
    caplog.set_level(logging.INFO)
    with pytest.raises(ConfigError, match=r"networks.resize.*use one of 'networks.lora_wan'"):
        attach_lora(expert, cfg)

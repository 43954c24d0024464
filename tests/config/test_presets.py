"""Each preset resolves to the training guide's numbers; explicit keys win."""

from __future__ import annotations

import pytest

from library.config import config_from_dict, load_config

GUIDE = {  # the guide's preset table (dim, lr, epochs), alpha = dim, cosine_with_restarts, 5% warmup
    "character": (64, 1.5e-4, 15),
    "style": (96, 1e-4, 20),
    "motion": (128, 8e-5, 25),
    "domain": (96, 1e-4, 12),
}


@pytest.mark.parametrize("preset", sorted(GUIDE))
def test_preset_resolves_to_the_guide(preset):
    cfg = config_from_dict({"preset": preset})
    dim, lr, epochs = GUIDE[preset]
    assert cfg.network.network_dim == dim and cfg.network.network_alpha == dim
    assert cfg.optimizer.learning_rate == lr and cfg.loop.max_train_epochs == epochs
    assert cfg.scheduler.lr_scheduler == "cosine_with_restarts" and cfg.scheduler.lr_warmup_steps == 0.05
    assert cfg.scheduler.lr_scheduler_num_cycles == 3


def test_explicit_keys_win_from_toml_and_command_line(tmp_path):
    toml = tmp_path / "run.toml"
    toml.write_text('preset = "style"\nnetwork_dim = 48\n')
    cfg = load_config(["--config_file", str(toml), "--learning_rate", "2e-4"])
    assert cfg.network.network_dim == 48  # TOML wins over the preset
    assert cfg.optimizer.learning_rate == 2e-4  # CLI wins over the preset
    assert cfg.loop.max_train_epochs == 20 and cfg.network.network_alpha == 96  # the rest from the preset


def test_no_preset_changes_nothing():
    assert config_from_dict({}) == config_from_dict({"preset": ""})

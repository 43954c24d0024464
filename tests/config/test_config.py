"""The training config: precedence, coercion, sections, key tables, validation and the TOML round trip."""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import pytest

from library.config import (
    ConfigError, TrainConfig, build_parser, config_from_dict, config_to_dict, field_default, load_config, read_toml,
    save_config, validate,
)
from library.config.keys import is_off
from library.config.schema import FIELD_GROUP

VALID = {"dit": "low.safetensors", "dataset_config": "data.toml"}
# a WAN 2.2 run as musubi-tuner-gui writes it (tests/musubi_gui.py), with the user's settings in its text boxes
GUI_USER = {"architecture": "wan", "task": "t2v-A14B", "dataset_config": "/home/user/wan/dataset.toml",
            "dit": "/models/wan2.2_t2v_low_noise_14B_fp16.safetensors",
            "dit_high_noise": "/models/wan2.2_t2v_high_noise_14B_fp16.safetensors", "vae": "/models/Wan2.1_VAE.pth",
            "t5": "/models/models_t5_umt5-xxl-enc-bf16.pth", "network_module": "networks.lora_wan", "xformers": True,
            "network_dim": 32, "network_alpha": 16, "mixed_precision": "bf16", "optimizer_type": "AdamW8bit",
            "optimizer_args": "weight_decay=0.01 betas=0.9,0.999", "learning_rate": 2e-4,
            "network_args": 'loraplus_lr_ratio=4 exclude_patterns=[".*ffn.*"] verbose=false',
            "lr_scheduler": "constant_with_warmup", "lr_warmup_steps": 0.05, "timestep_boundary": 875,
            "discrete_flow_shift": 5.0, "timestep_sampling": "shift"}


def gui_run_toml(tmp_path) -> Path:
    from tests.musubi_gui import gui_fields, write_run_toml

    return write_run_toml(gui_fields(**GUI_USER, output_dir=str(tmp_path / "output")))


def write(tmp_path, text: str, name="train.toml") -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def test_bad_toml_and_missing_file_are_clear(tmp_path):
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(["--config_file", write(tmp_path, "learning_rate = = 1\n")])
    with pytest.raises(ConfigError, match="config file .*nope.toml not found"):
        load_config(["--config_file", str(tmp_path / "nope.toml")])


def test_dropped_keys_give_the_same_config(tmp_path):
    """The GUIs drop keys whose value is "", false, 0 or 0.0 from a run's TOML (their saved configs keep
    them): the defaults must mean the same."""
    from tests.musubi_gui import gui_fields, write_saved_config

    raw = read_toml(write_saved_config(gui_fields(**GUI_USER), tmp_path / "saved.toml"))
    dropped = {k: v for k, v in raw.items() if not is_off(v)}
    assert len(dropped) < len(raw) - 50
    # the one exception: `compile` not set means "on for CUDA training" (issue 17), so a GUI's unchecked
    # box (false, dropped from the run's TOML) compiles on a GPU, while a written `compile = false` does not
    assert raw["compile"] is False and "compile" not in dropped
    same = {**dropped, "compile": False}
    assert config_from_dict(same, "dropped") == config_from_dict(raw, "full")
    assert config_from_dict(dropped, "dropped").compilation.compile is None


# Fields whose default is not the "off" value; a GUI dropping their 0 gets this default instead. Each is
# either a value where 0 is invalid, or the ecosystem's own default (Kohya / musubi) for that flag.
NON_OFF_DEFAULTS = {
    "task", "network_module", "network_dim", "network_alpha", "optimizer_type", "learning_rate", "max_grad_norm",
    "lr_scheduler", "lr_scheduler_num_cycles", "lr_scheduler_power", "max_train_steps", "timestep_sampling",
    "gradient_accumulation_steps", "mixed_precision", "max_data_loader_n_workers", "discrete_flow_shift",
    "sigmoid_scale", "weighting_scheme", "logit_std", "mode_scale", "max_timestep", "save_lora_format",
    "compile_backend", "compile_mode", "save_model_format", "sequence_parallel_attention",
}


def test_every_default_is_off_or_deliberate():
    for name in FIELD_GROUP:
        default = field_default(name)
        assert is_off(default) or default in ({}, ()) or name in NON_OFF_DEFAULTS, name


def test_precedence_defaults_toml_cli(tmp_path):
    path = write(tmp_path, 'learning_rate = 1e-4\nnetwork_dim = 16\noutput_name = "toml"\n')
    cfg = load_config(["--config_file", path, "--network_dim", "32", "--fp8_base"])
    assert cfg.optimizer.learning_rate == 1e-4  # TOML over default
    assert cfg.network.network_dim == 32  # CLI over TOML
    assert cfg.saving.output_name == "toml" and cfg.memory.fp8_base is True
    assert cfg.network.network_alpha == field_default("network_alpha")
    assert cfg.run.config_file == path
    assert load_config(["--config_file", path, "--fp8_base", "false"]).memory.fp8_base is False


def test_coercion_from_every_source(tmp_path):
    path = write(tmp_path, 'learning_rate = "1e-4"\nnetwork_alpha = 2\nfp8_base = "true"\n'
                           'base_weights = "a.safetensors"\nnetwork_dim = 16.0\nlr_warmup_steps = "100"\n'
                           'timestep_boundary = 0.9\nmixed_precision = "BF16"\nnetwork_args = "rank_dropout=0.1 '
                           'exclude_patterns=[\'.*ffn.*\', \'.*o\']"\n')
    cfg = load_config(["--config_file", path, "--base_weights_multiplier", "0.5", "--max_grad_norm", "0"])
    assert cfg.optimizer.learning_rate == 1e-4 and cfg.network.network_alpha == 2.0
    assert cfg.memory.fp8_base is True and cfg.network.network_dim == 16
    assert cfg.network.base_weights == ("a.safetensors",) and cfg.network.base_weights_multiplier == (0.5,)
    assert cfg.scheduler.lr_warmup_steps == 100 and isinstance(cfg.scheduler.lr_warmup_steps, int)
    assert cfg.timesteps.timestep_boundary == 0.9 and cfg.loop.mixed_precision == "bf16"
    assert cfg.network.network_args == {"rank_dropout": 0.1, "exclude_patterns": [".*ffn.*", ".*o"]}
    assert cfg.optimizer.max_grad_norm == 0.0


@pytest.mark.parametrize("text, message", [
    ('learning_rate = "fast"', "learning_rate = 'fast': expected a number"),
    ("network_dim = 1.5", "network_dim = 1.5: expected an integer"),
    ('fp8_base = "maybe"', "fp8_base = 'maybe': expected a boolean"),
    ('mixed_precision = "fp32"', "mixed_precision = 'fp32' is not one of 'no', 'fp16', 'bf16'"),
    ("timestep_boundary = 1200", "expected a fraction in 0-1"),
    ('network_args = ["rank_dropout"]', 'is not a "key=value" string'),
])
def test_coercion_errors_name_the_file_and_key(tmp_path, text, message):
    path = write(tmp_path, text + "\n")
    with pytest.raises(ConfigError, match=f"^{tmp_path}.*"):
        load_config(["--config_file", path])
    with pytest.raises(ConfigError) as err:
        load_config(["--config_file", path])
    assert message in str(err.value)


def test_timestep_boundary_int_and_float_forms():
    assert config_from_dict({"timestep_boundary": 875}).timesteps.timestep_boundary == 0.875
    assert config_from_dict({"timestep_boundary": "900"}).timesteps.timestep_boundary == 0.9
    assert config_from_dict({"timestep_boundary": 0.9}).timesteps.timestep_boundary == 0.9
    assert config_from_dict({"timestep_boundary": 0}).timesteps.timestep_boundary is None  # GUI "not set"


def test_sections_are_flattened(tmp_path):
    path = write(tmp_path, '[model]\ndit = "d.safetensors"\ntask = "t2v-1.3B"\n[training]\nlearning_rate = 3e-4\n'
                           "[network_args]\nloraplus_lr_ratio = 8\n")
    cfg = load_config(["--config_file", path])
    assert cfg.model.dit == "d.safetensors" and cfg.model.task == "t2v-1.3B"
    assert cfg.optimizer.learning_rate == 3e-4 and cfg.network.network_args == {"loraplus_lr_ratio": 8}
    with pytest.raises(ConfigError, match=r"\[a.b\] is nested too deep"):
        load_config(["--config_file", write(tmp_path, "[a.b]\nseed = 1\n", "deep.toml")])
    with pytest.raises(ConfigError, match=r"'seed' is set twice \(\[a\] and \[b\]\)"):
        load_config(["--config_file", write(tmp_path, "[a]\nseed = 1\n[b]\nseed = 2\n", "twice.toml")])


def test_unknown_keys_suggest_the_closest(tmp_path):
    path = write(tmp_path, "learning_rat = 1e-4\n")
    with pytest.raises(ConfigError, match=f"{path}: unknown key 'learning_rat'; did you mean 'learning_rate'"):
        load_config(["--config_file", path])
    with pytest.raises(ConfigError, match="command line: unknown key 'netwrok_dim'; did you mean 'network_dim'"):
        load_config(["--netwrok_dim", "4"])
    with pytest.raises(ConfigError, match="unknown key 'zzzz'; run with --help"):
        config_from_dict({"zzzz": 1})


def test_gui_only_aliases_misplaced_and_unsupported(caplog):
    caplog.set_level(logging.INFO, logger="library.config")
    cfg = config_from_dict({"fp8": True, "dit_low_noise": "low.safetensors", "num_processes": 2,
                            "caching_teo_device": "cuda", "block_swap_h2d_only": False})
    assert cfg.memory.fp8_base is True and cfg.model.dit == "low.safetensors"
    assert "'fp8' is an old name of 'fp8_base'" in caplog.text
    assert "skipping num_processes, caching_teo_device: settings of the launcher" in caplog.text
    assert "skipping block_swap_h2d_only: musubi-tuner options at their default" in caplog.text
    with pytest.raises(ConfigError, match="'dit' is given twice"):
        config_from_dict({"dit": "a", "dit_low_noise": "b"})
    with pytest.raises(ConfigError, match="block_swap_h2d_only = True is a musubi-tuner option this trainer does not "
                                          "support"):
        config_from_dict({"block_swap_h2d_only": True})
    with pytest.raises(ConfigError, match="'pretrained_model_name_or_path' is the sd-scripts model key; pass the "
                                          "WAN DiT checkpoint as `dit`"):
        config_from_dict({"pretrained_model_name_or_path": "sdxl.safetensors"})
    with pytest.raises(ConfigError, match="'resolution' belongs in the dataset TOML"):
        config_from_dict({"resolution": [832, 480]})
    with pytest.raises(ConfigError, match="use `min_timestep`"):
        config_from_dict({"min_t": 0.1})


def test_clip_skip_is_accepted_and_warned_once(tmp_path, caplog):
    path = write(tmp_path, "clip_skip = 2\n")
    cfg = load_config(["--config_file", path, "--clip_skip", "2"])
    warnings = [r for r in caplog.records if "clip_skip" in r.getMessage() and r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "no meaning for WAN" in warnings[0].getMessage()
    assert cfg == dataclasses.replace(TrainConfig(), run=cfg.run) and cfg.run.config_file == path  # nothing else


@pytest.mark.parametrize("values, message", [
    ({"dit": None}, "`dit` is required"),
    ({"dataset_config": None}, "`dataset_config` is required"),
    ({"task": "t2v-A14B", "dit_high_noise": "h", "blocks_to_swap": 40}, "`blocks_to_swap` = 40 must be less than"),
    ({"offload_inactive_dit": True}, "`offload_inactive_dit` needs two experts"),
    ({"fp8_scaled": True}, "`fp8_scaled` needs `fp8_base = true`"),
    ({"task": "t2v-1.3B", "dit_high_noise": "h"}, "`dit_high_noise` is only for WAN 2.2 A14B tasks"),
    ({"task": "t2v-14B", "timestep_boundary": 0.9}, "`timestep_boundary` is only for WAN 2.2 A14B"),
    ({"sdpa": True, "xformers": True, "sage_attn": True}, "`sage_attn`: SageAttention has no backward pass"),
    ({"sage_attn": True}, "`sage_attn`: SageAttention has no backward pass, so it cannot train"),
    ({"min_timestep": 800, "max_timestep": 200}, "`min_timestep` (800) must be less than `max_timestep` (200)"),
    ({"max_timestep": 1200}, "`max_timestep` = 1200 must be within 0-1000"),
    ({"task": "t2v-A14B", "dit_high_noise": "h", "max_timestep": 800},
     "the high-noise expert would never train"),
    ({"lr_warmup_steps": 1.5}, "`lr_warmup_steps` = 1.5: give an int number of steps or a float ratio below 1"),
    ({"lr_warmup_steps": -3}, "`lr_warmup_steps` = -3 must be 0 or more"),
    ({"task": "t2v-A15B"}, "unknown WAN task 't2v-A15B'"),
    ({"shared_expert_lora": True}, "`shared_expert_lora` needs both experts"),
    ({"task": "t2v-A14B", "dit_high_noise": "h", "shared_expert_lora": True, "network_dim_high_noise": 8},
     "`shared_expert_lora` trains one LoRA for both experts"),
    ({"i2v_probability": 0.5}, "`i2v_probability` is only for TI2V tasks"),
    ({"network_args": ["loraplus_lr_ratio=4", "exclude_pattern=.*"]},
     "network_args: unknown key 'exclude_pattern'; did you mean 'exclude_patterns'?"),
    ({"network_args": ["exclude_patterns=['(']"]}, "network_args: exclude_patterns: '(' is not a valid regex"),
    ({"dim_from_weights": True}, "`dim_from_weights` needs `network_weights`"),
    ({"sample_every_n_epochs": 1}, "sampling is requested but `sample_prompts`"),
    ({"save_every_n_steps": -1}, "`save_every_n_steps` = -1 must be 0 or more"),
    ({"gradient_checkpointing_cpu_offload": True}, "needs `gradient_checkpointing = true`"),
])
def test_validate_errors(values, message):
    cfg = config_from_dict({k: v for k, v in {**VALID, **values}.items() if v is not None})
    with pytest.raises(ConfigError) as err:
        validate(cfg)
    assert message in str(err.value)


def test_validate_lists_every_problem_and_accepts_good_configs():
    with pytest.raises(ConfigError) as err:
        validate(config_from_dict({"fp8_scaled": True, "xformers": True, "sdpa": True}))
    text = str(err.value)
    assert text.count("\n  - ") == 3  # dit, dataset_config, fp8_scaled (two attention flags: musubi's first)
    validate(config_from_dict({**VALID, "task": "ti2v-5B", "i2v_probability": 0.3, "lr_warmup_steps": 0.1}))
    validate(config_from_dict({**VALID, "task": "i2v-A14B", "dit_high_noise": "h", "offload_inactive_dit": True,
                               "learning_rate_high_noise": 1e-4, "network_dim_high_noise": 16}))


def test_output_config_round_trip(tmp_path):
    cfg = validate(load_config(["--config_file", str(gui_run_toml(tmp_path)), "--output_config",
                                str(tmp_path / "out.toml"), "--seed", "7", "--preset", "character"]))
    written = save_config(cfg, cfg.run.output_config)
    assert not list(tmp_path.glob("*.tmp"))
    text = written.read_text()
    assert "output_config =" not in text and "config_file =" not in text and "caching_" not in text
    again = load_config(["--config_file", str(written)])
    expected = dataclasses.replace(cfg, run=dataclasses.replace(cfg.run, config_file=str(written), output_config=None))
    assert again == expected
    assert config_to_dict(again)["network_args"] == {"loraplus_lr_ratio": 4, "exclude_patterns": [".*ffn.*"],
                                                     "verbose": False}


def test_parser_covers_every_field_and_defaults_are_safe():
    parser = build_parser()
    flags = {a.dest for a in parser._actions if a.dest != "help"}
    assert flags == set(FIELD_GROUP)
    cfg = load_config([])
    assert cfg == TrainConfig() and cfg.attention.attention_backend == "auto"  # no flag: FA3 on Hopper if installed
    assert "--learning_rate" in parser.format_help()

"""Typed training config: dataclasses are the schema; TOML + command line -> a frozen TrainConfig.

    cfg = validate(load_config(sys.argv[1:]))
    cfg.network.network_dim, cfg.get("learning_rate"), config_to_dict(cfg)

Every rule that needs no model is checked in `validate`, before anything loads. May import: `library.wan`
(variant facts: shapes, defaults) and `library.guide` (presets); nothing above.
"""

from .coerce import ConfigError, format_key_value_args, parse_key_value_args
from .keys import ALIASES, GUI_ONLY_KEYS
from .loader import build_parser, config_from_dict, load_config, read_toml
from .schema import (
    AttentionArgs, CompileArgs, LoggingArgs, LoopArgs, MemoryArgs, ModelArgs, NetworkArgs, OptimizerArgs,
    RunArgs, SamplingArgs, SavingArgs, SchedulerArgs, TimestepArgs, TrainConfig, field_default,
)
from .validate import validate
from .writer import config_to_dict, config_to_json, config_to_toml, save_config

__all__ = [
    "ALIASES", "GUI_ONLY_KEYS", "AttentionArgs", "CompileArgs", "ConfigError", "LoggingArgs", "LoopArgs",
    "MemoryArgs", "ModelArgs", "NetworkArgs", "OptimizerArgs", "RunArgs", "SamplingArgs", "SavingArgs",
    "SchedulerArgs", "TimestepArgs", "TrainConfig", "build_parser", "config_from_dict", "config_to_dict",
    "config_to_json", "config_to_toml", "field_default", "format_key_value_args", "load_config",
    "parse_key_value_args", "read_toml", "save_config", "validate",
]

"""LyCORIS networks (`network_module = "lycoris.kohya"`: LoHa, LoKr, LoCon, ...) behind the engines'
`TrainableNetwork` interface, created the way musubi-tuner creates them.

musubi-tuner (`training/trainer_base.py`, kohya-ss/musubi-tuner 30c658c4) imports `network_module`, calls
`create_network(1.0, network_dim, network_alpha, vae, None, transformer, **kwargs)` with each
`network_args` entry as a "key=value" string (`algo=lokr`, `factor=8`, `preset=attn-mlp`, ...), then
`apply_to(None, transformer, apply_text_encoder=False, apply_unet=True)` and `load_weights` for
`network_weights`. LyCORIS's kohya entry (`lycoris/kohya.py`, KohakuBlueleaf/LyCORIS f49d30d) finds the
modules to adapt by class name from a preset; its presets name musubi-tuner's WAN block `WanAttentionBlock`
and this trainer's block is `WanBlock`, so the preset (a LyCORIS preset name or a preset TOML file) is
resolved here and handed to LyCORIS as a preset file that lists our block beside musubi's. Module names
are the official ones in both trainers, so the saved keys (`lora_unet_blocks_0_self_attn_q.lokr_w1`) are
the ones musubi-tuner writes, which ComfyUI loads.

LyCORIS is optional (`pip install lycoris-lora`) and imported only here.
"""

from __future__ import annotations

import copy
import importlib
import logging
import tempfile
from pathlib import Path

import torch

from library.config import ConfigError, format_key_value_args
from networks.lora import write_lora_file

logger = logging.getLogger(__name__)

MODULE = "lycoris.kohya"
INSTALL = "pip install lycoris-lora"
MUSUBI_BLOCK = "WanAttentionBlock"  # the WAN block class name LyCORIS's presets list (musubi-tuner's)


def import_lycoris():
    """LyCORIS's kohya entry module, or a ConfigError that says how to install it."""
    try:
        return importlib.import_module(MODULE)
    except ImportError as exc:
        raise ConfigError(f"network_module = {MODULE!r} needs LyCORIS, which cannot be imported here ({exc}): "
                          f"install it with `{INSTALL}`, or use network_module = 'networks.lora_wan'") from None


def lycoris_kwargs(network_args: dict, network_dropout: float) -> dict[str, str]:
    """`network_args` as musubi-tuner hands them to LyCORIS: each value as the text after "key=". A
    `network_dropout` becomes LyCORIS's `dropout` unless network_args sets it."""
    kwargs = dict(item.split("=", 1) for item in format_key_value_args(network_args))
    if network_dropout and "dropout" not in kwargs:
        kwargs["dropout"] = str(network_dropout)
    return kwargs


def resolve_preset(name: str, block: str) -> dict:
    """A LyCORIS preset (by name, or a preset TOML file) with `block` wherever it names musubi's WAN block."""
    import toml

    presets = getattr(importlib.import_module("lycoris.config"), "PRESET", {})
    if name in presets:
        preset = copy.deepcopy(presets[name])
    elif Path(name).expanduser().is_file():
        preset = toml.load(Path(name).expanduser())
    else:
        raise ConfigError(f"network_args preset = {name!r} is neither a LyCORIS preset ({', '.join(presets)}) nor a "
                          "preset TOML file")
    targets = list(preset.get("unet_target_module", []))
    if MUSUBI_BLOCK in targets and block not in targets:
        preset["unet_target_module"] = [*targets, block]
    algo_map = preset.get("module_algo_map", {})
    if MUSUBI_BLOCK in algo_map:
        algo_map.setdefault(block, algo_map[MUSUBI_BLOCK])
    return preset


def create_lycoris(kohya, expert, cfg):
    """The LyCORIS network for one expert's DiT (not yet applied)."""
    import toml

    n = cfg.network
    kwargs = lycoris_kwargs(n.network_args, n.network_dropout)
    block = type(expert.model.blocks[0]).__name__
    with tempfile.TemporaryDirectory(prefix="lycoris_preset_") as folder:
        preset_file = Path(folder) / "preset.toml"
        preset_file.write_text(toml.dumps(resolve_preset(kwargs.get("preset", "full"), block)), encoding="utf-8")
        kwargs["preset"] = str(preset_file)
        if n.network_weights and n.dim_from_weights:
            net, _ = kohya.create_network_from_weights(1.0, n.network_weights, None, None, expert.model, **kwargs)
        else:
            net = kohya.create_network(1.0, expert.network_dim, n.network_alpha or expert.network_dim, None, None,
                                       expert.model, **kwargs)
    return net


def attach_lycoris(expert, cfg, share_with=None) -> None:
    """Create, apply and (with `network_weights`) fill the expert's LyCORIS network."""
    if share_with is not None:
        raise ConfigError("shared_expert_lora ties the LoRA tensors of both experts, which a LyCORIS network does not "
                          "support: train one network per expert, or use network_module = 'networks.lora_wan'")
    if cfg.saving.save_lora_format != "kohya":
        raise ConfigError(f"save_lora_format = {cfg.saving.save_lora_format!r}: LyCORIS networks are saved with "
                          "LyCORIS's own Kohya keys, which ComfyUI loads; remove save_lora_format")
    net = create_lycoris(import_lycoris(), expert, cfg)
    net.apply_to(None, expert.model, apply_text_encoder=False, apply_unet=True)
    if not net.loras:
        raise ConfigError(f"LyCORIS adapted no module of the {type(expert.model).__name__} (preset "
                          f"{cfg.network.network_args.get('preset', 'full')!r}): check its unet_target_module")
    n = cfg.network
    if n.network_weights and not n.dim_from_weights:
        report = net.load_weights(n.network_weights)
        if report:
            logger.warning("%s: network_weights %s: %s", expert.name, n.network_weights, report)
    logger.info("%s: LyCORIS network with %d modules", expert.name, len(net.loras))
    expert.network = LycorisNetwork(net)


class LycorisNetwork(torch.nn.Module):
    """A LyCORIS network as the loop, the optimizer and the checkpoints use a network (TrainableNetwork):
    its state dict is LyCORIS's own, its files carry LyCORIS's keys and `ss_network_module = lycoris.kohya`."""

    def __init__(self, lycoris: torch.nn.Module):
        super().__init__()
        self.lycoris = lycoris

    @property
    def loras(self) -> list:
        return self.lycoris.loras

    def state_dict(self, *args, **kwargs):
        return self.lycoris.state_dict(*args, **kwargs)

    def load_state_dict(self, state, strict: bool = True, assign: bool = False):
        return self.lycoris.load_state_dict(state, strict=strict)

    def prepare_optimizer_params(self, lr: float) -> list[dict]:
        groups, names = self.lycoris.prepare_optimizer_params(None, lr, lr)
        return [{**group, "params": list(group["params"]), "name": f"lycoris {name}".strip()}
                for group, name in zip(groups, names)]

    def apply_max_norm_regularization(self, max_norm: float, device=None) -> tuple[int, float, float]:
        device = device or next(self.lycoris.parameters()).device
        return self.lycoris.apply_max_norm_regularization(max_norm, device)

    def set_multiplier(self, multiplier: float) -> None:
        self.lycoris.multiplier = multiplier
        for module in self.loras:
            module.multiplier = multiplier

    def save_weights(self, path, dtype: torch.dtype | None = None, metadata: dict | None = None, fmt: str = "kohya",
                     write: bool = True) -> Path:
        """The LyCORIS tensors under LyCORIS's keys, written atomically with the run's metadata."""
        if not write:
            return Path(path)
        if fmt != "kohya":
            raise ValueError(f"LyCORIS networks are saved with their own Kohya keys, not {fmt!r}")
        tensors = {k: v.detach().to("cpu", dtype if dtype is not None and v.is_floating_point() else v.dtype)
                   .contiguous() for k, v in self.lycoris.state_dict().items()}
        return write_lora_file(tensors, path, {**(metadata or {}), "ss_network_module": MODULE})

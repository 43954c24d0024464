"""The LoRA engine: each expert's network, created by the module `network_module` names, started from
`network_weights` when given, shared between the two A14B experts with `shared_expert_lora`, and hooked
into the frozen DiT.

- `networks.lora_wan` (the default): this trainer's LoRA, through its Kohya entry points (WAN targets and
  default excludes);
- `lycoris.kohya`: LyCORIS (LoHa, LoKr, ...), called the way musubi-tuner calls it (`engines.lycoris`).
Any other value is refused by the config (`keys.NETWORK_MODULES`); it is checked again here, so a config
built without `validate` cannot train a module it did not name.
"""

from __future__ import annotations

import logging

from library.config import ConfigError
from library.config.keys import NETWORK_MODULES
from networks import lora_wan

logger = logging.getLogger(__name__)


def attach_lora(expert, cfg, share_with=None) -> None:
    """Create the expert's network with the module `network_module` names and attach it."""
    module = cfg.network.network_module
    if module not in NETWORK_MODULES:
        raise ConfigError(f"network_module = {module!r} is not a network module of this trainer; use one of "
                          + "; ".join(f"{name!r}: {what}" for name, what in NETWORK_MODULES.items()))
    logger.info("%s: network module %s", expert.name, module)
    if module == "lycoris.kohya":
        from .lycoris import attach_lycoris

        attach_lycoris(expert, cfg, share_with)
    else:
        _attach_lora_wan(expert, cfg, share_with)


def _attach_lora_wan(expert, cfg, share_with=None) -> None:
    """This trainer's LoRA: tied to `share_with` for a shared LoRA, or started from `network_weights`."""
    n = cfg.network
    if n.network_weights and n.dim_from_weights and share_with is None:
        net, weights = lora_wan.create_network_from_weights(1.0, n.network_weights, None, None, expert.model,
                                                            **n.network_args)
        net.load_weights(weights)
        expert.network_dim = max(lo.lora_dim for lo in net.loras)
    else:
        alpha = n.network_alpha or expert.network_dim
        net = lora_wan.create_network(1.0, expert.network_dim, alpha, None, None, expert.model,
                                      neuron_dropout=n.network_dropout, **n.network_args)
        if share_with is not None:  # one LoRA for both experts: the same Parameters on both models
            for mine, theirs in zip(net.loras, share_with.network.loras):
                mine.lora_down.weight, mine.lora_up.weight = theirs.lora_down.weight, theirs.lora_up.weight
        elif n.network_weights:
            net.load_weights(n.network_weights)
    net.apply_to()
    expert.network = net

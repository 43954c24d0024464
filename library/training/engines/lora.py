"""The LoRA engine: each expert's LoRA network, created through the Kohya entry points of
`networks.lora_wan` (WAN targets and default excludes), started from `network_weights` when given, shared
between the two A14B experts with `shared_expert_lora`, and hooked into the frozen DiT."""

from __future__ import annotations

from networks import lora_wan


def attach_lora(expert, cfg, share_with=None) -> None:
    """Create the expert's LoRA, tie it to `share_with` for a shared LoRA, or start it from
    `network_weights`; then attach the hooks."""
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

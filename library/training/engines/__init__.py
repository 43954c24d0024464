"""The training engines: what trains on each expert's DiT, behind one interface (`TrainableNetwork`).

- `lora`: the network `network_module` names, attached to the frozen DiT: `networks.lora_wan` (Kohya's
  create_network), the default of `train_network_wan.py`, or LyCORIS (`lycoris`, optional);
- `full` (+ `parameters`, `fused`, `sharding`): the DiT's own weights (`full_fine_tune`), with fp32 masters
  or `full_bf16`, the optimizer step inside the backward pass, and FSDP2 sharding over processes;
- `base_weights`: LoRA files merged into the DiT before training.

May import: `library.wan`, `library.runtime`, `library.config`, `networks`, `library.sampling.loras` (the
LoRA file checks shared with generation) and `library.training.seeding` / `dtypes`; never the loop
(`library.training.trainer`), the checkpoints or the planner.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

import torch


class TrainableNetwork(Protocol):
    """What the loop, the optimizer, checkpoints and resuming use of the thing that trains: a LoRA network
    (`networks.lora.LoRANetwork`) or the DiT's own weights (`engines.full.FullNetwork`)."""

    def prepare_optimizer_params(self, lr: float) -> list[dict]: ...

    def train(self, mode: bool = True): ...

    def eval(self): ...

    def to(self, *args, **kwargs): ...

    def state_dict(self) -> dict[str, torch.Tensor]: ...

    def load_state_dict(self, state: dict[str, torch.Tensor]): ...

    def save_weights(self, path, dtype: torch.dtype | None = None, metadata: dict | None = None, fmt: str = ...,
                     write: bool = True) -> Path:
        """Write the trained weights; with several processes of a sharded run every process calls this and
        only the one with `write` writes."""


def attach_network(expert, cfg, device, share_with=None) -> None:
    """Give `expert` the network that trains: its LoRA, or with `full_fine_tune` its own weights."""
    if cfg.finetune.full_fine_tune:
        from .full import attach_full

        attach_full(expert, cfg, device)
    else:
        from .lora import attach_lora

        attach_lora(expert, cfg, share_with)

"""The LoRA memory planner's inputs and outputs (`lora.py`): the training job (`Workload`), one rung's memory
settings (`Settings`, with the table's label for it) and its estimated memory (`Estimate`)."""

from __future__ import annotations

import math
from dataclasses import dataclass

from library.wan.variants import WanVariant


@dataclass(frozen=True)
class Workload:
    variant: WanVariant
    width: int
    height: int
    frames: int
    batch_size: int = 1
    rank: int = 32
    optimizer: str = "adamw"
    experts: int = 1  # 2: both WAN 2.2 A14B experts are trained in one run
    sequence_parallel: int = 1  # processes sharing each sample's tokens (`sequence_parallel_size`)
    gather_kv: bool = False  # sequence_parallel_attention = "all_gather": every process holds all keys and values

    @property
    def tokens(self) -> int:
        """Video tokens per sample: latent frames x (latent H / 2) x (latent W / 2)."""
        st, sh, sw = self.variant.vae_stride
        pt, ph, pw = self.variant.patch_size
        return ((self.frames - 1) // st + 1) // pt * (self.height // sh // ph) * (self.width // sw // pw)

    @property
    def local_tokens(self) -> int:
        """The tokens of a sample one process holds: all of them, or its slice under sequence parallelism
        (Ulysses: the attention of all tokens over heads / N is as large as that of tokens / N over all heads)."""
        return math.ceil(self.tokens / self.sequence_parallel)

    def split_bytes(self) -> int:
        """The all-to-all buffers of one block's attention under sequence parallelism: q, k, v and the output
        in bf16, sent and received (16 bytes per width unit and local token); 0 without it."""
        return 16 * self.variant.dim * self.local_tokens * self.batch_size if self.sequence_parallel > 1 else 0

    def gathered_bytes(self) -> int:
        """`all_gather` attention: the keys and values of every token in bf16, kept by a block for its backward
        pass (4 bytes per width unit and token of the whole sample); 0 otherwise."""
        return 4 * self.variant.dim * self.tokens * self.batch_size if self.gather_kv and self.sequence_parallel > 1 \
            else 0


def skipping_label(n: int) -> str:
    """'skipping the last block' / 'skipping the last N blocks' (`gradient_checkpointing_skip_blocks`)."""
    return "skipping the last block" if n == 1 else f"skipping the last {n} blocks"


@dataclass(frozen=True)
class Settings:
    fp8: bool = False
    checkpointing: bool = False
    offload_activations: bool = False
    blocks_to_swap: int = 0
    offload_inactive: bool = False
    keep_attention: bool = False  # selective checkpointing: self-attention outputs kept (needs checkpointing)
    keep_attention_blocks: int = 0  # ... in the last N checkpointed blocks only (without keep_attention)
    skip_blocks: int = 0  # the last N blocks are not checkpointed (needs checkpointing; not with block swap)
    offload_attention: bool = False  # the kept outputs go to the host with the offloaded inputs (`attention_on_host`)

    def checkpointed_blocks(self, num_layers: int) -> int:
        """How many blocks are checkpointed: the first num_layers - skip_blocks (0 without checkpointing)."""
        return max(0, num_layers - self.skip_blocks) if self.checkpointing else 0

    def kept_blocks(self, num_layers: int) -> int:
        """How many blocks keep their self-attention outputs (the last checkpointed ones)."""
        checkpointed = self.checkpointed_blocks(num_layers)
        return checkpointed if self.keep_attention else min(self.keep_attention_blocks, checkpointed)

    @property
    def attention_on_host(self) -> bool:
        """Whether `offload_attention` applies (`gradient_checkpointing_offload_attention`): it needs
        checkpointing, activation offload and kept attention; else it means nothing and is not applied."""
        return (self.offload_attention and self.checkpointing and self.offload_activations
                and (self.keep_attention or self.keep_attention_blocks > 0))

    def sent_blocks(self, num_layers: int) -> int:
        """How many blocks send their kept self-attention outputs to the host with their inputs: every kept block
        but the last checkpointed one, which keeps its input and its outputs on the GPU (0 unless
        `attention_on_host`)."""
        return max(0, self.kept_blocks(num_layers) - 1) if self.attention_on_host else 0

    def label(self) -> str:
        parts = ["fp8" if self.fp8 else "bf16"]
        if self.checkpointing:
            host = " on the host" if self.attention_on_host else ""
            parts.append("ckpt" + ("+offload" if self.offload_activations else "")
                         + (f" keeping attention{host}" if self.keep_attention else "")
                         + (f" keeping attention in {self.keep_attention_blocks} blocks{host}"
                            if self.keep_attention_blocks and not self.keep_attention else "")
                         + (f", {skipping_label(self.skip_blocks)}" if self.skip_blocks else ""))
        if self.blocks_to_swap:
            parts.append(f"swap {self.blocks_to_swap}")
        if self.offload_inactive:
            parts.append("inactive expert on CPU")
        return ", ".join(parts)


@dataclass(frozen=True)
class Estimate:
    """GiB on the GPU at the peak (the backward pass of one block), and in host memory for the GPU."""

    weights: float
    lora: float  # LoRA weights, gradients and optimizer state
    activations: float
    workspace: float
    host: float = 0.0  # offloaded inputs (and kept attention), swapped blocks, an inactive expert (not in `total`)

    @property
    def total(self) -> float:
        return self.weights + self.lora + self.activations + self.workspace

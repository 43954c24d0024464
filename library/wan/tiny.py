"""Tiny random-weight WAN model sets written in the official file formats, for the demo and the tests.

Nothing here is a shortcut around the real code: the files are what a user downloads (a DiT safetensors
per expert, the VAE `.pth`, the umT5 `.pth` and a tokenizer folder), only small, and everything that
reads them goes through `library.wan.loading` like real weights do. No downloads: the tokenizer is a
sentencepiece model trained on a built-in word list. WAN 2.1 I2V sets also get a CLIP vision `.pth` in the
official WAN naming (`visual.*`, plus a token text tower that the loader ignores).
"""

from __future__ import annotations

import io
import os
import random
from dataclasses import dataclass
from pathlib import Path

import torch

from .variants import get_variant

_WORDS = (
    "a the cat dog woman man child bird car boat runs walks jumps flies slowly quickly over under red blue "
    "green golden dark bright street field river forest city night sunset rain snow camera pans zooms close "
    "shot wide view of in on at with and style painting motion portrait smiling turning looking light"
).split()


@dataclass(frozen=True)
class TinyModelSet:
    dit: Path  # low-noise expert (or the only DiT)
    dit_high_noise: Path | None
    vae: Path
    t5: Path
    tokenizer: Path
    task: str
    clip: Path | None = None  # CLIP vision file (WAN 2.1 I2V variants only)


def _sentences(count: int = 400, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    syllables = ["ka", "lo", "mi", "ren", "tas", "vo", "zu", "pel", "dor", "ish"]
    out = []
    for _ in range(count):
        words = [rng.choice(_WORDS) if rng.random() < 0.8 else "".join(rng.choices(syllables, k=rng.randint(1, 3)))
                 for _ in range(rng.randint(3, 14))]
        out.append(" ".join(words) + rng.choice([".", ",", "!", ""]))
    return out


def write_tiny_tokenizer(folder: str | os.PathLike, vocab_size: int = 128) -> Path:
    """A umT5-style tokenizer folder (spiece.model, tokenizer.json, tokenizer_config.json): pad 0, eos 1,
    unk 2, no BOS, `vocab_size` pieces. Loads with `AutoTokenizer.from_pretrained(folder)` offline."""
    import sentencepiece as spm
    from transformers import T5Tokenizer

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(_sentences()), model_writer=model, model_type="unigram", vocab_size=vocab_size,
        pad_id=0, eos_id=1, unk_id=2, bos_id=-1, character_coverage=1.0, num_threads=1, minloglevel=2,
    )
    (folder / "spiece.model").write_bytes(model.getvalue())
    T5Tokenizer.from_pretrained(str(folder), local_files_only=True, extra_ids=0).save_pretrained(str(folder))
    return folder


def tiny_t5_state_dict(d_model: int, vocab: int = 160, layers: int = 2, heads: int = 4, ffn: int = 128,
                       buckets: int = 32, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random umT5 encoder weights under the official names (`token_embedding`, `blocks.N.attn.q`, ...)."""
    g = torch.Generator().manual_seed(seed)
    shapes = {"token_embedding.weight": (vocab, d_model), "norm.weight": (d_model,)}
    for i in range(layers):
        shapes |= {
            f"blocks.{i}.norm1.weight": (d_model,), f"blocks.{i}.norm2.weight": (d_model,),
            **{f"blocks.{i}.attn.{p}.weight": (d_model, d_model) for p in "qkvo"},
            f"blocks.{i}.ffn.gate.0.weight": (ffn, d_model), f"blocks.{i}.ffn.fc1.weight": (ffn, d_model),
            f"blocks.{i}.ffn.fc2.weight": (d_model, ffn),
            f"blocks.{i}.pos_embedding.embedding.weight": (buckets, heads),
        }
    sd = {}
    for key, shape in shapes.items():
        if "norm" in key:
            sd[key] = 1.0 + 0.1 * torch.randn(shape, generator=g)
        else:
            scale = 1.0 if "embedding" in key else shape[-1] ** -0.5
            sd[key] = torch.randn(shape, generator=g) * scale
    return sd


def tiny_clip_state_dict(hidden: int = 40, layers: int = 3, mlp: int = 160, patch: int = 14, image: int = 224,
                         out_dim: int = 24, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random CLIP weights in the official WAN `models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth`
    naming: the vision tower (`visual.*`, 4 heads at width 40 by `clip_vision.HEADS_BY_WIDTH`) and a
    token-sized text tower (`textual.*`, `log_scale`) that only shows the loader skips it."""
    g = torch.Generator().manual_seed(seed)
    tokens = (image // patch) ** 2 + 1
    shapes = {"visual.patch_embedding.weight": (hidden, 3, patch, patch), "visual.cls_embedding": (1, 1, hidden),
              "visual.pos_embedding": (1, tokens, hidden), "visual.pre_norm.weight": (hidden,),
              "visual.pre_norm.bias": (hidden,), "visual.post_norm.weight": (hidden,),
              "visual.post_norm.bias": (hidden,), "visual.head": (hidden, out_dim),
              "textual.token_embedding.weight": (16, 8), "textual.head.0.weight": (8, 8), "log_scale": ()}
    for i in range(layers):
        block = f"visual.transformer.{i}."
        shapes |= {block + "norm1.weight": (hidden,), block + "norm1.bias": (hidden,),
                   block + "attn.to_qkv.weight": (3 * hidden, hidden), block + "attn.to_qkv.bias": (3 * hidden,),
                   block + "attn.proj.weight": (hidden, hidden), block + "attn.proj.bias": (hidden,),
                   block + "norm2.weight": (hidden,), block + "norm2.bias": (hidden,),
                   block + "mlp.0.weight": (mlp, hidden), block + "mlp.0.bias": (mlp,),
                   block + "mlp.2.weight": (hidden, mlp), block + "mlp.2.bias": (hidden,)}
    sd = {}
    for key, shape in shapes.items():
        noise = torch.randn(shape, generator=g)
        if "norm" in key and key.endswith("weight"):
            sd[key] = 1.0 + 0.1 * noise
        elif key.endswith("bias") or key == "log_scale":
            sd[key] = 0.05 * noise
        elif key.endswith(("embedding", "token_embedding.weight")):
            sd[key] = 0.5 * noise
        else:  # Linear / conv weights: unit-variance outputs
            sd[key] = noise * (noise[0].numel() if len(shape) > 1 else 1) ** -0.5
    return sd


def tiny_dit_state_dict(task: str, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random DiT weights for a tiny variant, official names, with a non-zero output head."""
    from .vace import build_dit

    torch.manual_seed(seed)
    model = build_dit(get_variant(task))
    with torch.no_grad():
        model.head.head.weight.normal_(0, 0.02)
        if getattr(model, "img_emb", None) is not None and model.img_emb.emb_pos is not None:
            model.img_emb.emb_pos.normal_(0, 0.1)  # FLF2V: trained positions are not zero
        for name, param in model.named_parameters():  # VACE: a branch that changes the output
            if name.startswith("vace_blocks.") and ("after_proj" in name or "before_proj" in name):
                param.normal_(0, 0.02)
    return {k: v.contiguous() for k, v in model.state_dict().items()}


def _save_atomic(obj_writer, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    obj_writer(tmp)
    os.replace(tmp, path)


def write_tiny_model_set(folder: str | os.PathLike, task: str = "t2v-tiny", seed: int = 0) -> TinyModelSet:
    """Write a complete tiny model set for `task` into `folder` (skipping files already there)."""
    from safetensors.torch import save_file

    from .vae import WanVAE
    from .vae22 import Wan22VAE

    variant = get_variant(task)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    experts = ["low_noise", "high_noise"] if variant.two_experts else ["dit"]
    dits = {}
    for i, expert in enumerate(experts):
        path = folder / f"wan_{task}_{expert}.safetensors"
        if not path.exists():
            sd = tiny_dit_state_dict(task, seed + i)
            _save_atomic(lambda p: save_file(sd, str(p)), path)
        dits[expert] = path
    vae_path = folder / f"wan{variant.vae}_vae_tiny.pth"
    if not vae_path.exists():
        torch.manual_seed(seed)
        vae = WanVAE(dim=8, z_dim=16) if variant.vae == "2.1" else Wan22VAE(dim=8, decoder_dim=12, z_dim=48)
        _save_atomic(lambda p: torch.save(vae.state_dict(), p), vae_path)
    t5_path = folder / "umt5_tiny_enc.pth"
    if not t5_path.exists():
        sd = tiny_t5_state_dict(variant.text_dim, seed=seed)
        _save_atomic(lambda p: torch.save(sd, p), t5_path)
    tokenizer = folder / "google" / "umt5-xxl"  # where the official release keeps it, beside the T5 file
    if not (tokenizer / "tokenizer_config.json").exists():
        write_tiny_tokenizer(tokenizer)
    clip_path = None
    if variant.image_embedding:
        clip_path = folder / "clip_vision_tiny.pth"
        if not clip_path.exists():
            sd = tiny_clip_state_dict(hidden=variant.clip_dim, seed=seed)
            _save_atomic(lambda p: torch.save(sd, p), clip_path)
    return TinyModelSet(dit=dits.get("low_noise", dits.get("dit")), dit_high_noise=dits.get("high_noise"),
                        vae=vae_path, t5=t5_path, tokenizer=tokenizer, task=task, clip=clip_path)

"""Public loaders: one entry per model kind, each detecting the file format by itself.

`load_dit`, `load_vae`, `load_text_encoder` and `load_clip_vision` (from `clip_vision.py`) take a file or
a folder in any supported format (see `dit_formats.py` and `checkpoint_files.py`), build the model on the
`meta` device and assign each tensor as it is read and cast, so a 14B expert never sits twice in host RAM;
onto a GPU, every one of them casts through a few reused page-locked buffers (`staged_load.py`).
Loading a DiT straight into fp8 (`load_dit(fp8=...)`, `load_dit_fp8`) is `loading_fp8.py`, over the fp8
format and layer of `fp8.py`; the umT5 fp8 layers are built by `text_encoder_fp8.py`; what the loaders
share (opening a DiT, the NaN screen, reading one tensor) is `load_common.py`.
"""

from __future__ import annotations

import functools
import logging
import os
import re
from pathlib import Path

import torch

from .checkpoint_files import CheckpointError, open_checkpoint
from .clip_vision import load_clip_vision  # official .pth, open_clip, ComfyUI / HF names
from .dit_formats import FP8_DTYPES, describe_checkpoint, wrong_model
from .finite import NonFiniteWeights, refuse_non_finite
from .load_common import check_finite, check_keys, materialise, open_dit_checkpoint, open_dit_model, target_dtype
from .loading_fp8 import load_dit_fp8  # fp8_base: block Linear weights kept in fp8
from .model import WanModel
from .staged_load import staged_loader

logger = logging.getLogger(__name__)

__all__ = ["CheckpointError", "check_finite", "check_model_file", "load_clip_vision", "load_dit", "load_dit_fp8",
           "load_text_encoder", "load_vae", "open_dit_checkpoint"]


def check_model_file(path: str | os.PathLike, kind: str, task: str | None = None) -> None:
    """Check from its headers alone (nothing is loaded) that `path` holds `kind`: "dit" (of `task`'s variant
    when given), "vae" or "t5". A damaged, hostile or misplaced file fails here in a second, with the message
    its loader would give, instead of after the models before it have loaded."""
    if kind == "dit":
        open_dit_checkpoint(path, task)
        return
    ckpt = open_checkpoint(Path(path).expanduser())
    what, wanted = describe_checkpoint(ckpt.keys()), {"vae": "a WAN VAE", "t5": "a umT5 text encoder"}[kind]
    if what != wanted and not (kind == "t5" and what == "an unknown model"):  # umT5 names vary: its loader decides
        raise wrong_model(ckpt.source, what, wanted)


def load_dit(
    path: str | os.PathLike, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
    task: str | None = None, fp8=None,
) -> WanModel:
    """Load a WAN DiT from an official, ComfyUI, diffusers, fp8 or fp8_scaled checkpoint.

    `path` is a file, a folder with one file, or a folder / index JSON of shards. The variant is detected
    from tensor shapes; with `task` given, a checkpoint of another variant is an error naming both.
    Modulation, norms and the time MLPs are kept in fp32 whatever `dtype` is. The model comes back in
    eval mode with every parameter frozen.

    `fp8` (a `library.wan.fp8.FP8Config`) keeps the block Linear weights in fp8 (`fp8_base`): fp8 files
    are used as stored, others are quantised while loading; the model then computes in `dtype`.
    Without it, fp8 files are dequantised to `dtype`.
    """
    if fp8 is not None:
        return load_dit_fp8(path, device=device, dtype=dtype, task=task, config=fp8)
    ckpt, layout, variant, model, expected = open_dit_model(path, task)
    device = torch.device(device)
    state = {}
    sizes = (ref.numel() * target_dtype(n, dtype).itemsize for n, ref in expected.items())
    with staged_loader(device, lambda k, t: check_finite(ckpt, k, t), sizes) as stager:
        for name in expected:
            file_key = layout.key_map[name]
            state[name] = materialise(ckpt, layout, name, file_key, device, target_dtype(name, dtype), stager)
    model.load_state_dict(state, strict=True, assign=True)
    model.requires_grad_(False).eval()
    fp8 = layout.scales or any(ckpt.dtype(k) in FP8_DTYPES for k in layout.key_map.values())
    logger.info("loaded %s from %s%s%s", variant.name, ckpt.source, " [diffusers names]" if layout.diffusers else "",
                " (fp8 dequantised)" if fp8 else "")
    return model


# ---- VAE ------------------------------------------------------------------------------------------


def _vae_kind(keys: list[str]) -> tuple[str, bool]:
    """('2.1' | '2.2', diffusers names?) from key names alone."""
    diffusers = any(k.startswith(("post_quant_conv.", "decoder.conv_in.")) for k in keys)
    if diffusers:
        nested = any(re.match(r"^encoder\.down_blocks\.\d+\.resnets\.", k) for k in keys)
    else:
        nested = any(re.match(r"^encoder\.downsamples\.\d+\.downsamples\.", k) for k in keys)
    return ("2.2" if nested else "2.1"), diffusers


def _vae_config(sd_shapes: dict[str, tuple], kind: str) -> dict:
    """Constructor arguments of our VAE classes, inferred from official-named tensor shapes."""
    dim = sd_shapes["encoder.conv1.weight"][0]
    z_dim = sd_shapes["conv2.weight"][0]
    if kind == "2.1":
        res = sorted((int(m.group(1)), shape[0]) for k, shape in sd_shapes.items()
                     if (m := re.match(r"^encoder\.downsamples\.(\d+)\.residual\.6\.weight$", k)))
        resamples = sorted(int(m.group(1)) for k in sd_shapes
                           if (m := re.match(r"^encoder\.downsamples\.(\d+)\.resample\.1\.weight$", k)))
        temporal = [f"encoder.downsamples.{i}.time_conv.weight" in sd_shapes for i in resamples]
        per_level = resamples[0] if resamples else len(res)
        channels = [c for _, c in res][per_level - 1 :: per_level]
        return dict(dim=dim, z_dim=z_dim, dim_mult=[c // dim for c in channels], num_res_blocks=per_level,
                    temporal_downsample=temporal)
    levels = sorted({int(m.group(1)) for k in sd_shapes if (m := re.match(r"^encoder\.downsamples\.(\d+)\.", k))})
    per_level = len({m.group(1) for k in sd_shapes
                     if (m := re.match(r"^encoder\.downsamples\.0\.downsamples\.(\d+)\.residual\.", k))})
    channels = [sd_shapes[f"encoder.downsamples.{lv}.downsamples.{per_level - 1}.residual.6.weight"][0]
                for lv in levels]
    temporal = [any(re.match(rf"^encoder\.downsamples\.{lv}\.downsamples\.\d+\.time_conv\.", k) for k in sd_shapes)
                for lv in levels[:-1]]
    dim_mult = [c // dim for c in channels]
    return dict(dim=dim, decoder_dim=sd_shapes["decoder.conv1.weight"][0] // dim_mult[-1], z_dim=z_dim,
                dim_mult=dim_mult, num_res_blocks=per_level, temporal_downsample=temporal)


def load_vae(path: str | os.PathLike, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
             cache_cpu: bool = False):
    """Load the WAN 2.1 VAE (`Wan2.1_VAE.pth`, ComfyUI `wan_2.1_vae.safetensors`) or the WAN 2.2 VAE
    (`Wan2.2_VAE.pth`, `wan2.2_vae.safetensors`), official or diffusers names; the kind is detected from
    the keys. Returns `WanVAE` or `Wan22VAE` in eval mode, frozen, with `encode` / `decode`. `cache_cpu`
    (`vae_cache_cpu`) keeps the causal chunk cache in host memory: less VRAM, the same numbers."""
    from .vae import WanVAE
    from .vae22 import Wan22VAE
    from .vae_formats import vae21_state_dict_from_diffusers, vae22_state_dict_from_diffusers

    ckpt = open_checkpoint(Path(path).expanduser())
    keys = ckpt.keys()
    prefix = next((p for p in ("first_stage_model.", "vae.") if all(k.startswith(p) for k in keys)), "")
    what = describe_checkpoint(keys)
    if what != "a WAN VAE":
        raise wrong_model(ckpt.source, what, "a WAN VAE")
    kind, diffusers = _vae_kind([k[len(prefix):] for k in keys])
    names = {k[len(prefix):]: k for k in keys}  # name without prefix -> file key
    if diffusers:
        convert = vae21_state_dict_from_diffusers if kind == "2.1" else vae22_state_dict_from_diffusers
        names = convert(names)  # renames keys; the values (file keys) ride along
    shapes = {name: ckpt.shape(file_key) for name, file_key in names.items()}
    try:
        config = _vae_config(shapes, kind)
    except (KeyError, IndexError, ZeroDivisionError) as exc:
        raise CheckpointError(f"{ckpt.source}: incomplete WAN {kind} VAE (cannot read its layout: {exc})") from None
    with torch.device("meta"):
        vae = (WanVAE if kind == "2.1" else Wan22VAE)(**config)
    expected = vae.state_dict()
    check_keys(ckpt, expected, names, f"WAN {kind} VAE")
    state = {}
    for name, ref in expected.items():
        if shapes[name] != tuple(ref.shape):
            raise CheckpointError(f"{ckpt.source}: tensor {names[name]!r} has shape {list(shapes[name])}, expected "
                                  f"{list(ref.shape)}; the file does not match its own layout (damaged or edited)")
    sizes = (ref.numel() * dtype.itemsize for ref in expected.values())
    screen = functools.partial(check_finite, ckpt)  # (key, tensor): NaN / infinity refused naming both
    with staged_loader(torch.device(device), screen, sizes) as stager:  # onto a GPU: screened at the end
        for name in expected:
            source = ckpt.read(names[name])
            if stager is None:
                state[name] = source.to(device=device, dtype=dtype)
                check_finite(ckpt, names[name], state[name])
            else:
                state[name] = stager.load(names[name], source, dtype)
    vae.load_state_dict(state, strict=True, assign=True)
    vae.to(device)  # the latent statistics buffers
    vae.cache_device = torch.device("cpu") if cache_cpu else None
    logger.info("loaded WAN %s VAE from %s%s", kind, ckpt.source, " [diffusers names]" if diffusers else "")
    return vae.requires_grad_(False).eval()


# ---- text encoder ---------------------------------------------------------------------------------

_TOKENIZER_CANDIDATES = ("google/umt5-xxl", "umt5-xxl", "tokenizer")
_TOKENIZER_FILES = ("spiece.model", "tokenizer.json")


def find_tokenizer(t5_path: Path) -> Path:
    """The tokenizer folder for the weights at `t5_path`: the folder holding them when it has the
    tokenizer files itself (a Hugging Face umT5 folder), else one of the usual sub-folders."""
    folder = t5_path if t5_path.is_dir() else t5_path.parent
    for candidate in (folder, *(folder / name for name in _TOKENIZER_CANDIDATES)):
        if any((candidate / name).is_file() for name in _TOKENIZER_FILES):
            return candidate
    raise CheckpointError(
        f"{t5_path}: no tokenizer given and none found beside it ({' or '.join(_TOKENIZER_FILES)} in "
        f"{folder} or its sub-folders {', '.join(_TOKENIZER_CANDIDATES)}); pass the local google/umt5-xxl "
        "tokenizer folder with --tokenizer"
    )


def load_text_encoder(
    path: str | os.PathLike, tokenizer_path: str | os.PathLike | None = None,
    device: str | torch.device = "cpu", dtype: torch.dtype = torch.bfloat16, fp8=False,
):
    """Load umT5-XXL from the official `models_t5_umt5-xxl-enc-bf16.pth`, a ComfyUI / HF
    `umt5_xxl_*.safetensors` (fp16, fp8, fp8_scaled) or an HF folder, plus the tokenizer from a local
    folder (default: `google/umt5-xxl/` beside the weights). Returns a `WanTextEncoder` whose
    `encode(prompts)` gives one [L_i, 4096] tensor per prompt.

    `fp8` (`fp8_t5`: True, or a `library.wan.fp8.FP8Config`) keeps the attention and FFN Linear weights
    of every block in fp8 e4m3fn with per-channel scales, quantised layer by layer as they are read; fp8
    files are used as stored. Embeddings, relative attention bias and norms stay in `dtype`, which the
    model computes in. Without it, fp8 files are dequantised to `dtype`."""
    from .text_encoder import build_text_encoder

    path = Path(path).expanduser()
    ckpt = open_checkpoint(path)
    what = describe_checkpoint(ckpt.keys())
    if what not in ("a umT5 text encoder", "an unknown model"):
        raise wrong_model(ckpt.source, what, "a umT5 text encoder")
    tokenizer = Path(tokenizer_path).expanduser() if tokenizer_path else find_tokenizer(path)
    state = {k: ckpt.read(k) for k in ckpt.keys()}  # zero-copy views of the mapped file
    file_keys = {id(tensor): key for key, tensor in state.items()}

    def release(tensor: torch.Tensor) -> None:  # a tensor copied elsewhere: drop its mapped pages
        if id(tensor) in file_keys:
            ckpt.release(file_keys[id(tensor)])

    def check(key: str, source: torch.Tensor, tensor: torch.Tensor) -> None:  # named by the file's own key
        if id(source) in file_keys:
            check_finite(ckpt, file_keys[id(source)], tensor)
        else:
            refuse_non_finite(ckpt.source, key, tensor)

    try:
        return build_text_encoder(state, tokenizer, device=device, dtype=dtype, fp8=fp8 or None, release=release,
                                  check=check)
    except NonFiniteWeights:
        raise  # names its file already
    except CheckpointError as exc:
        raise CheckpointError(f"{ckpt.source}: {exc}") from None


"""The WAN text encoder: umT5-XXL (encoder only), run through transformers' `UMT5EncoderModel`.

What belongs here:
- prompt cleaning exactly as the official pipeline does it (`clean_prompt`);
- the umT5 checkpoint formats: official names (`models_t5_umt5-xxl-enc-bf16.pth`) mapped to Hugging Face
  names, HF / ComfyUI files (`umt5_xxl_*.safetensors`) tidied up, the config inferred from the shapes;
- local tokenizer loading (never a hub download);
- `WanTextEncoder`, which turns prompts into per-prompt embeddings `[L_i, d_model]` trimmed to their
  true length (tokens + EOS), and `build_text_encoder`, which builds it from an in-memory state dict;
- the switch to fp8 weights (`fp8_t5`) while building; the fp8 layers themselves are built by
  `text_encoder_fp8.py`.

What does not: reading checkpoint files (`library/wan/loading.py` reads them and calls
`build_text_encoder`), caching embeddings (`library/data`), and zero-padding back to `text_len`
(the DiT does that).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable
from pathlib import Path

import torch
from transformers import UMT5Config, UMT5EncoderModel

from .checkpoint_files import CheckpointError
from .dit_formats import FP8_DTYPES, dequantize
from .finite import refuse_non_finite
from .prompt_text import clean_prompt  # noqa: F401 - imported from here by callers
from .staged_load import staged_loader
from .text_encoder_fp8 import FP8_TARGET_RE, assign_fp8_layers, t5_fp8_config

logger = logging.getLogger(__name__)

TEXT_LEN = 512  # tokens the official pipeline pads / truncates to (EOS included)

# Official umT5 block names -> HF `encoder.block.N.` names (facts: wan_facts.md section 5).
_OFFICIAL_BLOCK_NAMES = {
    "norm1.weight": "layer.0.layer_norm.weight",
    "attn.q.weight": "layer.0.SelfAttention.q.weight",
    "attn.k.weight": "layer.0.SelfAttention.k.weight",
    "attn.v.weight": "layer.0.SelfAttention.v.weight",
    "attn.o.weight": "layer.0.SelfAttention.o.weight",
    "pos_embedding.embedding.weight": "layer.0.SelfAttention.relative_attention_bias.weight",
    "norm2.weight": "layer.1.layer_norm.weight",
    "ffn.gate.0.weight": "layer.1.DenseReluDense.wi_0.weight",  # the GELU'd branch
    "ffn.fc1.weight": "layer.1.DenseReluDense.wi_1.weight",
    "ffn.fc2.weight": "layer.1.DenseReluDense.wo.weight",
}
_OFFICIAL_TOP_NAMES = {"norm.weight": "encoder.final_layer_norm.weight"}
_OFFICIAL_BLOCK_RE = re.compile(r"^blocks\.(\d+)\.(.+)$")
_OFFICIAL_T5_BLOCK_RE = re.compile(  # keys that only the official T5 has (the DiT uses self_attn / ffn.0)
    r"^blocks\.\d+\.(attn\.[qkvo]|ffn\.gate\.0|pos_embedding\.embedding)\.weight$"
)
_HF_BLOCK_RE = re.compile(r"^encoder\.block\.(\d+)\.")

_SHARED = "shared.weight"
_EMBED = "encoder.embed_tokens.weight"
_FINAL_NORM = "encoder.final_layer_norm.weight"
_REL_BIAS = "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"

# Keys that are not encoder weights: ComfyUI stores the tokenizer (`spiece_model`) and a scaled-fp8
# marker (`scaled_fp8`) in the file; full HF checkpoints carry a decoder and an LM head.
_EXTRA_KEYS = {"spiece_model", "scaled_fp8"}
_EXTRA_PREFIXES = ("decoder.", "lm_head.")
_SCALE_SUFFIXES = (".scale_weight", ".weight_scale")  # per-weight dequantisation scales (multiply)
_IGNORED_SUFFIXES = (".scale_input", ".input_scale", ".comfy_quant")


# ---------------------------------------------------------------------------------------------------
# 1. Prompt cleaning
# ---------------------------------------------------------------------------------------------------


# `clean_prompt` (the official WAN prompt cleaning) lives in `prompt_text.py`, which imports no transformers:
# caption hashing in every training process needs it without loading the text encoder's dependencies.


# ---------------------------------------------------------------------------------------------------
# 2. Checkpoint formats
# ---------------------------------------------------------------------------------------------------


def detect_t5_format(keys: Iterable[str]) -> str:
    """Return "official" or "hf" for a umT5 encoder state dict's keys; raise for anything else."""
    keys = list(keys)
    if any(k.endswith(_FINAL_NORM) or k.endswith(_SHARED) or k.endswith(_EMBED) for k in keys):
        return "hf"
    if "token_embedding.weight" in keys or any(_OFFICIAL_T5_BLOCK_RE.match(k) for k in keys):
        return "official"
    raise CheckpointError(
        "This state dict is not a umT5 encoder checkpoint: it has neither official WAN T5 keys "
        "(token_embedding.weight, blocks.N.attn.q.weight, ...) nor Hugging Face / ComfyUI keys "
        f"(shared.weight, encoder.block.N..., {_FINAL_NORM}). First keys: {keys[:5]}. "
        "Point the text encoder option at models_t5_umt5-xxl-enc-bf16.pth or umt5_xxl_*.safetensors."
    )


def t5_state_dict_from_official(sd: dict) -> dict:
    """Rename an official umT5 encoder state dict to `UMT5EncoderModel` names (tensors are not copied).

    `token_embedding.weight` becomes both `shared.weight` and `encoder.embed_tokens.weight` (the same
    tensor). Keys this mapping does not know keep their name, so a strict load reports them.
    """
    out = {}
    for key, tensor in sd.items():
        block = _OFFICIAL_BLOCK_RE.match(key)
        if key == "token_embedding.weight":
            out[_SHARED] = tensor
            out[_EMBED] = tensor
        elif key in _OFFICIAL_TOP_NAMES:
            out[_OFFICIAL_TOP_NAMES[key]] = tensor
        elif block and block.group(2) in _OFFICIAL_BLOCK_NAMES:
            out[f"encoder.block.{block.group(1)}.{_OFFICIAL_BLOCK_NAMES[block.group(2)]}"] = tensor
        else:
            out[key] = tensor
    return out


def _strip_bundle_prefix(sd: dict) -> dict:
    """Drop a prefix such as `text_encoders.umt5xxl.transformer.` that bundles put before HF names."""
    anchor = next((k for k in sd if k.endswith(_FINAL_NORM)), None)
    prefix = anchor[: -len(_FINAL_NORM)] if anchor else ""
    if not prefix:
        return sd
    logger.debug("umT5: stripping key prefix %r", prefix)
    return {k[len(prefix) :]: v for k, v in sd.items() if k.startswith(prefix)}


def _tidy_hf_state_dict(sd: dict) -> tuple[dict, dict]:
    """HF / ComfyUI names -> the `UMT5EncoderModel` keys (plus anything unknown, for the key check).

    Drops non-weight extras and makes sure both `shared.weight` and `encoder.embed_tokens.weight` are
    present (ComfyUI files often carry only one). Returns `(weights, scales)`: `scales` maps a weight
    key to its scaled-fp8 factor (`real = stored * scale`), applied later one tensor at a time.
    """
    sd = _strip_bundle_prefix(sd)
    scales = {k.rsplit(".", 1)[0] + ".weight": v for k, v in sd.items() if k.endswith(_SCALE_SUFFIXES)}
    not_weights = _IGNORED_SUFFIXES + _SCALE_SUFFIXES
    dropped = {k for k in sd if k in _EXTRA_KEYS or k.startswith(_EXTRA_PREFIXES) or k.endswith(not_weights)}
    if dropped:
        logger.debug("umT5: ignoring %d non-weight keys, e.g. %s", len(dropped), sorted(dropped)[:3])
    weights = {k: v for k, v in sd.items() if k not in dropped}
    embedding = weights.get(_SHARED, weights.get(_EMBED))
    if embedding is not None:
        weights[_SHARED] = weights[_EMBED] = embedding
    return weights, scales


def umt5_config_from_state_dict(sd_hf: dict) -> UMT5Config:
    """Infer the umT5 encoder config from HF-named weight shapes; the rest as `google/umt5-xxl`."""
    needed = (_SHARED, _REL_BIAS, "encoder.block.0.layer.0.SelfAttention.q.weight",
              "encoder.block.0.layer.1.DenseReluDense.wi_0.weight")
    missing = [k for k in needed if k not in sd_hf]
    if missing:
        raise CheckpointError(
            f"Cannot infer the umT5 config: missing {missing}. This state dict is not a umT5 encoder "
            f"checkpoint (first keys: {list(sd_hf)[:5]})."
        )
    vocab_size, d_model = sd_hf[_SHARED].shape  # [V, C]
    num_buckets, num_heads = sd_hf[_REL_BIAS].shape  # [32, heads]
    inner_dim = sd_hf["encoder.block.0.layer.0.SelfAttention.q.weight"].shape[0]  # [heads * d_kv, C]
    d_ff = sd_hf["encoder.block.0.layer.1.DenseReluDense.wi_0.weight"].shape[0]  # [d_ff, C]
    num_layers = 1 + max(int(m.group(1)) for k in sd_hf if (m := _HF_BLOCK_RE.match(k)))
    return UMT5Config(
        vocab_size=int(vocab_size),
        d_model=int(d_model),
        d_kv=int(inner_dim) // int(num_heads),
        d_ff=int(d_ff),
        num_layers=int(num_layers),
        num_heads=int(num_heads),
        relative_attention_num_buckets=int(num_buckets),
        relative_attention_max_distance=128,
        feed_forward_proj="gated-gelu",  # gelu_new, the tanh approximation, as the official code
        layer_norm_epsilon=1e-6,
        dropout_rate=0.1,  # inactive: the encoder always runs in eval()
        use_cache=False,
        attn_implementation="sdpa",
    )


# ---------------------------------------------------------------------------------------------------
# 3. Tokenizer
# ---------------------------------------------------------------------------------------------------


def load_tokenizer(tokenizer_path):
    """Load the umT5 tokenizer from a local folder (`google/umt5-xxl` layout); never downloads.

    The folder needs `spiece.model` or `tokenizer.json`; with a `tokenizer_config.json` it goes through
    `AutoTokenizer`, otherwise through `T5Tokenizer`. A path to one of those files means its folder.
    """
    from transformers import AutoTokenizer, T5Tokenizer

    path = Path(tokenizer_path)
    if path.is_file():
        path = path.parent
    needs = ("spiece.model", "tokenizer.json")
    if not path.is_dir() or not any((path / name).is_file() for name in needs):
        state = "does not exist" if not path.exists() else "has neither spiece.model nor tokenizer.json"
        raise FileNotFoundError(
            f"umT5 tokenizer folder {path} {state}. It must be a local copy of the google/umt5-xxl "
            "tokenizer (spiece.model or tokenizer.json, plus tokenizer_config.json if you have it), "
            "for example the google/umt5-xxl folder shipped next to the WAN checkpoints."
        )
    try:
        if (path / "tokenizer_config.json").is_file():
            tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        else:
            # no sentinel <extra_id_N> tokens: they only serve span-corruption pre-training, and 100 of
            # them appended after the pieces could run past the embedding table
            tokenizer = T5Tokenizer.from_pretrained(str(path), local_files_only=True, extra_ids=0)
    except Exception as error:  # transformers raises many kinds; say which folder failed
        raise CheckpointError(f"Could not load the umT5 tokenizer from {path}: {error}; pass the local "
                              "google/umt5-xxl tokenizer folder") from error
    if tokenizer.pad_token_id is None or tokenizer.eos_token_id is None:
        raise CheckpointError(f"The tokenizer in {path} has no pad or EOS token; it is not a umT5 tokenizer: pass the "
                              "google/umt5-xxl tokenizer folder")
    return tokenizer


# ---------------------------------------------------------------------------------------------------
# 4. The encoder
# ---------------------------------------------------------------------------------------------------


class WanTextEncoder:
    """umT5 encoder + tokenizer: prompts -> list of `[L_i, d_model]` embeddings (EOS included)."""

    def __init__(self, model: UMT5EncoderModel, tokenizer, max_length: int = TEXT_LEN):
        if len(tokenizer) > model.config.vocab_size:
            raise CheckpointError(
                f"The tokenizer has {len(tokenizer)} tokens but the umT5 weights only "
                f"{model.config.vocab_size}: the tokenizer folder does not belong to this text encoder."
            )
        self.model = model.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.max_length = max_length

    @property
    def device(self) -> torch.device:
        return self.model.shared.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.shared.weight.dtype

    def to(self, device) -> WanTextEncoder:
        self.model.to(device)
        return self

    @torch.no_grad()
    def encode(self, prompts: list[str]) -> list[torch.Tensor]:
        """Encode prompts as the official pipeline: pad to max_length, mask, trim to the true length."""
        if isinstance(prompts, str):
            prompts = [prompts]
        if not prompts:
            return []
        tokens = self.tokenizer(
            [clean_prompt(p) for p in prompts],
            padding="max_length",
            truncation=True,
            max_length=self.max_length,
            add_special_tokens=True,  # appends EOS (</s> = 1)
            return_attention_mask=True,
            return_tensors="pt",
        )
        ids = tokens.input_ids.to(self.device)  # [B, max_length]
        mask = tokens.attention_mask.to(self.device)  # [B, max_length], 1 = real token
        hidden = self.model(input_ids=ids, attention_mask=mask).last_hidden_state  # [B, max_length, C]
        lengths = mask.sum(dim=1).tolist()  # true lengths, EOS included
        return [h[:n] for h, n in zip(hidden, lengths)]  # each [L_i, C]


def _check_keys(sd: dict, expected: set[str]) -> None:
    """Raise a clear error when the converted keys are not exactly the umT5 encoder's."""
    missing = sorted(expected - sd.keys())
    unexpected = sorted(sd.keys() - expected)
    if missing or unexpected:
        raise CheckpointError(
            "This state dict is not a umT5 encoder checkpoint (after mapping to Hugging Face names): "
            f"{len(missing)} missing keys, e.g. {missing[:4]}; {len(unexpected)} unexpected keys, "
            f"e.g. {unexpected[:4]}. Use models_t5_umt5-xxl-enc-bf16.pth or umt5_xxl_*.safetensors."
        )


def build_text_encoder(sd: dict, tokenizer_path, device="cpu", dtype=torch.bfloat16, fp8=None,
                       release=None, check=None) -> WanTextEncoder:
    """Build the frozen umT5 encoder from an in-memory state dict (official or HF names) + tokenizer.

    The model is built on the meta device and the given tensors are assigned into it, cast one at a
    time, so the weights never sit twice in memory. With float16, the FFN output projections (`wo`)
    stay float32 as transformers does (`_keep_in_fp32_modules`): umT5 overflows in fp16 otherwise.

    `fp8` (True, or a `library.wan.fp8.FP8Config`; default per-channel scaled) stores the block Linear
    layers in fp8 (`t5_fp8_config`); the rest stays in `dtype`, which is also what the model computes in.
    `release(tensor)`, when given, is called for each input tensor once it has been copied (the loader
    drops the file's mapped pages with it). `check(key, source, tensor)` refuses a weight holding NaN or
    infinity (`source`: the input tensor, `tensor`: its loaded values; default: `refuse_non_finite`
    naming the key); the loader's names the file and the file's key.
    """
    tokenizer = load_tokenizer(tokenizer_path)
    fmt = detect_t5_format(sd.keys())
    sd_hf = t5_state_dict_from_official(sd) if fmt == "official" else sd
    sd_hf, scales = _tidy_hf_state_dict(sd_hf)
    config = umt5_config_from_state_dict(sd_hf)
    with torch.device("meta"):
        model = UMT5EncoderModel(config)
    _check_keys(sd_hf, set(model.state_dict().keys()))
    fp8 = t5_fp8_config(fp8)
    check = check or (lambda key, source, tensor: refuse_non_finite("umT5 state dict", key, tensor))
    report = assign_fp8_layers(model, sd_hf, scales, device, fp8, release, check) if fp8 is not None else None

    keep_fp32 = tuple(model._keep_in_fp32_modules or ()) if dtype == torch.float16 and fp8 is None else ()
    # The embedding is tied to shared.weight below; fp8 layers are already in place.
    targets = {key: torch.float32 if any(f".{name}." in key for name in keep_fp32) else dtype for key in sd_hf
               if not (key == _EMBED or (fp8 is not None and FP8_TARGET_RE.match(key)))}
    weights = {}
    sizes = (sd_hf[key].numel() * target.itemsize for key, target in targets.items())
    screen = lambda key, tensor: check(key, sd_hf[key], tensor)  # noqa: E731 - the staged load's, at its end
    with staged_loader(torch.device(device), screen, sizes) as stager:  # onto a GPU: page-locked staging buffers
        for key, target in targets.items():
            tensor = sd_hf[key]
            if stager is not None and key not in scales and tensor.dtype not in FP8_DTYPES:
                weights[key] = stager.load(key, tensor, target)  # the values of `.to(target)`
            else:
                if key in scales:  # a NaN scale is named as itself, not as the weight it spoils
                    check(key, scales[key], scales[key])
                weights[key] = dequantize(tensor.to(device), scales.get(key), target)  # any dtype -> target
                check(key, tensor, weights[key])
            if release is not None and weights[key].data_ptr() != tensor.data_ptr():
                release(tensor)
    try:
        model.load_state_dict(weights, strict=False, assign=True)
    except RuntimeError as error:  # shape mismatches between layers
        raise CheckpointError(f"umT5 encoder weights have inconsistent shapes: {error}") from error
    model.encoder.embed_tokens.weight = model.shared.weight  # tie: one tensor, two names
    left = [name for name, t in (*model.named_parameters(), *model.named_buffers()) if t.is_meta]
    if left:
        raise CheckpointError(f"umT5 encoder: {len(left)} tensors were not loaded, e.g. {left[:3]}")
    model.fp8_report = report
    logger.info(
        "umT5 encoder (%s names): %d layers, d_model %d, vocab %d, %s on %s%s",
        fmt, config.num_layers, config.d_model, config.vocab_size, dtype, device,
        f"; {report.summary()}" if report else "",
    )
    return WanTextEncoder(model, tokenizer)

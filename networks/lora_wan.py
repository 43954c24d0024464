"""WAN LoRA: the target and exclude names, plus the Kohya entry points (`--network_module networks.lora_wan`).

Targets are the Linear layers of every DiT block, by their official names: `self_attn.{q,k,v,o}`,
`cross_attn.{q,k,v,o}`, `cross_attn.{k_img,v_img}` (WAN 2.1 I2V) and `ffn.0` / `ffn.2`. Embeddings,
time projection, norms, modulation and the head are excluded by default (musubi's exclude regex), and
`include_patterns` can add them back. `network_args` keys: see `NETWORK_ARG_KEYS`.
"""

from __future__ import annotations

import ast
import difflib
import logging
import re
from typing import Any, Mapping

from .lora import LoRANetwork, group_lora_keys, read_lora_file
from .metadata import build_metadata

logger = logging.getLogger(__name__)

WAN_TARGETS = ("self_attn.q", "self_attn.k", "self_attn.v", "self_attn.o", "cross_attn.q", "cross_attn.k",
               "cross_attn.v", "cross_attn.o", "cross_attn.k_img", "cross_attn.v_img", "ffn.0", "ffn.2")
WAN_DEFAULT_EXCLUDES = (r".*(patch_embedding|text_embedding|time_embedding|time_projection|norm|head|"
                        r"modulation|img_emb).*",)

# diffusers WanTransformer3DModel module names -> official names, for the Linear layers a LoRA may touch
_DIFFUSERS_MODULES = [
    (r"\.attn1\.", ".self_attn."), (r"\.attn2\.", ".cross_attn."), (r"\.to_q$", ".q"), (r"\.to_k$", ".k"),
    (r"\.to_v$", ".v"), (r"\.to_out\.0$", ".o"), (r"\.add_k_proj$", ".k_img"), (r"\.add_v_proj$", ".v_img"),
    (r"\.ffn\.net\.0\.proj$", ".ffn.0"), (r"\.ffn\.net\.2$", ".ffn.2"), (r"^proj_out$", "head.head"),
    (r"^condition_embedder\.time_proj$", "time_projection.1"),
    (r"^(vace_blocks\.\d+)\.proj_in$", r"\1.before_proj"), (r"^(vace_blocks\.\d+)\.proj_out$", r"\1.after_proj"),
    (r"^condition_embedder\.time_embedder\.linear_(\d)$", lambda m: f"time_embedding.{2 * int(m[1]) - 2}"),
    (r"^condition_embedder\.text_embedder\.linear_(\d)$", lambda m: f"text_embedding.{2 * int(m[1]) - 2}"),
    (r"^condition_embedder\.image_embedder\.ff\.net\.0\.proj$", "img_emb.proj.1"),  # WAN 2.1 I2V image MLP
    (r"^condition_embedder\.image_embedder\.ff\.net\.2$", "img_emb.proj.3"),
]
_DIFFUSERS_RULES = [(re.compile(p), r) for p, r in _DIFFUSERS_MODULES]

NETWORK_ARG_KEYS = {
    "loraplus_lr_ratio": "LoRA+: the up weights train at learning_rate * ratio (e.g. 4 or 16)",
    "exclude_patterns": "regexes (re.match on official module names) added to the default excludes",
    "include_patterns": "regexes that select modules even when excluded or outside the targets",
    "rank_dropout": "probability of dropping each rank channel while training",
    "module_dropout": "probability of skipping a whole module for a step while training",
    "verbose": "log every LoRA module",
}
_RATIOS = ("rank_dropout", "module_dropout")


def diffusers_module_to_official(name: str) -> str:
    """`blocks.0.attn1.to_q` -> `blocks.0.self_attn.q`; official names pass through unchanged."""
    for pattern, repl in _DIFFUSERS_RULES:
        name = pattern.sub(repl, name)
    return name


def _as_list(value: Any) -> list[str]:
    """A list, a Python/JSON list literal string, or one pattern -> a list of strings."""
    if value is None or value == "":
        return []
    if isinstance(value, str):
        try:
            value = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            return [value]
    return [str(v) for v in value] if isinstance(value, (list, tuple)) else [str(value)]


def _as_float(value: Any) -> float | None:
    return None if value is None or value == "" else float(value)


def _as_bool(value: Any) -> bool:
    return value.strip().lower() in ("true", "1", "yes", "on") if isinstance(value, str) else bool(value)


def check_network_args(args: Mapping[str, Any]) -> list[str]:
    """Problems with `network_args` (unknown keys with the closest valid one, bad ranges, bad regexes)."""
    problems = []
    for key, value in args.items():
        if key not in NETWORK_ARG_KEYS:
            close = difflib.get_close_matches(key, list(NETWORK_ARG_KEYS), n=1, cutoff=0.6)
            hint = f"did you mean {close[0]!r}?" if close else f"valid keys: {', '.join(NETWORK_ARG_KEYS)}"
            problems.append(f"unknown key {key!r}; {hint}")
            continue
        try:
            if key in _RATIOS and not 0.0 <= (_as_float(value) or 0.0) < 1.0:
                problems.append(f"{key} = {value!r} must be in [0, 1)")
            if key == "loraplus_lr_ratio" and (_as_float(value) or 1.0) <= 0:
                problems.append(f"loraplus_lr_ratio = {value!r} must be greater than 0")
        except (TypeError, ValueError):
            problems.append(f"{key} = {value!r} is not a number")
        if key.endswith("_patterns"):
            for pattern in _as_list(value):
                try:
                    re.compile(pattern)
                except re.error as exc:
                    problems.append(f"{key}: {pattern!r} is not a valid regex ({exc})")
    return problems


def _network_options(kwargs: Mapping[str, Any]) -> dict[str, Any]:
    problems = check_network_args({k: v for k, v in kwargs.items() if v is not None})
    if problems:
        raise ValueError("network_args: " + "; ".join(problems))
    return dict(
        loraplus_lr_ratio=_as_float(kwargs.get("loraplus_lr_ratio")),
        rank_dropout=_as_float(kwargs.get("rank_dropout")),
        module_dropout=_as_float(kwargs.get("module_dropout")),
        include_patterns=_as_list(kwargs.get("include_patterns")),
        exclude_patterns=_as_list(kwargs.get("exclude_patterns")) + list(WAN_DEFAULT_EXCLUDES),
        verbose=_as_bool(kwargs.get("verbose", False)),
    )


def create_network(multiplier: float, network_dim: int | None, network_alpha: float | None, vae, text_encoders,
                   unet, neuron_dropout: float | None = None, **kwargs) -> LoRANetwork:
    """Kohya entry point: a LoRA over the WAN DiT `unet` (vae and text encoders are not targets).
    `kwargs` are the `network_args` (typed values or Kohya's strings). Call `apply_to()` to attach."""
    return LoRANetwork(
        unet, WAN_TARGETS, dim=network_dim or 4, alpha=1.0 if network_alpha is None else network_alpha,
        multiplier=multiplier, dropout=neuron_dropout, name_map=diffusers_module_to_official,
        **_network_options(kwargs),
    )


def dims_from_weights(weights_sd: Mapping[str, Any]) -> tuple[dict[str, int], dict[str, float], list[str]]:
    """Per-module rank and alpha from a LoRA state dict (any supported key form), and the unusable keys."""
    grouped, unknown = group_lora_keys(weights_sd, diffusers_module_to_official)
    dims, alphas = {}, {}
    for name, parts in grouped.items():
        if "down" not in parts:
            unknown += [f"{name}.{p}" for p in parts]
            continue
        dims[name] = int(parts["down"].shape[0])
        alphas[name] = float(parts["alpha"]) if "alpha" in parts else float(dims[name])
    return dims, alphas, unknown


def create_network_from_weights(multiplier: float, file, vae, text_encoders, unet, weights_sd=None,
                                for_inference: bool = False, **kwargs):
    """Kohya entry point: a network shaped like a LoRA file (rank and alpha per module, `dim_from_weights`).
    Returns (network, weights_sd) like Kohya; load the weights with `network.load_weights(weights_sd)`."""
    if weights_sd is None:
        weights_sd, _ = read_lora_file(file)
    dims, alphas, unknown = dims_from_weights(weights_sd)
    if unknown:
        logger.warning("%s: %d keys are not LoRA up / down / alpha tensors and are ignored (e.g. %s)",
                       file or "state dict", len(unknown), ", ".join(unknown[:5]))
    options = _network_options(kwargs)
    network = LoRANetwork(
        unet, WAN_TARGETS, multiplier=multiplier, modules_dim=dims, modules_alpha=alphas,
        name_map=diffusers_module_to_official, loraplus_lr_ratio=options["loraplus_lr_ratio"],
        rank_dropout=None if for_inference else options["rank_dropout"],
        module_dropout=None if for_inference else options["module_dropout"], verbose=options["verbose"],
    )
    absent = sorted(set(dims) - {lo.lora_name for lo in network.loras})
    if absent:
        logger.warning("%s: %d LoRA modules match no Linear layer of this model (e.g. %s)",
                       file or "state dict", len(absent), ", ".join(absent[:5]))
    return network, weights_sd


# ---- metadata --------------------------------------------------------------------------------------


def wan_architecture(variant_name: str, variant_version: str) -> str:
    """The model-spec architecture of a LoRA for a variant: `wan2.2-t2v-a14b/lora`, `wan2.1-i2v-14b/lora`."""
    return f"wan{variant_version}-{variant_name.lower()}/lora"


def wan_implementation(variant_version: str) -> str:
    return f"https://github.com/Wan-Video/Wan{variant_version}"


def build_lora_metadata(variant_name: str, variant_version: str, expert: str | None = None,
                        **values: Any) -> dict[str, str]:
    """`networks.metadata.build_metadata` with the WAN architecture, implementation and base model filled
    in; `expert` ("high_noise" / "low_noise") names the WAN 2.2 A14B expert a file belongs to."""
    extra = dict(values.pop("extra", None) or {})
    if expert:
        extra["ss_expert"] = expert
    values.setdefault("network_module", __name__)
    return build_metadata(
        architecture=wan_architecture(variant_name, variant_version),
        implementation=wan_implementation(variant_version),
        base_model_version=f"wan{variant_version}_{variant_name}", extra=extra, **values,
    )

"""Diagnose WAN LoRA files: why a LoRA does nothing, why ComfyUI says "lora key not loaded", and whether a
file is what its name and metadata say. Only the LoRA file is read; a DiT, when given, is read header
first (shapes), then only the weights the LoRA touches (their norms).

One `Diagnosis` per file: the file (size, truncation, key format, modules, keys that are not LoRA
tensors), ComfyUI compatibility, the WAN variants its shapes fit and whether the metadata agrees, the
A14B expert and its partner file, the strength of the effect (||up @ down|| * alpha / rank per module,
relative to the base weight when a DiT is given) and the training facts in the metadata, checked
against the guide's "No visible effect" list. Findings are errors, warnings or notes; the verdict is
the worst of them. `tools/check_lora.py` is the CLI.
"""

from __future__ import annotations

import functools
import math
import re
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from library.registry.files import read_dataset_count, read_hyperparameters
from library.sampling.loras import expert_of_name, partner_of
from library.wan.checkpoint_files import CheckpointError, SafetensorsFile
from library.wan.dit_formats import dequantize, describe_checkpoint
from library.wan.variants import VARIANTS, WanVariant, get_variant
from networks.convert import official_name
from networks.lora import _MODULE_PREFIXES, _PARTS, group_lora_keys, is_linear, read_lora_file
from networks.lora_wan import WAN_TARGETS, diffusers_module_to_official, wan_architecture

LORA_SUFFIXES = tuple(_PARTS)
MIN_SCALE = 0.05  # alpha / rank below this: the effect is scaled down noticeably
MIN_STEPS, MIN_LR = 300, 2e-5  # the guide's "No visible effect": too few steps, lr too low
NEGLIGIBLE = 1e-4  # median ||delta|| / ||W|| below this barely changes the model
CONVERT = "convert with tools/convert_lora.py --format comfyui"
# key prefix -> format name, and how the report spells it
FORMATS = {"kohya": (("lora_unet_",), "Kohya / musubi (lora_unet_*)"),
           "comfyui": (("diffusion_model.", "model.diffusion_model."), "ComfyUI (diffusion_model.*.lora_A/B)"),
           "diffusers": (("transformer.",), "diffusers (transformer.*)"),
           "peft": (("base_model.model.",), "peft (base_model.model.*)")}
# a regex over a file's keys -> the model family a non-WAN LoRA is for (first match wins)
FAMILIES = (
    (r"^lora_te[12]_|^lora_unet_(input|output)_blocks_|^lora_unet_middle_block_", "SDXL"),
    (r"^lora_unet_(down|up)_blocks_|^lora_unet_mid_block_|^unet\.", "Stable Diffusion (SD 1.x / 2.x / SDXL UNet)"),
    (r"individual_token_refiner", "HunyuanVideo"),
    (r"double_blocks|single_blocks|single_transformer_blocks", "Flux or HunyuanVideo (double / single-stream blocks)"),
    (r"joint_blocks", "Stable Diffusion 3"),
    (r"^lora_te_|^text_encoder", "a Stable Diffusion text encoder"),
    (r"transformer_blocks", "another diffusers transformer (WAN's blocks are `blocks.N`)"),
)
EXTRA_TENSORS = {"dora_scale": "DoRA magnitudes", "hada_": "LyCORIS LoHa", "lokr_": "LyCORIS LoKr",
                 ".diff": "full weight differences", "lora_mid": "LoCon mid weights"}


@dataclass
class Finding:
    level: str  # "error", "warning" or "note"
    message: str


@dataclass
class Diagnosis:
    """What one LoRA file is, and what is wrong with it."""

    path: Path
    size_bytes: int | None = None
    readable: bool = False
    key_format: str = "unknown"
    modules: int = 0
    rank: list[int] = field(default_factory=list)
    alpha_scale: list[float] = field(default_factory=list)
    dtypes: list[str] = field(default_factory=list)
    not_lora_keys: list[str] = field(default_factory=list)
    foreign_modules: list[str] = field(default_factory=list)  # LoRA modules that are no WAN DiT layer
    family: str | None = None
    comfyui: str = "unknown"
    shapes: dict[str, Any] = field(default_factory=dict)
    fits: list[str] = field(default_factory=list)
    metadata_model: str | None = None
    metadata_variant: str | None = None
    expert: dict[str, Any] = field(default_factory=dict)
    effect: dict[str, Any] = field(default_factory=dict)
    training: dict[str, Any] = field(default_factory=dict)
    findings: list[Finding] = field(default_factory=list)

    def add(self, level: str, message: str) -> None:
        self.findings.append(Finding(level, message))

    @property
    def verdict(self) -> str:
        levels = {f.level for f in self.findings}
        return "ERROR" if "error" in levels else "WARN" if "warning" in levels else "OK"

    @property
    def reason(self) -> str:
        for level in ("error", "warning"):
            found = [f.message for f in self.findings if f.level == level]
            if found:
                return found[0]
        return "no problem found"

    def to_dict(self) -> dict[str, Any]:
        out = {k: v for k, v in self.__dict__.items() if k != "findings"}
        out["path"] = str(self.path)
        out.update(verdict=self.verdict, reason=self.reason, findings=[f.__dict__ for f in self.findings])
        return out


# ---- small pieces ----------------------------------------------------------------------------------


def gram_norm(up: torch.Tensor, down: torch.Tensor) -> float:
    """||up @ down||_F without the [out, in] product: sqrt(trace((upᵀ up)(down downᵀ))), both r x r."""
    u = up.reshape(up.shape[0], -1).float().double()  # [out, r]
    d = down.reshape(down.shape[0], -1).float().double()  # [r, in]
    value = float(((u.T @ u) * (d @ d.T)).sum())  # trace(A B) = sum(A * B), B symmetric
    return math.sqrt(max(value, 0.0))


def _sniff(path: Path) -> str | None:
    """What a file that failed the safetensors header check is, from its first bytes (None: unknown)."""
    with open(path, "rb") as fh:
        head = fh.read(64)
    if head.startswith(b"PK\x03\x04"):
        return "a PyTorch zip checkpoint (.pt / .pth / .ckpt)"
    if head[:1] == b"\x80":
        return "a Python pickle (.pt / .bin)"
    if head.startswith(b"version https://git-lfs"):
        return "a Git LFS pointer, not the file itself (run `git lfs pull` or download the file)"
    if head.lstrip()[:1] == b"<" and b"html" in head.lower():
        return "an HTML page (a failed download, e.g. a login or error page); download the file again"
    return None


def format_counts(keys) -> dict[str, int]:
    """{format name: number of LoRA tensors} by key prefix ("unknown" for prefixes no WAN format uses)."""
    counts: dict[str, int] = {}
    for key in keys:
        if key.endswith(LORA_SUFFIXES):
            name = next((n for n, (prefixes, _) in FORMATS.items() if key.startswith(prefixes)), "unknown")
            counts[name] = counts.get(name, 0) + 1
    return counts


def key_format(keys) -> str:
    counts = format_counts(keys)
    if len(counts) == 1:
        return next(iter(counts))
    return "mixed (" + ", ".join(f"{n} {c}" for n, c in counts.items()) + ")" if counts else "unknown"


def _uses_diffusers_names(keys) -> bool:
    for key in keys:
        suffix = next((s for s in LORA_SUFFIXES if key.endswith(s)), None)
        if suffix:
            stem = key[: -len(suffix)]
            stem = next((stem[len(p):] for p in _MODULE_PREFIXES if stem.startswith(p)), stem)
            if diffusers_module_to_official(stem) != stem:
                return True
    return False


def guess_family(keys) -> str | None:
    """The model family a LoRA's key names suggest, when it is obviously not WAN."""
    for pattern, family in FAMILIES:
        if any(re.search(pattern, k) for k in keys):
            if family.startswith("Flux"):
                doubles = {int(m[1]) for k in keys if (m := re.search(r"double_blocks[._](\d+)", k))}
                family = {19: "Flux.1", 20: "HunyuanVideo"}.get(max(doubles, default=-1) + 1, family)
            return family
    return None


def split_modules(sd: dict[str, torch.Tensor]):
    """({official name: parts} of complete WAN modules, foreign module stems, incomplete, not-LoRA keys)."""
    grouped, unknown = group_lora_keys(sd, diffusers_module_to_official)
    modules, foreign, incomplete = {}, [], []
    for kohya, parts in grouped.items():
        try:
            name = official_name(kohya)
        except ValueError:
            foreign.append(kohya)
            continue
        if "down" in parts and "up" in parts:
            modules[name] = parts
        else:
            incomplete.append(f"{name} (no {'down' if 'down' not in parts else 'up'})")
    for key in unknown:  # LoRA tensors under a prefix no WAN format uses (lora_te_, unet., ...)
        suffix = next((s for s in LORA_SUFFIXES if key.endswith(s)), None)
        if suffix and key[: -len(suffix)] not in foreign:
            foreign.append(key[: -len(suffix)])
    return modules, foreign, incomplete, [k for k in unknown if not k.endswith(LORA_SUFFIXES)]


def known_variants() -> list[WanVariant]:
    """Every named variant once, in registration order (2.2 first; the tiny test variants last, whose
    shapes no real LoRA has)."""
    return list(dict.fromkeys(VARIANTS.values()))


@functools.lru_cache(maxsize=None)
def variant_linears(name: str) -> dict[str, tuple[int, int]]:
    """{official name: (in, out)} of every Linear of a variant's DiT (built on `meta`: no memory)."""
    from library.wan.model import WanModel

    with torch.device("meta"):
        model = WanModel(get_variant(name))
    return {n: (m.in_features, m.out_features) for n, m in model.named_modules() if n and is_linear(m)}


def fit(modules: dict, linears: dict[str, tuple[int, int]]) -> tuple[int, list[str], list[str]]:
    """As the sampler's fit check: (modules that fit, 'name (LoRA i -> o, model i -> o)', modules absent)."""
    fitting, mismatched, absent = 0, [], []
    for name, parts in modules.items():
        lora = (parts["down"].shape[-1], parts["up"].shape[0])
        if name not in linears:
            absent.append(name)
        elif lora != linears[name]:
            mismatched.append(f"{name} (LoRA {lora[0]} -> {lora[1]}, model {linears[name][0]} -> {linears[name][1]})")
        else:
            fitting += 1
    return fitting, mismatched, absent


def named_variant(meta: dict[str, str]) -> tuple[str | None, WanVariant | None]:
    """The base model the metadata names (`modelspec.architecture`, `ss_base_model_version`) and its variant."""
    said = None
    for key in ("modelspec.architecture", "ss_base_model_version"):
        text = (meta.get(key) or "").strip().lower().removesuffix("/lora")
        if not text:
            continue
        said = said or text
        exact = [v for v in known_variants() if text in (wan_architecture(v.name, v.version).removesuffix("/lora"),
                                                          f"wan{v.version}_{v.name.lower()}")]
        hits = exact or [v for v in known_variants() if v.name.lower() in text]
        if hits:
            return text, max(hits, key=lambda v: len(v.name))
    return said, None


def _number(text: Any) -> float | None:
    try:
        return float(text)
    except (TypeError, ValueError):
        return None


def _few(items: list[str], n: int = 3) -> str:
    return ", ".join(items[:n]) + (" ..." if len(items) > n else "")


# ---- the DiT to compare with -----------------------------------------------------------------------


@dataclass
class DitReference:
    """A DiT checkpoint's Linear shapes (from its header) and, on demand, the norms of its weights."""

    path: Path
    variant: str
    linears: dict[str, tuple[int, int]]
    ckpt: Any
    layout: Any
    norms: dict[str, float] = field(default_factory=dict)

    def weight_norm(self, name: str) -> float:
        """||W||_F of one Linear, read (and dequantised) alone, its mapped pages released after."""
        if name not in self.norms:
            key = self.layout.key_map[name + ".weight"]
            scale_key = self.layout.scales.get(name + ".weight")
            weight = dequantize(self.ckpt.read(key), self.ckpt.read(scale_key) if scale_key else None, torch.float32)
            self.norms[name] = float(torch.linalg.vector_norm(weight))
            self.ckpt.release(key)
        return self.norms[name]


def open_dit(path, task: str | None = None) -> DitReference:
    """Header-only: the DiT's layout, variant (checked against `task`) and Linear shapes."""
    from library.wan.loading import open_dit_checkpoint

    ckpt, layout, variant = open_dit_checkpoint(path, task)
    linears = {}
    for name, key in layout.key_map.items():
        shape = ckpt.shape(key)
        if name.endswith(".weight") and len(shape) == 2:
            linears[name[: -len(".weight")]] = (shape[1], shape[0])
    return DitReference(Path(path), variant.name, linears, ckpt, layout)


# ---- the checks ------------------------------------------------------------------------------------


def _read(d: Diagnosis):
    path = d.path
    if not path.is_file():
        d.add("error", f"{path}: no such file")
        return None
    d.size_bytes = path.stat().st_size
    try:
        SafetensorsFile(path)  # the header checked against the file size: truncated copies are named
        sd, meta = read_lora_file(path)
    except CheckpointError as exc:
        what = _sniff(path)  # only now: a safetensors header length may begin with any byte
        d.add("error", f"{path.name} is {what}, not a .safetensors LoRA" if what else str(exc))
        return None
    except Exception as exc:  # safetensors' own error types
        d.add("error", f"{path}: not a readable .safetensors file ({type(exc).__name__}: {exc}); re-save or "
                       "re-download it")
        return None
    d.readable = True
    return sd, meta


def _check_keys(d: Diagnosis, sd: dict, modules: dict, foreign: list, incomplete: list) -> bool:
    """Format, ComfyUI compatibility, foreign and incomplete modules; False when no WAN module is left."""
    keys = list(sd)
    d.key_format, d.modules, d.foreign_modules = key_format(keys), len(modules), foreign
    if foreign:
        d.family = guess_family(foreign)
        looks = f"it looks like a {d.family} LoRA" if d.family else "these are not WAN DiT layers"
        if not modules:
            d.add("error", f"not a WAN LoRA: {looks} (e.g. {_few(foreign, 2)}); it cannot act on a WAN model "
                           "and ComfyUI reports 'lora key not loaded' for every key")
        else:
            d.add("warning", f"{len(foreign)} LoRA modules are not WAN DiT layers ({looks}: {_few(foreign, 2)}); "
                             "they are ignored ('lora key not loaded' in ComfyUI)")
    if not modules and not foreign:
        what = describe_checkpoint(keys) if keys else "empty"
        hint = "; load it as the diffusion model, not as a LoRA" if what == "a WAN DiT" else ""
        d.add("error", f"no LoRA up / down pairs in this file ({what}{hint})")
    if d.not_lora_keys and (modules or foreign):
        kinds = sorted({v for k, v in EXTRA_TENSORS.items() if any(k in key for key in d.not_lora_keys)})
        d.add("warning", f"{len(d.not_lora_keys)} keys are not LoRA up / down / alpha tensors "
                         f"({', '.join(kinds) or 'unknown'}: {_few(d.not_lora_keys, 2)}); this trainer's tools "
                         "skip them")
    if incomplete:
        d.add("warning", f"{len(incomplete)} modules lack a weight and are skipped: {_few(incomplete)}")
    extra = [n for n in modules if not n.endswith(WAN_TARGETS)]
    if extra:
        d.add("note", f"{len(extra)} WAN modules outside the usual block targets ({_few(extra, 2)}): trained with "
                      "include_patterns")
    if _uses_diffusers_names(keys):
        d.comfyui = "not loaded (diffusers names)"
        d.add("warning", f"diffusers module names: ComfyUI will report 'lora key not loaded'; {CONVERT}")
    elif set(format_counts(keys)) <= {"kohya", "comfyui"}:
        d.comfyui = "loads natively"
    elif modules:
        d.comfyui = f"not loaded ({d.key_format} keys)"
        d.add("warning", f"{d.key_format} keys: not a format ComfyUI maps for WAN; {CONVERT}")
    return bool(modules)


def _check_tensors(d: Diagnosis, sd: dict, modules: dict) -> dict:
    """NaN / Inf anywhere, dtypes, ranks; returns the modules whose down and up ranks agree."""
    bad = [k for k, t in sd.items() if t.is_floating_point() and not torch.isfinite(t.float()).all()]
    if bad:
        d.add("error", f"{len(bad)} tensors hold NaN or Inf ({_few(bad, 2)}): training diverged; use an earlier "
                       "checkpoint and lower the learning rate")
    d.dtypes = sorted({str(p[k].dtype).removeprefix("torch.") for p in modules.values() for k in ("down", "up")})
    d.rank = sorted({int(p["down"].shape[0]) for p in modules.values()})
    good = {}
    for name, parts in modules.items():
        if parts["down"].shape[0] != parts["up"].shape[-1]:
            d.add("error", f"{name}: down has rank {parts['down'].shape[0]} but up has {parts['up'].shape[-1]}; "
                           "the file is damaged")
        else:
            good[name] = parts
    return good


def _scale(parts: dict) -> float:
    rank = parts["down"].shape[0]
    return (float(parts["alpha"]) if "alpha" in parts else rank) / rank


def _check_effect(d: Diagnosis, modules: dict, dit: DitReference | None) -> None:
    """Per-module ||delta|| = ||up @ down|| * alpha / rank, and relative to ||W|| when a DiT is given."""
    scales = {n: _scale(p) for n, p in modules.items()}
    d.alpha_scale = sorted(set(scales.values()))
    zero = [n for n, p in modules.items() if not p["up"].float().any() or not p["down"].float().any()]
    zero_up = [n for n in zero if not modules[n]["up"].float().any()]
    norms, relative = {}, {}
    for name, parts in modules.items():
        norm = gram_norm(parts["up"], parts["down"]) * scales[name]
        if not math.isfinite(norm):
            continue
        norms[name] = norm
        if dit is not None and dit.linears.get(name) == (parts["down"].shape[-1], parts["up"].shape[0]):
            w = dit.weight_norm(name)
            relative[name] = norm / w if w > 0 else float("inf")
    d.effect = {"zero_modules": len(zero), "zero_up_modules": len(zero_up)}
    for label, values in (("delta_norm", norms), ("relative_norm", relative)):
        if values:
            top = max(values, key=values.get)
            d.effect[label] = {"median": statistics.median(values.values()), "max": values[top], "max_module": top}
    if zero and len(zero) == len(modules):
        d.add("error", "this LoRA has no effect: its up-projections are zero (saved before training, or training "
                       "diverged to zero)" if zero_up else "this LoRA has no effect: every module's delta is zero")
    elif zero:
        d.add("warning", f"{len(zero)} of {len(modules)} modules are all zero and do nothing ({_few(zero, 2)})")
    low = min(scales.values())
    if low == 0:
        d.add("error", "alpha is 0: scale alpha / rank = 0, so the LoRA has no effect when loaded")
    elif low < MIN_SCALE:
        rank = modules[min(scales, key=scales.get)]["down"].shape[0]
        d.add("warning", f"effect scaled down by alpha/rank = {low:.3g} (alpha {low * rank:g}, rank {rank}); fine "
                         "only if the learning rate made up for it")
    if "relative_norm" in d.effect and not zero and d.effect["relative_norm"]["median"] < NEGLIGIBLE:
        d.add("warning", f"tiny effect: median ||delta|| / ||W|| is {d.effect['relative_norm']['median']:.2g} "
                         "(too few steps or lr too low?)")


def _shape_facts(modules: dict) -> dict[str, Any]:
    def first(suffixes, pick):
        return next((pick(p) for n, p in modules.items() if n.endswith(suffixes)), None)

    blocks = sorted({int(n.split(".")[1]) for n in modules if n.startswith("blocks.")})
    return {"dim": first(("self_attn.q", "self_attn.k", "self_attn.o", "cross_attn.q", "ffn.0"),
                         lambda p: p["down"].shape[-1]) or first(("ffn.2",), lambda p: p["up"].shape[0]),
            "ffn_dim": first(("ffn.0",), lambda p: p["up"].shape[0])
            or first(("ffn.2",), lambda p: p["down"].shape[-1]),
            "blocks": len(blocks), "last_block": blocks[-1] if blocks else None,
            "k_img": any(n.endswith(("k_img", "v_img")) for n in modules)}


def _check_target(d: Diagnosis, modules: dict, linears: dict, what: str) -> None:
    fitting, mismatched, absent = fit(modules, linears)
    fits = ", ".join(d.fits) or "no known variant"
    if mismatched or not fitting:
        detail = (f"{len(mismatched)} of {len(modules)} modules have other shapes: {_few(mismatched, 4)}" if mismatched
                  else f"none of its {len(modules)} modules exist there (e.g. {_few(absent, 2)})")
        d.add("error", f"does not fit {what}: {detail}; the shapes fit {fits}")
    elif absent:
        d.add("warning", f"{len(absent)} of {len(modules)} modules are not layers of {what} ({_few(absent, 2)}): "
                         "they are skipped ('lora key not loaded' in ComfyUI)")
    else:
        d.add("note", f"every module fits {what}")


def _check_variants(d: Diagnosis, modules: dict, meta: dict, task: str | None, dit: DitReference | None) -> None:
    d.shapes = _shape_facts(modules)
    d.fits = [v.name for v in known_variants() if fit(modules, variant_linears(v.name))[0] == len(modules)]
    said, named = named_variant(meta)
    d.metadata_model, d.metadata_variant = said, named.name if named else None
    s = d.shapes
    facts = f"dim {s['dim']}, ffn {s['ffn_dim']}, {s['blocks']} blocks, {'with' if s['k_img'] else 'no'} k_img"
    if not d.fits:
        d.add("warning", f"its shapes ({facts}) fit no known WAN variant: a LoRA for a custom model?")
    if named and named.name not in d.fits:
        d.add("warning", f"metadata says {said!r} ({named.name}) but the shapes ({facts}) fit "
                         f"{', '.join(d.fits) or 'no known variant'}")
    elif said and not named and not said.startswith("wan"):
        d.add("warning", f"metadata names {said!r}, not a WAN model, but the modules are WAN layers")
    elif said and not named:
        d.add("note", f"metadata names only {said!r} (musubi writes wan2.1/lora even for 2.2); the shapes decide")
    if dit is not None:
        _check_target(d, modules, dit.linears, f"the DiT {dit.path.name} ({dit.variant})")
    elif task:
        _check_target(d, modules, variant_linears(get_variant(task).name), get_variant(task).name)


def _check_expert(d: Diagnosis, path: Path, meta: dict, dit: DitReference | None) -> None:
    by_name, by_meta = expert_of_name(path), meta.get("ss_expert") or None
    d.expert = {"expert": by_name or by_meta, "from_name": by_name, "from_metadata": by_meta}
    if by_meta and by_meta not in ("high_noise", "low_noise"):
        d.add("warning", f"ss_expert metadata {by_meta!r} is neither high_noise nor low_noise")
    if by_name and by_meta and by_name != by_meta:
        d.add("warning", f"the file name says {by_name} but ss_expert says {by_meta}; loaders follow the name")
    if by_name:
        partner = partner_of(path)
        d.expert.update(partner=partner.name, partner_exists=partner.is_file())
        if partner.is_file():
            d.add("note", f"{by_name} expert; its partner {partner.name} is there")
        else:
            d.add("warning", f"{by_name} expert file without its partner {partner.name}: the other expert runs "
                             "without this LoRA")
    elif by_meta:
        d.add("note", f"{by_meta} expert (ss_expert metadata only: without a _high_noise / _low_noise suffix in "
                      "the name, no tool can find its partner)")
    elif any(get_variant(v).two_experts for v in ([d.metadata_variant] if d.metadata_variant else d.fits)):
        d.add("note", "no expert info (ss_expert or a _high_noise / _low_noise suffix): with a WAN 2.2 A14B "
                      "model it applies to both experts")
    dit_expert = expert_of_name(dit.path) if dit is not None else None
    if dit_expert and d.expert["expert"] and dit_expert != d.expert["expert"]:
        d.add("note", f"this is a {d.expert['expert']} LoRA, the DiT given is the {dit_expert} expert (by its name)")


def _check_training(d: Diagnosis, meta: dict) -> None:
    hp = read_hyperparameters(meta)
    facts = {"steps": _number(meta.get("ss_steps")), "epoch": _number(meta.get("ss_epoch")),
             "learning_rate": hp.get("lr"), "network_dim": hp.get("dim"), "network_alpha": hp.get("alpha"),
             "num_train_items": read_dataset_count(meta), "optimizer": hp.get("optimizer"),
             "training_comment": meta.get("ss_training_comment"), "title": meta.get("modelspec.title"),
             "date": meta.get("modelspec.date")}
    d.training = {k: (int(v) if isinstance(v, float) and v.is_integer() and k != "learning_rate" else v)
                  for k, v in facts.items() if v not in (None, "")}
    steps, lr = d.training.get("steps"), _number(d.training.get("learning_rate"))
    if steps is not None and steps < MIN_STEPS:
        d.add("warning", f"trained for only {steps} steps (< {MIN_STEPS}): 'too few steps' is on the guide's "
                         "'No visible effect' list")
    if lr is not None and 0 < lr < MIN_LR:
        d.add("warning", f"learning rate {lr:g} is below {MIN_LR:g}: 'lr too low' is on the guide's "
                         "'No visible effect' list")


def diagnose(path, task: str | None = None, dit: DitReference | None = None) -> Diagnosis:
    """Every check on one LoRA file; `task` (a variant name) or `dit` adds the fit against that model."""
    d = Diagnosis(Path(path))
    read = _read(d)
    if read is None:
        return d
    sd, meta = read
    modules, foreign, incomplete, d.not_lora_keys = split_modules(sd)
    modules = _check_tensors(d, sd, modules)
    if _check_keys(d, sd, modules, foreign, incomplete):
        _check_effect(d, modules, dit)
        _check_variants(d, modules, meta, task, dit)
        _check_expert(d, d.path, meta, dit)
        _check_training(d, meta)
    order = {"error": 0, "warning": 1, "note": 2}
    d.findings.sort(key=lambda f: order[f.level])  # stable: within a level, the order of the checks
    return d


# ---- the report ------------------------------------------------------------------------------------


def _size(n: int | None) -> str:
    if n is None:
        return "?"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return ""


def format_diagnosis(d: Diagnosis) -> str:
    """The human report of one file: the verdict line, then facts, then findings."""
    lines = [f"{d.path.name}: {d.verdict}: {d.reason}"]
    if d.readable:
        fmt = FORMATS.get(d.key_format, (None, d.key_format))[1]
        text = f"{_size(d.size_bytes)}, {fmt}, {d.modules} WAN modules"
        if d.modules:
            text += (f", rank {'/'.join(map(str, d.rank))}, alpha/rank {'/'.join(f'{s:g}' for s in d.alpha_scale)}, "
                     f"{'/'.join(d.dtypes)}; ComfyUI: {d.comfyui}")
        lines.append(f"  file      {text}")
    if d.shapes:
        s = d.shapes
        meta = f"; metadata: {d.metadata_model}" + (f" ({d.metadata_variant})" if d.metadata_variant else "") \
            if d.metadata_model else "; no base model in the metadata"
        lines.append(f"  fits      {', '.join(d.fits) or 'no known variant'} (dim {s['dim']}, ffn {s['ffn_dim']}, "
                     f"{s['blocks']} blocks, {'with' if s['k_img'] else 'no'} k_img){meta}")
    if d.expert.get("expert"):
        lines.append(f"  expert    {d.expert['expert']}" + (f", partner {d.expert['partner']}: "
                     f"{'found' if d.expert['partner_exists'] else 'missing'}" if 'partner' in d.expert else ""))
    if "delta_norm" in d.effect:
        e = d.effect["delta_norm"]
        text = f"||delta|| median {e['median']:.3g}, max {e['max']:.3g} ({e['max_module']})"
        if "relative_norm" in d.effect:
            r = d.effect["relative_norm"]
            text += f"; ||delta||/||W|| median {r['median']:.3g}, max {r['max']:.3g}"
        else:
            text += " (absolute; --dit gives ||delta||/||W||)"
        lines.append(f"  effect    {text}; {d.effect['zero_modules']} all-zero modules")
    if d.training:
        lines.append("  training  " + ", ".join(f"{k} {v}" for k, v in d.training.items()))
    lines += [f"  {f.level:<9} {f.message}" for f in d.findings]
    return "\n".join(lines)

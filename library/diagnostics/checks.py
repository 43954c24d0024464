"""Diagnose WAN LoRA files: why a LoRA does nothing, why ComfyUI says "lora key not loaded", and whether a
file is what its name and metadata say. Only the LoRA file is read; a DiT, when given, is read header
first (shapes), then only the weights the LoRA touches (their norms).

One `Diagnosis` per file: the file (size, truncation, key format, modules, keys that are not LoRA
tensors), ComfyUI compatibility, the WAN variants its shapes fit and whether the metadata agrees, the
A14B expert and its partner file, the strength of the effect (`effect.py`) and the training facts in the
metadata, checked against the guide's "No visible effect" list. Findings are errors, warnings or notes;
the verdict is the worst of them. `diagnose` runs the checks in order.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from library.registry.files import read_dataset_count, read_hyperparameters
from library.sampling.loras import expert_of_name, partner_of
from library.wan.checkpoint_files import CheckpointError, SafetensorsFile
from library.wan.dit_formats import describe_checkpoint
from library.wan.variants import get_variant
from networks.lora import read_lora_file
from networks.lora_wan import WAN_TARGETS

from .architecture import DitReference, fit, known_variants, named_variant, shape_facts, variant_linears
from .effect import check_effect
from .keys import EXTRA_TENSORS, format_counts, guess_family, key_format, split_modules, uses_diffusers_names
from .report import Diagnosis, few

MIN_STEPS, MIN_LR = 300, 2e-5  # the guide's "No visible effect": too few steps, lr too low
CONVERT = "convert with tools/convert_lora.py --format comfyui"


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


def _number(text: Any) -> float | None:
    try:
        return float(text)
    except (TypeError, ValueError):
        return None


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
    except Exception as exc:  # noqa: BLE001 - safetensors' own error types: any of them means "unreadable"
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
            d.add("error", f"not a WAN LoRA: {looks} (e.g. {few(foreign, 2)}); it cannot act on a WAN model "
                           "and ComfyUI reports 'lora key not loaded' for every key")
        else:
            d.add("warning", f"{len(foreign)} LoRA modules are not WAN DiT layers ({looks}: {few(foreign, 2)}); "
                             "they are ignored ('lora key not loaded' in ComfyUI)")
    if not modules and not foreign:
        what = describe_checkpoint(keys) if keys else "empty"
        hint = "; load it as the diffusion model, not as a LoRA" if what == "a WAN DiT" else ""
        d.add("error", f"no LoRA up / down pairs in this file ({what}{hint})")
    if d.not_lora_keys and (modules or foreign):
        kinds = sorted({v for k, v in EXTRA_TENSORS.items() if any(k in key for key in d.not_lora_keys)})
        d.add("warning", f"{len(d.not_lora_keys)} keys are not LoRA up / down / alpha tensors "
                         f"({', '.join(kinds) or 'unknown'}: {few(d.not_lora_keys, 2)}); this trainer's tools "
                         "skip them")
    if incomplete:
        d.add("warning", f"{len(incomplete)} modules lack a weight and are skipped: {few(incomplete)}")
    extra = [n for n in modules if not n.endswith(WAN_TARGETS)]
    if extra:
        d.add("note", f"{len(extra)} WAN modules outside the usual block targets ({few(extra, 2)}): trained with "
                      "include_patterns")
    if uses_diffusers_names(keys):
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
        d.add("error", f"{len(bad)} tensors hold NaN or Inf ({few(bad, 2)}): training diverged; use an earlier "
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


def _check_target(d: Diagnosis, modules: dict, linears: dict, what: str) -> None:
    fitting, mismatched, absent = fit(modules, linears)
    fits = ", ".join(d.fits) or "no known variant"
    if mismatched or not fitting:
        detail = (f"{len(mismatched)} of {len(modules)} modules have other shapes: {few(mismatched, 4)}" if mismatched
                  else f"none of its {len(modules)} modules exist there (e.g. {few(absent, 2)})")
        d.add("error", f"does not fit {what}: {detail}; the shapes fit {fits}")
    elif absent:
        d.add("warning", f"{len(absent)} of {len(modules)} modules are not layers of {what} ({few(absent, 2)}): "
                         "they are skipped ('lora key not loaded' in ComfyUI)")
    else:
        d.add("note", f"every module fits {what}")


def _check_variants(d: Diagnosis, modules: dict, meta: dict, task: str | None, dit: DitReference | None) -> None:
    d.shapes = shape_facts(modules)
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


def _lycoris_as_lora(d: Diagnosis, sd: dict) -> dict:
    """A LyCORIS LoHa / LoKr file is checked as its exact LoRA equivalent (a note says so)."""
    from networks.lora_files import LoraInputError
    from networks.lora_wan import diffusers_module_to_official
    from networks.lycoris_weights import is_lycoris, lycoris_as_lora_state

    if not is_lycoris(sd):
        return sd
    kinds = " / ".join(k for k, tag in (("LoHa", ".hada_"), ("LoKr", ".lokr_")) if any(tag in key for key in sd))
    try:
        converted, unknown = lycoris_as_lora_state(sd, diffusers_module_to_official)
    except LoraInputError as exc:
        d.add("error", str(exc))
        return {}
    d.add("note", f"LyCORIS {kinds} network: checked as its exact LoRA equivalent (ranks below are that LoRA's); "
                  "ComfyUI loads its keys natively")
    return converted | {k: sd[k] for k in unknown}


def diagnose(path, task: str | None = None, dit: DitReference | None = None) -> Diagnosis:
    """Every check on one LoRA file; `task` (a variant name) or `dit` adds the fit against that model."""
    d = Diagnosis(Path(path))
    read = _read(d)
    if read is None:
        return d
    sd, meta = read
    sd = _lycoris_as_lora(d, sd)
    modules, foreign, incomplete, d.not_lora_keys = split_modules(sd)
    modules = _check_tensors(d, sd, modules)
    if _check_keys(d, sd, modules, foreign, incomplete):
        check_effect(d, modules, dit)
        _check_variants(d, modules, meta, task, dit)
        _check_expert(d, d.path, meta, dit)
        _check_training(d, meta)
    order = {"error": 0, "warning": 1, "note": 2}
    d.findings.sort(key=lambda f: order[f.level])  # stable: within a level, the order of the checks
    return d


"""LoRAs for generation: `FILE[:STRENGTH]` specs, per-expert pairing, checks against the model, stacking.

- A WAN 2.2 A14B LoRA comes as `NAME_high_noise.safetensors` / `NAME_low_noise.safetensors` (the suffix may
  also sit before `-step00000500` / `-000003`); either file of a pair brings its partner, each file goes
  to its expert. A file without an expert (suffix or `ss_expert` metadata) goes to every expert.
- Before anything is attached, each file is checked against its model: a LoRA module whose tensors do not
  fit the model's Linear layer means the file was made for another variant, and is an error that names
  the mismatching keys (and the variant the metadata names). Modules the model does not have and keys
  that are not LoRA tensors are counted and reported, never silently dropped.
- Several LoRAs stack: each is a `LoRANetwork` whose hooks add its delta; `scale_strengths` scales them all
  (a strength sweep; 0 is the base model).
- A spec may name its expert (musubi's `--lora_weight` is for the `--dit` model, `--lora_weight_high_noise`
  for the high-noise one) and carry `include` / `exclude` regexes, matched with `re.search` against the
  Kohya module names (`lora_unet_blocks_9_cross_attn_k`): include first, then exclude.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from library.errors import UserError

logger = logging.getLogger(__name__)

EXPERT_SUFFIXES = ("_high_noise", "_low_noise")


class LoraError(UserError, ValueError):
    """A LoRA file that cannot be used with this model; the message names the file and what is wrong."""


@dataclass(frozen=True)
class LoraSpec:
    path: Path
    strength: float = 1.0
    expert: str | None = None  # None: from the file name / metadata (or every expert)
    include: str | None = None  # regex on Kohya module names: only matching modules apply
    exclude: str | None = None  # regex on Kohya module names: matching modules do not apply

    def allows(self, module: str) -> bool:
        """Whether the Kohya-named LoRA module `module` passes the include / exclude patterns."""
        if self.include is not None and not re.search(self.include, module):
            return False
        return self.exclude is None or not re.search(self.exclude, module)


@dataclass
class LoraReport:
    """What a LoRA file holds relative to one model."""

    path: Path
    expert: str
    applied: int = 0  # modules attached
    not_in_model: list[str] = field(default_factory=list)  # LoRA modules this model lacks
    not_lora: list[str] = field(default_factory=list)  # keys that are not up / down / alpha tensors
    architecture: str | None = None

    def summary(self) -> str:
        skipped = len(self.not_in_model) + len(self.not_lora)
        text = f"{self.path.name} -> {self.expert}: {self.applied} modules applied"
        if skipped:
            text += (f"; {len(self.not_in_model)} modules not in this model, {len(self.not_lora)} keys that are "
                     f"not LoRA tensors (e.g. {', '.join((self.not_in_model + self.not_lora)[:3])})")
        return text


@dataclass
class LoadedLora:
    spec: LoraSpec
    expert: str
    network: object  # networks.lora.LoRANetwork, hooks attached
    report: LoraReport


def parse_lora_spec(text: str) -> LoraSpec:
    """`file.safetensors` or `file.safetensors:0.8` (a Windows drive letter `C:` is not a strength)."""
    head, sep, tail = text.rpartition(":")
    if sep and head and not re.fullmatch(r"[A-Za-z]", head):
        try:
            return LoraSpec(Path(head).expanduser(), float(tail))
        except ValueError:
            pass
    return LoraSpec(Path(text).expanduser(), 1.0)


def expert_of_name(path: Path) -> str | None:
    """`high_noise` / `low_noise` from the file name, or None."""
    name = path.name
    found = [(name.rfind(s), s) for s in EXPERT_SUFFIXES if s in name]
    return max(found)[1][1:] if found else None


def partner_of(path: Path) -> Path:
    """The other expert's file: `X_high_noise-step00000010.safetensors` <-> `X_low_noise-step00000010...`."""
    expert = "_" + expert_of_name(path)
    other = EXPERT_SUFFIXES[1] if expert == EXPERT_SUFFIXES[0] else EXPERT_SUFFIXES[0]
    i = path.name.rfind(expert)
    return path.with_name(path.name[:i] + other + path.name[i + len(expert):])


def read_lora(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and metadata of a LoRA file, with clear errors for missing and corrupt files."""
    from networks.lora import read_lora_file

    if not path.is_file():
        raise LoraError(f"LoRA file {path} does not exist")
    try:
        return read_lora_file(path)
    except Exception as exc:  # noqa: BLE001  safetensors raises its own error types for broken files
        raise LoraError(f"{path}: not a readable .safetensors LoRA file ({type(exc).__name__}: {exc}); "
                        "the file may be truncated or in another format, re-save or re-download it") from None


def check_lora_file(path: Path) -> dict[str, str]:
    """Open a LoRA file's header only (cheap, before any model is loaded); returns its metadata."""
    from safetensors import safe_open

    if not path.is_file():
        raise LoraError(f"LoRA file {path} does not exist")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as fh:
            return dict(fh.metadata() or {})
    except Exception as exc:  # noqa: BLE001  as in read_lora: safetensors' own error types
        raise LoraError(f"{path}: not a readable .safetensors LoRA file ({type(exc).__name__}: {exc}); "
                        "the file may be truncated or in another format, re-save or re-download it") from None


def assign_experts(specs: list[LoraSpec], experts: list[str]) -> list[tuple[LoraSpec, str]]:
    """(spec, expert) pairs: per-expert files to their expert (the partner file added), others to all."""
    out: list[tuple[LoraSpec, str]] = []
    for spec in specs:
        if spec.expert is not None:  # named by the command line (musubi's per-model LoRA flags)
            named = expert_of_name(spec.path)
            if named is not None and named != spec.expert:
                logger.warning("%s is named for the %s expert but is applied to the %s expert as asked",
                               spec.path.name, named, spec.expert)
            out.append((spec, spec.expert))
            continue
        own = expert_of_name(spec.path)
        if own is None or experts == ["dit"]:
            if own is None:
                _, meta = read_lora(spec.path)
                own = meta.get("ss_expert") or None
            targets = [own] if own in experts else experts
            out += [(spec, e) for e in targets]
            continue
        out.append((spec, own))
        partner = partner_of(spec.path)
        if partner.is_file():
            out.append((LoraSpec(partner, spec.strength), expert_of_name(partner)))
        else:
            logger.warning("%s: no partner file %s; the %s expert runs without this LoRA",
                           spec.path, partner.name, "low_noise" if own == "high_noise" else "high_noise")
    seen, unique = set(), []
    for spec, expert in out:  # both files of a pair given on the command line: attach each once
        if expert not in experts:
            logger.warning("%s is for the %s expert, which is not loaded; skipped", spec.path.name, expert)
        elif (spec.path.resolve(), expert) not in seen:
            seen.add((spec.path.resolve(), expert))
            unique.append((spec, expert))
    return unique


def _filtered(spec: LoraSpec, grouped: dict) -> dict:
    """The modules `spec`'s include / exclude patterns let through (logged when they drop some)."""
    if spec.include is None and spec.exclude is None:
        return grouped
    kept = {name: parts for name, parts in grouped.items() if spec.allows(name)}
    logger.info("%s: include %r / exclude %r keep %d of %d LoRA modules", spec.path.name, spec.include,
                spec.exclude, len(kept), len(grouped))
    if grouped and not kept:
        logger.warning("%s: no LoRA module is left after the include / exclude patterns", spec.path.name)
    return kept


def _check_is_lora(path: Path, grouped: dict, not_lora: list[str]) -> None:
    """A file without a single up / down pair is not a LoRA (a LyCORIS network, another kind of file)."""
    if any("down" in parts and "up" in parts for parts in grouped.values()) or not (grouped or not_lora):
        return
    keys = not_lora + [f"{name}.{part}" for name, parts in grouped.items() for part in parts]
    lycoris = any(re.search(r"\.(oft|boft)_", k) for k in keys)
    kind = "a LyCORIS network of another kind than LoHa / LoKr (OFT, ...)" if lycoris else "not a LoRA file"
    raise LoraError(f"{path}: no LoRA up / down tensors (keys like {', '.join(keys[:3])}): this is {kind}; "
                    "generation applies LoRA files (Kohya, ComfyUI or diffusers keys) and LyCORIS LoHa / LoKr")


def _lycoris_as_lora(path: Path, sd: dict) -> dict:
    """A LyCORIS LoHa / LoKr state dict as its exact LoRA equivalent (other files unchanged)."""
    from networks.lora_files import LoraInputError
    from networks.lora_wan import diffusers_module_to_official
    from networks.lycoris_weights import is_lycoris, lycoris_as_lora_state

    if not is_lycoris(sd):
        return sd
    try:
        converted, unknown = lycoris_as_lora_state(sd, diffusers_module_to_official)
    except LoraInputError as exc:
        raise LoraError(f"{path}: {exc}") from None
    logger.info("%s: LyCORIS network, applied as its exact LoRA equivalent", path.name)
    return converted | {k: sd[k] for k in unknown}


def _fit(spec: LoraSpec, sd: dict, meta: dict, model, expert: str, variant) -> tuple[LoraReport, dict]:
    """Check a LoRA state dict against `model`; returns its report and the applicable tensors (Kohya keys)."""
    from networks.lora import group_lora_keys, is_linear, kohya_name
    from networks.lora_wan import diffusers_module_to_official, wan_architecture

    path = spec.path
    linears = {kohya_name(n): m for n, m in model.named_modules() if n and is_linear(m)}
    sd = _lycoris_as_lora(path, sd)
    grouped, not_lora = group_lora_keys(sd, diffusers_module_to_official)
    _check_is_lora(path, grouped, not_lora)
    grouped = _filtered(spec, grouped)
    report = LoraReport(path, expert, not_lora=list(not_lora), architecture=meta.get("modelspec.architecture"))
    keep, mismatched = {}, []
    for name, parts in grouped.items():
        module = linears.get(name)
        if module is None:
            report.not_in_model += [f"{name}.{p}" for p in parts]
        elif "down" not in parts or "up" not in parts:
            report.not_lora += [f"{name}.{p}" for p in parts]
        elif (parts["down"].shape[-1] != module.in_features or parts["up"].shape[0] != module.out_features
              or parts["down"].shape[0] != parts["up"].shape[-1]):
            mismatched.append(f"{name} (LoRA {parts['down'].shape[-1]} -> {parts['up'].shape[0]}, "
                              f"model {module.in_features} -> {module.out_features})")
        else:
            keep.update({f"{name}.lora_down.weight": parts["down"], f"{name}.lora_up.weight": parts["up"]})
            if "alpha" in parts:
                keep[f"{name}.alpha"] = parts["alpha"]
    expected = wan_architecture(variant.name, variant.version)
    if mismatched or (grouped and not keep):
        said = (f"its metadata says {report.architecture!r}" if report.architecture
                else "it has no architecture metadata")
        what = (f"{len(mismatched)} of {len(grouped)} LoRA modules do not fit this model's layers: "
                + ", ".join(mismatched[:4]) + (" ..." if len(mismatched) > 4 else "")) if mismatched else \
            f"none of its {len(grouped)} LoRA modules exist in this model (e.g. {', '.join(list(grouped)[:3])})"
        raise LoraError(f"{path}: this LoRA was made for another model than {variant.name} ({expected}): {what}; "
                        f"{said}. Use a LoRA trained on {variant.name}.")
    if report.architecture and report.architecture.lower() not in (expected, "wan2.1/lora"):
        logger.warning("%s: metadata architecture %r differs from this model's %r, but every module fits; "
                       "using it", path, report.architecture, expected)
    report.applied = sum(1 for k in keep if k.endswith(".lora_down.weight"))
    return report, keep


def attach_loras(specs: list[LoraSpec], models: dict[str, torch.nn.Module], variant,
                 assigned: list[tuple[LoraSpec, str]] | None = None) -> list[LoadedLora]:
    """Check, build and attach every LoRA (hooks) at its strength; on any error nothing stays attached.
    `assigned` gives the (spec, expert) pairs directly (from `assign_experts` over more experts than
    `models` holds) instead of `specs`."""
    from networks.lora_wan import create_network_from_weights

    loaded: list[LoadedLora] = []
    try:
        for spec, expert in assign_experts(specs, list(models)) if assigned is None else assigned:
            sd, meta = read_lora(spec.path)
            report, tensors = _fit(spec, sd, meta, models[expert], expert, variant)
            network, _ = create_network_from_weights(spec.strength, None, None, None, models[expert],
                                                     weights_sd=tensors, for_inference=True)
            network.load_weights(tensors)
            network.requires_grad_(False).eval()
            network.apply_to()
            loaded.append(LoadedLora(spec, expert, network, report))
            logger.info("LoRA %s at strength %g", report.summary(), spec.strength)
            if report.not_in_model or report.not_lora:
                logger.warning("%s: %d keys do not apply to %s and are not used", spec.path.name,
                               len(report.not_in_model) + len(report.not_lora), variant.name)
    except BaseException:
        detach_loras(loaded)
        raise
    return loaded


def detach_loras(loaded: list[LoadedLora]) -> None:
    for lora in loaded:
        lora.network.remove()


def scale_strengths(loaded: list[LoadedLora], scale: float = 1.0) -> None:
    """Every LoRA at its own strength times `scale` (0: the base model, 1: the strengths asked for)."""
    for lora in loaded:
        lora.network.set_multiplier(lora.spec.strength * scale)

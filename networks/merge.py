"""Merging LoRAs into one LoRA file, and reading LoRAs for a merge (their strengths, hashes and experts).

The ranks are concatenated (down stacked, up side by side, each part scaled by sqrt(|strength * alpha /
rank|)), so the merged delta is exactly the sum; `new_rank` / a dynamic method then SVD-reduces it
(`networks.resize`). Merging LoRAs into a DiT checkpoint reads and writes model files, so it lives above
networks, in `library.lora_tools.merge`; it reads its LoRAs with `read_loras` here.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .convert import read_modules
from .lora_files import LoraInputError
from .resize import Modules, ModuleRank, module_scale, rank_metadata, resize_modules, save_lora_modules

logger = logging.getLogger(__name__)

EXPERTS = ("high_noise", "low_noise")


@dataclass
class LoraInput:
    """One LoRA file as read for merging."""

    path: Path
    strength: float
    modules: Modules
    metadata: dict
    sha256: str

    @property
    def expert(self) -> str | None:
        """The WAN 2.2 A14B expert the file is for: `ss_expert` metadata, else the file name's suffix."""
        return self.metadata.get("ss_expert") or expert_from_name(self.path.name)

    def record(self) -> dict:
        return {"file": self.path.name, "strength": self.strength, "sha256": self.sha256,
                "sshs_model_hash": self.metadata.get("sshs_model_hash", "")}


@dataclass
class MergeReport:
    output: Path
    merged_modules: int = 0  # module deltas added (a module of two LoRAs counts twice)
    warnings: list[str] = field(default_factory=list)
    ranks: list[ModuleRank] = field(default_factory=list)  # merge into a LoRA with new_rank / dynamic


def expert_from_name(path) -> str | None:
    """`..._high_noise...` / `..._low_noise...` in a file's name (else its folder's, as the official
    `high_noise_model/`) -> the expert, or None."""
    path = Path(path)
    for name in (path.name, path.parent.name):
        found = [e for e in EXPERTS if e in name.lower().replace("-", "_")]
        if len(found) == 1:
            return found[0]
    return None


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def read_loras(loras) -> list[LoraInput]:
    """[(path, strength), ...] -> LoraInput records; missing or unreadable files are clear errors."""
    out = []
    for path, strength in loras:
        path = Path(path).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"{path}: LoRA file not found")
        try:
            modules, meta = read_modules(path)
        except LoraInputError as exc:
            raise LoraInputError(str(exc) if str(path) in str(exc) else f"{path}: {exc}") from None
        if not modules:
            raise LoraInputError(f"{path}: holds no LoRA modules")
        if not math.isfinite(float(strength)):
            raise LoraInputError(f"{path}: strength {strength} is not a finite number; give a strength such as 1 "
                                 "or 0.6")
        out.append(LoraInput(path, float(strength), modules, meta, _sha256(path)))
    if not out:
        raise LoraInputError("no LoRA files given")
    return out


def expert_warnings(loras: list[LoraInput], target: str | None, what: str) -> list[str]:
    """Warn (and return the warnings) for each LoRA whose expert is not `target`, the expert `what` is."""
    warnings = []
    for lora in loras:
        if target and lora.expert and lora.expert != target:
            warnings.append(f"{lora.path.name} is a {lora.expert} expert LoRA but {what} is the {target} expert; "
                            "WAN 2.2 A14B LoRAs belong on their own expert (check --expert and the file order)")
    for w in warnings:
        logger.warning(w)
    return warnings


# ---- merging into one LoRA ----------------------------------------------------------------------------------


def concat_modules(inputs: list[LoraInput]) -> Modules:
    """One module per name whose delta is exactly sum_i strength_i * delta_i (ranks concatenated)."""
    grouped: dict[str, list] = {}
    for lora in inputs:
        for name, parts in lora.modules.items():
            grouped.setdefault(name, []).append((lora, parts))
    out = {}
    for name, items in grouped.items():
        shapes = {(p["up"].shape[0], p["down"].shape[1]) for _, p in items}
        if len(shapes) > 1:
            seen = ", ".join(f"{lo.path.name} {[p['up'].shape[0], p['down'].shape[1]]}" for lo, p in items)
            raise LoraInputError(f"module {name} has different shapes in the LoRAs ({seen}): they are for different "
                             "models and cannot be merged")
        downs, ups = [], []
        for lora, parts in items:
            scale = lora.strength * module_scale(parts)
            root = math.sqrt(abs(scale))
            downs.append(parts["down"].float() * root)
            ups.append(parts["up"].float() * (root if scale >= 0 else -root))
        down, up = torch.cat(downs, 0), torch.cat(ups, 1)  # [R, in], [out, R]
        out[name] = {"down": down, "up": up, "alpha": torch.tensor(float(down.shape[0]))}
    return out


def _lora_metadata(inputs: list[LoraInput], modules: Modules, fmt: str, warnings: list[str]) -> dict:
    first = inputs[0].metadata
    meta = {k: v for k, v in first.items() if k.startswith("modelspec.")}
    for key in ("ss_network_module", "ss_base_model_version"):
        if key in first and first[key] != "lycoris.kohya":  # a LyCORIS network merges into a plain LoRA
            meta[key] = first[key]
    archs = {lo.metadata.get("modelspec.architecture") for lo in inputs} - {None}
    if len(archs) > 1:
        warnings.append(f"the LoRAs name different models ({', '.join(sorted(archs))})")
        logger.warning(warnings[-1])
    experts = {lo.expert for lo in inputs}
    if len(experts) == 1 and None not in experts:
        meta["ss_expert"] = experts.pop()
    elif len(experts - {None}) > 1:
        warnings.append("merging LoRAs of different WAN 2.2 A14B experts (high_noise and low_noise) into one file")
        logger.warning(warnings[-1])
    meta.update(rank_metadata(modules))
    meta.update({"ss_merged_loras": json.dumps([lo.record() for lo in inputs]), "ss_lora_format": fmt})
    return meta


def merge_lora_files(loras, output, new_rank: int | None = None, dynamic_method: str | None = None,
                     dynamic_param: float | None = None, fmt: str = "kohya", dtype: torch.dtype | None = None,
                     device="cpu") -> MergeReport:
    """Merge [(lora path, strength), ...] into one LoRA file: exact (ranks concatenated), or SVD-reduced
    when `new_rank` or a dynamic method is given. Tensors are written in `dtype` (default fp32)."""
    inputs = read_loras(loras)
    report = MergeReport(Path(output), sum(len(lo.modules) for lo in inputs))
    modules = concat_modules(inputs)
    if new_rank is not None or dynamic_method is not None:
        modules, report.ranks = resize_modules(modules, new_rank, dynamic_method, dynamic_param, device=device)
    meta = _lora_metadata(inputs, modules, fmt, report.warnings)
    save_lora_modules(modules, output, fmt, meta, dtype or torch.float32)
    return report

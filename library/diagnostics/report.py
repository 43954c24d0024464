"""A diagnosis and its report: the findings (error, warning, note) of one LoRA file, the verdict (the worst
finding), the JSON form and the human report `tools/check_lora.py` prints."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .keys import FORMATS


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


def few(items: list[str], n: int = 3) -> str:
    return ", ".join(items[:n]) + (" ..." if len(items) > n else "")


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


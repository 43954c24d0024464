"""Side-by-side evaluation: the same prompts and seeds under several model states, in one grid.

A grid has one row per prompt and one column per state: the base model and LoRA strengths
(`strength_columns`), or the saved checkpoints of a run (`checkpoint_columns`). `render_grid` renders every
cell, then writes `{stem}.mp4` (the grid video, each cell labelled), `{stem}.png` (contact sheet: per
prompt, one labelled strip of frames per column), `{stem}.json` (settings per row, columns, errors) and,
with `save_cells`, each cell's own MP4 under `{stem}_cells/`. A column whose setup fails (a corrupt
checkpoint) and a prompt that fails are reported and skipped; everything else still renders.
"""

from __future__ import annotations

import logging
import re
import secrets
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

from .generate import SamplingModels, encode_requests, generate
from .loras import LoadedLora, LoraSpec, attach_loras, detach_loras, expert_of_name, scale_strengths
from .media import contact_sheet, grid_video, to_frames, write_json, write_mp4, write_png
from .prompts import SampleRequest
from .save import versions

logger = logging.getLogger(__name__)


@dataclass
class Column:
    label: str
    setup: Callable[[], dict | None]  # prepares the models; returns info for the sidecar
    info: dict = field(default_factory=dict)


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9.]+", "_", text).strip("_") or "cell"


def render_grid(models: SamplingModels, requests: list[SampleRequest], columns: list[Column], folder: str | Path,
                stem: str, *, sampler: str = "unipc", schedule: str = "wan", save_cells: bool = True,
                extra: dict | None = None) -> dict:
    """Render requests x columns and write the grid files. Returns the sidecar dict (with `files`)."""
    folder = Path(folder)
    requests = [r if r.seed is not None else replace(r, seed=secrets.randbelow(2**31)) for r in requests]
    if models.text_encoder is not None:  # once, not once per column
        requests = encode_requests(models.text_encoder, requests, models.variant)
    cells: dict[tuple[int, int], tuple] = {}
    settings: dict[int, dict] = {}
    errors: list[str] = []
    for c, column in enumerate(columns):
        try:
            column.info = column.setup() or {}
        except (ValueError, OSError) as exc:
            errors.append(f"column {column.label!r}: {exc}")
            logger.error("column %r skipped: %s", column.label, exc)
            continue
        for r, request in enumerate(requests):
            try:
                sample = generate(models, request, sampler=sampler, schedule=schedule)
            except (ValueError, OSError) as exc:
                errors.append(f"column {column.label!r}, {exc}")
                logger.error("%s", exc)
                continue
            settings[r] = sample.settings
            cells[r, c] = (column.label, to_frames(sample.video), sample.settings["fps"])
    rows = [[cells[r, c][:2] for c in range(len(columns)) if (r, c) in cells] for r in range(len(requests))]
    rows = [row for row in rows if row]
    sidecar = {"columns": [{"label": col.label, **col.info} for col in columns],
               "rows": [settings[r] for r in sorted(settings)], "errors": errors, **(extra or {}),
               "versions": versions(), "files": {}}
    if rows:
        fps = next(iter(cells.values()))[2]
        write_mp4(grid_video(rows), folder / f"{stem}.mp4", fps)
        sheet_rows = [(f"p{r + 1} seed {settings[r]['seed']} | {label}", frames)
                      for (r, c), (label, frames, _) in sorted(cells.items())]
        write_png(contact_sheet(sheet_rows), folder / f"{stem}.png")
        sidecar["files"] = {"video": f"{stem}.mp4", "contact_sheet": f"{stem}.png"}
        if save_cells:
            for (r, c), (label, frames, fps_cell) in sorted(cells.items()):
                write_mp4(frames, folder / f"{stem}_cells" / f"p{r + 1:02d}_{c:02d}_{_slug(label)}.mp4", fps_cell)
    write_json(sidecar, folder / f"{stem}.json")
    return sidecar


def strength_columns(loaded: list[LoadedLora], strengths: list[float], compare_base: bool) -> list[Column]:
    """Columns for a strength sweep: `base` (every LoRA off) and each strength (times each LoRA's own)."""
    columns = [Column("base", lambda: scale_strengths(loaded, 0.0) or {"strength": 0.0})] if compare_base else []
    for s in strengths:
        columns.append(Column(f"strength {s:g}", lambda s=s: scale_strengths(loaded, s) or {"strength": s}))
    return columns


# ---- checkpoints of a run ---------------------------------------------------------------------------

_CKPT = re.compile(r"^(?P<name>.+?)(?P<e1>_high_noise|_low_noise)?(?:-step(?P<step>\d{8})|-(?P<epoch>\d{6}))?"
                   r"(?P<e2>_high_noise|_low_noise)?\.safetensors$")


@dataclass
class Checkpoint:
    name: str
    step: int | None
    epoch: int | None
    final: bool
    files: list[Path] = field(default_factory=list)

    @property
    def label(self) -> str:
        step = f"step {self.step}" if self.step is not None else None
        if self.final:
            return "final" + (f" ({step})" if step else "")
        if self.epoch is not None:
            return f"epoch {self.epoch}" + (f" ({step})" if step else "")
        return step or self.name


def _metadata_step(path: Path) -> int | None:
    try:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as fh:
            value = (fh.metadata() or {}).get("ss_steps")
        return int(value) if value not in (None, "") else None
    except Exception:  # an unreadable file is reported when it is loaded
        return None


def find_checkpoints(folder: str | Path, name: str | None = None) -> list[Checkpoint]:
    """Every saved LoRA of a run (musubi / our names, per-expert pairs grouped), sorted by step; the final
    save last. Step of an epoch or final save comes from its `ss_steps` metadata when present."""
    groups: dict[tuple, Checkpoint] = {}
    for path in sorted(Path(folder).glob("*.safetensors")):
        m = _CKPT.match(path.name)
        if not m or (name and m["name"] != name):
            continue
        step, epoch = (int(m["step"]) if m["step"] else None), (int(m["epoch"]) if m["epoch"] else None)
        key = (m["name"], step, epoch)
        ckpt = groups.setdefault(key, Checkpoint(m["name"], step, epoch, final=step is None and epoch is None))
        ckpt.files.append(path)
    for ckpt in groups.values():
        if ckpt.step is None:
            ckpt.step = _metadata_step(ckpt.files[0])
    order = lambda c: (c.final, c.step if c.step is not None else float("inf"), c.epoch or 0, c.name)  # noqa: E731
    return sorted(groups.values(), key=order)


def is_whole_dit(path: Path) -> bool:
    """A checkpoint that is a whole DiT (a full fine-tune) rather than a LoRA: judged by its tensor names."""
    from safetensors import safe_open

    from library.wan.dit_formats import describe_checkpoint

    try:
        with safe_open(str(path), framework="pt") as fh:
            keys = list(fh.keys())
    except Exception:  # an unreadable file is reported when its column is set up
        return False
    return describe_checkpoint(keys) == "a WAN DiT"


def checkpoint_columns(models: SamplingModels, checkpoints: list[Checkpoint], strength: float = 1.0,
                       include_base: bool = False, base_files: dict[str, Path] | None = None) -> list[Column]:
    """One column per checkpoint: its LoRA file(s) replace the previous column's; a whole-DiT checkpoint
    (full fine-tuning) replaces the expert's weights instead, loaded like the base (`base_files` lets the
    base column come back after one)."""
    current: list[LoadedLora] = []
    swapped: set[str] = set()

    def load_expert(expert: str, path: Path) -> None:
        from library.wan.loading import load_dit

        old = models.experts[expert]
        where = old.patch_embedding.weight  # never fp8: the device and dtype the expert runs in
        models.experts[expert] = None  # let the old weights go before the new ones load
        del old
        models.experts[expert] = load_dit(path, device=where.device, dtype=where.dtype, task=models.variant.name)

    def use(ckpt: Checkpoint | None):
        def setup():
            detach_loras(current)
            current.clear()
            if ckpt is None:
                for expert in sorted(swapped):
                    if not base_files or expert not in base_files:
                        raise ValueError("the base column after a whole-DiT checkpoint needs the base files")
                    load_expert(expert, base_files[expert])
                swapped.clear()
                return {"checkpoint": None}
            dits = [p for p in ckpt.files if is_whole_dit(p)]
            for path in dits:
                expert = expert_of_name(path) or ("dit" if "dit" in models.experts else "low_noise")
                load_expert(expert, path)
                swapped.add(expert)
            loras = [p for p in ckpt.files if p not in dits]
            if loras:
                current.extend(attach_loras([LoraSpec(p, strength) for p in loras], models.experts, models.variant))
            models.networks[:] = [lo.network for lo in current]
            return {"checkpoint": [str(p) for p in ckpt.files], "step": ckpt.step, "epoch": ckpt.epoch,
                    "experts": sorted({expert_of_name(p) or "all" for p in ckpt.files}),
                    "kind": "whole DiT" if dits else "LoRA"}
        return setup

    columns = [Column("base", use(None))] if include_base else []
    return columns + [Column(c.label, use(c)) for c in checkpoints]

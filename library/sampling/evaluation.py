"""Side-by-side evaluation: the same prompts and seeds under several model states, in one grid.

A grid has one row per prompt and one column per state: the base model and LoRA strengths
(`strength_columns`), or the saved checkpoints of a run (`library.evaluation.compare`). `render_grid` renders every
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
from .loras import LoadedLora, scale_strengths
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
                extra: dict | None = None, guidance=None, fps: float | None = None) -> dict:
    """Render requests x columns and write the grid files. Returns the sidecar dict (with `files`).
    `guidance` (CFG skip, skip-layer guidance) and `fps` are passed to `generate`."""
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
                sample = generate(models, request, sampler=sampler, schedule=schedule, guidance=guidance, fps=fps)
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

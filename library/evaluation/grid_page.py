"""An evaluation grid (a checkpoint comparison or a strength sweep) as an HTML page in report.html's style:
a row per prompt, a column per model state, each cell its own video, beside the grid's MP4 / PNG / JSON."""

from __future__ import annotations

import json
from pathlib import Path

from library.training.report.html import grid_html, page, table, write_page


def write_grid_page(sidecar: str | Path, title: str) -> Path:
    """Write STEM.html beside STEM.json; returns its path."""
    sidecar = Path(sidecar)
    data = json.loads(sidecar.read_text(encoding="utf-8"))
    columns = [[c.get("label", ""), c.get("step", ""), ", ".join(Path(p).name for p in c.get("checkpoint") or [])]
               for c in data.get("columns", [])]
    sections = [("grid", "Grid", grid_html(sidecar, sidecar.parent)),
                ("columns", "Columns", table(["column", "step", "files"], columns))]
    settings = [[i + 1, r.get("prompt", ""), r.get("seed", ""), f"{r.get('width')}x{r.get('height')}",
                 r.get("frames", ""), r.get("steps", "")] for i, r in enumerate(data.get("rows", []))]
    if settings:
        sections.append(("prompts", "Prompts", table(["#", "prompt", "seed", "size", "frames", "steps"], settings)))
    return write_page(sidecar.with_suffix(".html"), page(title, str(sidecar.parent.absolute()), sections))

"""The HTML style shared by report.html, sweep.html and the checkpoint-comparison grids: one file with its
own stylesheet, media by relative links (so the folder can be moved or zipped), no script and no network.
Each video holds a link to its file, so a browser that cannot play it still offers it."""

from __future__ import annotations

import html
import json
import os
import time
from pathlib import Path
from urllib.parse import quote

from ..files import atomic_write_bytes

CSS = """
:root { color-scheme: light; }
body { font: 15px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; margin: 0; color: #1d1d1f;
       background: #f6f7f9; }
header { background: #24292f; color: #fff; padding: 14px 24px; }
header h1 { margin: 0; font-size: 20px; } header p { margin: 4px 0 0; color: #c9d1d9; font-size: 13px; }
nav { position: sticky; top: 0; background: #fff; border-bottom: 1px solid #d0d7de; padding: 6px 24px; z-index: 1;
      font-size: 13px; } nav a { margin-right: 14px; color: #0969da; text-decoration: none; }
main { max-width: 1280px; margin: 0 auto; padding: 8px 24px 40px; }
section { background: #fff; border: 1px solid #d0d7de; border-radius: 6px; padding: 4px 18px 14px; margin: 16px 0;
          scroll-margin-top: 40px; }
h2 { font-size: 17px; border-bottom: 1px solid #eaeef2; padding-bottom: 6px; }
h3 { font-size: 15px; margin: 14px 0 6px; }
table { border-collapse: collapse; font-size: 13px; margin: 6px 0; }
th, td { border: 1px solid #d0d7de; padding: 4px 8px; text-align: left; vertical-align: top; }
th { background: #f6f8fa; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
tr.best td { background: #dafbe1; } .warn { color: #9a6700; } .bad { color: #cf222e; } .muted { color: #6e7781; }
.plots { display: grid; grid-template-columns: repeat(auto-fill, minmax(460px, 1fr)); gap: 12px; }
.plots img { width: 100%; border: 1px solid #eaeef2; }
.scroll { overflow-x: auto; }
.grid td { text-align: center; } .grid video { width: 224px; max-height: 320px; display: block; margin: 0 auto;
  background: #000; object-fit: contain; } .grid img { max-width: 448px; display: block; margin: 0 auto; }
.grid figcaption { font-size: 11px; color: #6e7781; }
pre { background: #f6f8fa; padding: 10px; overflow-x: auto; font-size: 12px; max-height: 480px; }
ul.diag li { margin: 4px 0; }
"""


def esc(value) -> str:
    return html.escape(str(value), quote=True)


def rel(path: str | Path, base: str | Path) -> str:
    """`path` as a URL relative to the folder `base` (forward slashes, quoted)."""
    return quote(Path(os.path.relpath(Path(path).absolute(), Path(base).absolute())).as_posix())


def fmt(value, digits: int = 4) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.{digits}g}" if value == value else "NaN"
    return str(value)


def table(head: list[str] | None, rows: list[list], numeric: set[int] = frozenset(),
          row_classes: list[str] | None = None, raw: bool = False) -> str:
    """A table (no header row when `head` is None); cells are escaped unless `raw` (then they are HTML)."""
    out = ["<table>" + ("<tr>" + "".join(f"<th>{esc(h)}</th>" for h in head) + "</tr>" if head else "")]
    for i, row in enumerate(rows):
        cls = f' class="{row_classes[i]}"' if row_classes and row_classes[i] else ""
        cells = "".join(f'<td{" class=num" if j in numeric else ""}>{c if raw else esc(fmt(c))}</td>'
                        for j, c in enumerate(row))
        out.append(f"<tr{cls}>{cells}</tr>")
    return "\n".join(out) + "</table>"


def media(path: Path, base: Path, poster: Path | None = None, still: bool = False, caption: str = "") -> str:
    """A <video> (MP4, looping, muted; `poster` shown until it plays) or an <img>, linked relatively."""
    if still or path.suffix.lower() not in (".mp4", ".webm"):
        tag = f'<img src="{rel(poster or path, base)}" alt="{esc(caption or path.name)}">'
    else:
        poster_attr = f' poster="{rel(poster, base)}"' if poster else ""
        tag = (f'<video src="{rel(path, base)}"{poster_attr} controls loop muted playsinline preload="auto">'
               f'<a href="{rel(path, base)}">{esc(path.name)}</a></video>')
    note = f"<figcaption>{esc(caption)}</figcaption>" if caption else ""
    return f"<figure style='margin:0'>{tag}{note}</figure>"


def section(anchor: str, title: str, body: str) -> str:
    return f'<section id="{anchor}"><h2>{esc(title)}</h2>\n{body}\n</section>'


def page(title: str, subtitle: str, sections: list[tuple[str, str, str]]) -> str:
    """A whole document: sections are (anchor, title, body HTML)."""
    nav = "".join(f'<a href="#{a}">{esc(t)}</a>' for a, t, _ in sections)
    body = "\n".join(section(a, t, b) for a, t, b in sections)
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">'
            f"<title>{esc(title)}</title><style>{CSS}</style></head><body>"
            f"<header><h1>{esc(title)}</h1><p>{esc(subtitle)} &middot; written "
            f"{esc(time.strftime('%Y-%m-%d %H:%M:%S'))}</p></header><nav>{nav}</nav><main>{body}</main>"
            "</body></html>\n")


def write_page(path: Path, text: str) -> Path:
    atomic_write_bytes(path, text.encode("utf-8"))
    return path


def grid_cells(sidecar: Path) -> dict[tuple[int, int], Path]:
    """{(row, column): cell MP4} of an evaluation grid (`render_grid` writes them to STEM_cells/)."""
    cells = {}
    folder = sidecar.with_name(sidecar.stem + "_cells")
    for path in sorted(folder.glob("p*_*.mp4")) if folder.is_dir() else []:
        parts = path.stem.split("_")
        if len(parts) >= 2 and parts[0][1:].isdigit() and parts[1].isdigit():
            cells[int(parts[0][1:]) - 1, int(parts[1])] = path
    return cells


def grid_html(sidecar: Path, base: Path) -> str:
    """One evaluation grid (a strength sweep or a checkpoint comparison) as a table: a row per prompt, a
    column per model state, each cell its own video; the whole-grid files linked below."""
    data = json.loads(sidecar.read_text(encoding="utf-8"))
    columns = [c.get("label", str(i)) for i, c in enumerate(data.get("columns", []))]
    cells = grid_cells(sidecar)
    rows_out = []
    for r, settings in enumerate(data.get("rows", [])):
        label = f"{settings.get('prompt', '')} (seed {settings.get('seed', '')})"
        cells_html = [media(cells[r, c], base) if (r, c) in cells else "<span class=muted>-</span>"
                      for c in range(len(columns))]
        rows_out.append([esc(label), *cells_html])
    body = [f"<div class='scroll grid'>{table(['prompt', *columns], rows_out, raw=True)}</div>"] if rows_out else []
    links = [f'<a href="{rel(sidecar.with_name(name), base)}">{esc(name)}</a>'
             for name in (data.get("files") or {}).values() if sidecar.with_name(name).exists()]
    if links:
        body.append("<p>whole grid: " + ", ".join(links) + "</p>")
    for error in data.get("errors") or []:
        body.append(f"<p class=bad>{esc(error)}</p>")
    return "\n".join(body) or "<p class=muted>the grid has no rendered cell</p>"

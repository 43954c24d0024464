"""report.html of one output folder, built from the folder alone: run_summary.json, loss.csv and the plots,
diagnosis, the saved checkpoints ranked as `tools/pick_checkpoint.py` ranks them, the samples rendered
during training (a row per prompt, a column per step), evaluation grids saved inside the folder (strength
sweeps, checkpoint comparisons) and the resolved config."""

from __future__ import annotations

import json
import logging
import math
import re
from pathlib import Path

from ..logs import read_loss_csv
from .html import esc, fmt, grid_html, media, page, rel, table, write_page
from .plots import INSTALL_HINT, PLOT_FILES, matplotlib_available
from .ranking import rank_checkpoints
from .summary import read_summary

logger = logging.getLogger(__name__)
REPORT_FILE = "report.html"
PLOT_TITLES = {"loss": "loss", "lr": "learning rate", "grad_norm": "gradient norm", "experts": "per-expert loss",
               "timesteps": "timesteps trained"}


def _summary_html(s: dict) -> str:
    if not s:
        return "<p class=muted>no run_summary.json in this folder (written by the trainer)</p>"
    steps, data, mem = s.get("steps", {}), s.get("dataset", {}), s.get("memory", {})
    sec = steps.get("seconds_per_step")
    experts = "; ".join(f"{e['name']} (timesteps {e['timesteps'][0]:.0f}-{e['timesteps'][1]:.0f}, rank "
                        f"{e.get('rank')}, lr {e.get('learning_rate'):g})" for e in s.get("experts", []))
    buckets = ", ".join(f"{b}: {n}" for b, n in data.get("buckets", {}).items())
    rows = [["status", s.get("status", "")], ["task", f"{s.get('task')} ({s.get('training')})"], ["experts", experts],
            ["dataset", f"{data.get('images', 0)} images, {data.get('clips', 0)} clips, "
                        f"{data.get('validation_items', 0)} validation items, {data.get('batches_per_epoch')} batches "
                        "per epoch"],
            ["buckets (W x H x frames: items)", buckets],
            ["steps", f"{steps.get('done')} of {steps.get('total')} (epoch {steps.get('epoch')})"],
            ["time per step", "" if sec is None else f"{sec:.3g} s (median)"],
            ["time since the run started", f"{steps.get('elapsed_seconds', 0) / 60:.1f} min"],
            [mem.get("what", "peak memory"),
             "" if mem.get("gib") is None else f"{mem['gib']:.2f} GiB on {mem.get('device')}"]]
    settings = [[k, fmt(v)] for k, v in s.get("settings", {}).items() if v not in (None, "", 0, False) or
                k in ("network_dim", "learning_rate")]
    return (table(None, rows) + "<h3>key settings</h3>" + table(["key", "value"], settings)
            + f"<p class=muted>updated {esc(s.get('updated', ''))}</p>")


def _plots_html(folder: Path) -> str:
    found = [(name, folder / f) for name, f in PLOT_FILES.items() if (folder / f).is_file()]
    body = "<div class=plots>" + "".join(
        f"<figure style='margin:0'><img src='{rel(p, folder)}' alt='{esc(PLOT_TITLES[n])}'>"
        f"<figcaption>{esc(PLOT_TITLES[n])}</figcaption></figure>" for n, p in found) + "</div>"
    if not found:
        body = "<p class=muted>no plots yet (they are drawn as the loss comes in)</p>"
    if not matplotlib_available():
        body += f"<p class=warn>matplotlib is not installed: only the loss curve is drawn. {esc(INSTALL_HINT)}</p>"
    return body


def _diagnosis_html(folder: Path, s: dict) -> str:
    items = [f"<li class=warn>start of run: {esc(w)}</li>" for w in s.get("advice", {}).get("warnings", [])]
    diagnosis = folder / "diagnosis.md"
    if diagnosis.is_file():  # the loss monitor's warnings: "- **step N, kind**: message (with the guide's advice)"
        for line in diagnosis.read_text(encoding="utf-8", errors="replace").splitlines():
            found = re.match(r"- \*\*(.+?)\*\*:\s*(.*)", line)
            if found:
                items.append(f"<li class=bad><b>{esc(found.group(1))}</b>: {esc(found.group(2))}</li>")
    lines = "".join(f"<li>{esc(x)}</li>" for x in s.get("advice", {}).get("lines", []))
    body = f"<ul>{lines}</ul>" if lines else ""
    return body + (f"<ul class=diag>{''.join(items)}</ul>" if items else
                   "<p>no warning: the loss monitor found no plateau, unrecovered spike or overfitting.</p>")


def _saves_html(folder: Path, rows: list[dict], output_name: str | None) -> str:
    val = [r for r in rows if r["kind"] == "val" and math.isfinite(r["loss"])]
    parts = []
    if val:
        base = val[0]["loss"] if val[0]["step"] == 0 else None
        vrows = [[r["step"], r["loss"], "" if not base else f"{100 * (base - r['loss']) / base:.1f}%"] for r in val]
        parts.append("<h3>validation loss</h3>" + (f"<p>before the first step (baseline): {base:.4f}</p>"
                                                    if base else "") + table(["step", "loss", "drop from baseline"],
                                                                             vrows, numeric={0, 1, 2}))
    try:
        ranking = rank_checkpoints(folder, output_name)
    except FileNotFoundError:
        return "\n".join(parts + ["<p class=muted>no checkpoint saved yet</p>"])
    best = ranking.recommended[0] if ranking.recommended else None
    body, classes = [], []
    for c in ranking.checkpoints:
        mark = "test first" if c.label == best else ("also" if c.label in ranking.recommended else "")
        files = ", ".join(f"<a href='{rel(folder / f, folder)}'>{esc(f)}</a>" for f in c.files)
        body.append([esc(c.label), esc(fmt(c.step)), "" if c.share is None else f"{100 * c.share:.0f}%",
                     esc(fmt(c.train_loss)), esc(fmt(c.val_loss)),
                     "" if c.val_drop is None else f"{100 * c.val_drop:.1f}%", mark, files])
        classes.append("best" if c.label == best else "")
    parts.append("<h3>saves, ranked as tools/pick_checkpoint.py ranks them</h3><div class=scroll>" + table(
        ["checkpoint", "step", "% of run", "train loss (avg)", "val loss", "drop from baseline", "", "files"],
        body, numeric={1, 2, 3, 4, 5}, row_classes=classes, raw=True) + "</div>")
    parts.append("<ul>" + "".join(f"<li>{esc(r)}</li>" for r in ranking.reasons) + "</ul>")
    parts.append(f"<p class=muted>next: <code>python tools/compare_checkpoints.py {esc(folder)} --task ... --dit ... "
                 "--from_file prompts.txt --include_base</code> renders them side by side</p>")
    return "\n".join(parts)


def training_samples(folder: Path) -> dict[int, dict]:
    """{prompt index: {"prompt": text, "steps": {step: (media path, poster, still)}}} from sample/*.json."""
    prompts: dict[int, dict] = {}
    for sidecar in sorted((folder / "sample").glob("*.json")):
        try:
            data = json.loads(sidecar.read_text(encoding="utf-8"))
            step, files = data["training"]["step"], data["files"]
            index = int(sidecar.stem.rsplit("_", 1)[1])
        except (OSError, ValueError, KeyError, IndexError, TypeError):
            continue
        settings = data.get("settings", {})
        video, sheet = files.get("video"), files.get("contact_sheet")
        entry = prompts.setdefault(index, {"prompt": settings.get("prompt", ""), "steps": {}})
        entry["steps"][int(step)] = (sidecar.with_name(video) if video else None,
                                     sidecar.with_name(sheet) if sheet else None, settings.get("frames") == 1)
    return dict(sorted(prompts.items()))


def _samples_html(folder: Path) -> str:
    prompts = training_samples(folder)
    if not prompts:
        return "<p class=muted>no samples rendered during training (sample_prompts, sample_every_n_steps)</p>"
    steps = sorted({s for p in prompts.values() for s in p["steps"]})
    rows = []
    for index, p in prompts.items():
        cells = []
        for step in steps:
            video, sheet, still = p["steps"].get(step, (None, None, False))
            cells.append(media(sheet if (still or not video) and sheet else video, folder)
                         if (video or sheet) else "<span class=muted>-</span>")
        rows.append([f"{index + 1}: {esc(p['prompt'])}", *cells])
    return "<div class='scroll grid'>" + table(["prompt", *[f"step {s}" for s in steps]], rows, raw=True) + "</div>"


def evaluation_grids(folder: Path) -> list[Path]:
    """Sidecars of evaluation grids saved inside the folder (one level down): strength sweeps, comparisons."""
    found = []
    for path in sorted(folder.glob("*/*.json")):
        if path.parent.name == "sample":
            continue
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if isinstance(data, dict) and isinstance(data.get("columns"), list) and isinstance(data.get("rows"), list):
            found.append(path)
    return found


def _config_html(folder: Path, output_name: str | None) -> str:
    configs = sorted(folder.glob(f"{output_name}_config.toml" if output_name else "*_config.toml"))
    if not configs:
        return "<p class=muted>no resolved config in this folder</p>"
    return "".join(f"<p><a href='{rel(c, folder)}'>{esc(c.name)}</a></p><pre>{esc(c.read_text(errors='replace'))}</pre>"
                   for c in configs)


def write_report(folder: str | Path, output_name: str | None = None) -> Path:
    """Write FOLDER/report.html (atomically) and return its path."""
    folder = Path(folder)
    summary = read_summary(folder)
    output_name = output_name or summary.get("output_name")
    rows = read_loss_csv(folder / "loss.csv")[0] if (folder / "loss.csv").is_file() else []
    sections = [("summary", "Run", _summary_html(summary)), ("plots", "Plots", _plots_html(folder)),
                ("diagnosis", "Diagnosis", _diagnosis_html(folder, summary)),
                ("saves", "Saves and validation", _saves_html(folder, rows, output_name)),
                ("samples", "Samples during training", _samples_html(folder))]
    grids = evaluation_grids(folder)
    if grids:
        sections.append(("grids", "Strength sweeps and comparisons", "\n".join(
            f"<h3>{esc(g.relative_to(folder).as_posix())}</h3>" + grid_html(g, folder) for g in grids)))
    sections.append(("config", "Resolved config", _config_html(folder, output_name)))
    title = f"{output_name or folder.name}: training report"
    subtitle = f"{folder.absolute()} · {summary.get('status', 'status unknown')}"
    return write_page(folder / "report.html", page(title, subtitle, sections))

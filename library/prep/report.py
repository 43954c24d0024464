"""report.json and a self-contained report.html (thumbnails embedded as base64), worst first.

Every input appears: each image, each clip window of each video, and each source that gave nothing
(unreadable, too short). Rows are sorted dropped-before-kept, then by combined score, lowest first,
so the top of the report is where a user looks to tune thresholds. No timestamps: a rerun on the same
inputs writes the same bytes.
"""

from __future__ import annotations

import html
import json
from pathlib import Path

from .filters import METRICS, Thresholds
from .media import atomic_write_text

REPORT_FIELDS = ("source", "output", "caption", "kind", "kept", "reasons", "score", "start", "end",
                 "source_fps", "size", "out_size", "crop", "phash", "scores")


def sort_worst_first(items: list[dict]) -> list[dict]:
    def key(item: dict):
        score = item.get("score")
        return (bool(item.get("kept")), -1e9 if score is None else score, item["source"], item.get("index", -1))

    return sorted(items, key=key)


def report_entry(item: dict) -> dict:
    entry = {k: item.get(k) for k in REPORT_FIELDS}
    if not item.get("kept"):
        entry["output"] = entry["caption"] = None  # nothing was written for it
    if "indices" in item:
        entry["start"], entry["end"] = item["indices"][0], item["indices"][-1]
    return entry


def summary(items: list[dict], sources: int) -> dict:
    kept = [i for i in items if i.get("kept")]
    reasons: dict[str, int] = {}
    for item in items:
        for reason in item.get("reasons", []):
            label = reason.split(":", 1)[0]
            reasons[label] = reasons.get(label, 0) + 1
    return {"sources": sources, "items": len(items), "kept": len(kept), "dropped": len(items) - len(kept),
            "kept_images": sum(1 for i in kept if i["kind"] == "image"),
            "kept_clips": sum(1 for i in kept if i["kind"] == "clip"), "drop_reasons": dict(sorted(reasons.items()))}


def _metric_cell(item: dict, metric: str, thresholds: Thresholds) -> str:
    value = item.get("scores", {}).get(metric)
    if value is None:
        return "<td class=na>-</td>"
    field_name, direction, _ = METRICS[metric]
    limit = getattr(thresholds, field_name)
    bad = value < limit if direction == "min" else value > limit
    return f"<td class={'bad' if bad else 'ok'}>{value:.3g}</td>"


def _row(item: dict, thresholds: Thresholds) -> str:
    thumb = item.get("thumb") or ""
    image = f'<img src="data:image/jpeg;base64,{thumb}" alt="">' if thumb else ""
    span = f"<br><small>frames {item['indices'][0]}-{item['indices'][-1]}</small>" if "indices" in item else ""
    decision = "kept" if item.get("kept") else "dropped"
    score = "" if item.get("score") is None else f"{item['score']:.2f}"
    cells = "".join(_metric_cell(item, m, thresholds) for m in METRICS)
    reasons = "<br>".join(html.escape(r) for r in item.get("reasons", []))
    return (f"<tr class={decision}><td>{image}</td><td>{html.escape(item['source'])}{span}<br>"
            f"<small>{html.escape(item.get('output') or '') if item.get('kept') else ''}</small></td>"
            f"<td>{decision}</td><td>{reasons}</td>"
            f"<td>{score}</td>{cells}</tr>")


STYLE = """body{font-family:sans-serif;margin:1em}table{border-collapse:collapse;font-size:13px}
td,th{border:1px solid #ccc;padding:3px 5px;vertical-align:top}img{width:128px}
tr.dropped{background:#fff0f0}tr.kept{background:#f3fff3}td.bad{color:#b00;font-weight:bold}td.na{color:#999}"""


def render_html(items: list[dict], info: dict, thresholds: Thresholds) -> str:
    head = "".join(f"<th>{html.escape(m)}</th>" for m in METRICS)
    rows = "\n".join(_row(item, thresholds) for item in items)
    facts = html.escape(json.dumps(info, sort_keys=True))
    return (f"<!DOCTYPE html><html><head><meta charset=utf-8><title>Dataset preparation report</title>"
            f"<style>{STYLE}</style></head><body><h1>Dataset preparation report</h1><pre>{facts}</pre>"
            f"<table><tr><th>thumbnail</th><th>source / output</th><th>decision</th><th>reasons</th>"
            f"<th>score</th>{head}</tr>\n{rows}\n</table></body></html>\n")


def write_reports(output_dir: Path, items: list[dict], info: dict, thresholds: Thresholds) -> None:
    """Write report.json and report.html for the items (already decided)."""
    ordered = sort_worst_first(items)
    document = {"summary": info, "thresholds": thresholds.__dict__, "items": [report_entry(i) for i in ordered]}
    atomic_write_text(output_dir / "report.json", json.dumps(document, indent=1, sort_keys=True) + "\n")
    atomic_write_text(output_dir / "report.html", render_html(ordered, info, thresholds))

"""Text output: a model's generated `training_notes.md` (current version, monitoring, every version with its
files, dataset, hyperparameters, gates and tests, and the history) and the plain-text table for `list`.
Rendering only: nothing here reads or writes files.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping, Sequence

from .index import (
    GATES, HYPER_KEYS, INDEX_NAME, MONITOR_SCORES, ROLES, _current, _gate_title, _latest_scores,
)


# ---- training notes ---------------------------------------------------------------------------------


def _fmt(value: Any) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def _size(n: int) -> str:
    return f"{n / 1e6:.1f} MB" if n >= 1e5 else f"{n / 1e3:.1f} kB"


def _hyper_line(hp: Mapping[str, Any]) -> str:
    keys = [k for k in HYPER_KEYS if k in hp] + sorted(k for k in hp if k not in HYPER_KEYS)
    return ", ".join(f"{k} {_fmt(hp[k])}" for k in keys) or "not recorded in the metadata"


def _settings_diff(version: dict, previous: dict) -> str:
    """'lr 0.0001 -> 0.00015, dim 64 -> 96' between the versions' first common file."""
    role = next((r for r in ROLES if r in version["files"] and r in previous["files"]), None)
    if role is None:
        return ""
    new, old = version["files"][role]["hyperparameters"], previous["files"][role]["hyperparameters"]
    changed = [k for k in HYPER_KEYS if k not in ("seed", "steps") and new.get(k) != old.get(k)]
    return ", ".join(f"{k} {_fmt(old.get(k, '-'))} -> {_fmt(new.get(k, '-'))}" for k in changed)


def _scores_line(latest: Mapping[str, tuple[float, str]]) -> str:
    return ", ".join(f"{k} {_fmt(v)}" for k, (v, _) in latest.items())


def _version_lines(v: dict, previous: dict | None) -> list[str]:
    n, files = v["version"], v["files"]
    state = v["status"]
    if v.get("broken"):
        state += f" (rolled back as broken: {v.get('broken_reason')})"
    elif v.get("deprecated"):
        state += f" ({v['deprecated']})"
    lines = [f"## v{n} ({v['date']}): {state}", ""]
    lines += [f"- File{'s' if len(files) > 1 else ''}: " + "; ".join(
        f"`{Path(f['path']).name}` (sha256 `{f['sha256'][:12]}`, {_size(f['size'])})" for f in files.values())]
    if v.get("released"):
        lines.append(f"- Released to production: {v['released']}")
    lines.append(f"- Base model: {v.get('base_model')}")
    data = v.get("dataset", {})
    count = f"{data['count']} items" if data.get("count") else "count not recorded"
    extra = "".join(f"; {x}" for x in (data.get("description"), data.get("config") and f"config `{data['config']}`")
                    if x)
    lines.append(f"- Dataset: {count}{extra}")
    hps = {r: f["hyperparameters"] for r, f in files.items()}
    if len({json.dumps(h, sort_keys=True) for h in hps.values()}) == 1:
        lines.append(f"- Hyperparameters: {_hyper_line(next(iter(hps.values())))}")
    else:
        lines += [f"- Hyperparameters ({r}): {_hyper_line(h)}" for r, h in hps.items()]
    if previous is None:
        lines.append(f"- Changes: first version{'; ' + v['changes'] if v.get('changes') else ''}")
    else:
        diff = _settings_diff(v, previous)
        text = "; ".join(x for x in (v.get("changes"), diff and f"settings: {diff}") if x) or "not described"
        lines.append(f"- Changes from v{previous['version']}: {text}")
    lines.append("- Release gates:")
    for gate in GATES:
        g = v.get("gates", {}).get(gate, {})
        mark = "x" if g.get("state") == "passed" else " "
        when = f" {g['date']}" + (f" by {g['by']}" if g.get("by") else "") if g else ""
        lines.append(f"  - [{mark}] {GATES[gate]}: **{g.get('state', 'pending')}**{when}")
    tests = v.get("tests", [])
    lines.append("- Test results:" + ("" if tests else " none recorded"))
    for t in tests:
        head = t["date"] + (f" by {t['by']}" if t.get("by") else "")
        if t.get("gate"):
            head += f", {_gate_title(t['gate'])} {'passed' if t['passed'] else 'failed'}"
        body = "; ".join(x for x in (", ".join(f"{k} {_fmt(s)}" for k, s in t.get("scores", {}).items()),
                                     "; ".join(f"issue: {i}" for i in t.get("issues", [])), t.get("notes")) if x)
        lines.append(f"  - {head}" + (f": {body}" if body else ""))
    issues = [i for t in tests for i in t.get("issues", [])]
    lines.append("- Known issues: " + ("; ".join(issues) if issues else "none recorded"))
    latest = _latest_scores(v)
    if latest:
        lines.append(f"- Latest scores: {_scores_line(latest)}")
    return lines + [""]


def render_notes(model: dict) -> str:
    """The model's `training_notes.md`: the current version, monitoring, every version newest first, history."""
    cur = _current(model)
    client = f" (client {model['client']})" if model.get("client") else ""
    lines = [f"# {model['type']}: {model['subject']}{client}", "",
             f"Generated from `{INDEX_NAME}` by `tools/registry.py`; edits made here are overwritten.", "",
             f"- Base model: {model['base_model']}",
             "- Current version: " + (f"v{cur['version']} ({cur['date']})" if cur else
                                      "none (nothing approved for production yet)"),
             f"- Versions: {len(model['versions'])}", ""]
    if cur is not None:
        latest = _latest_scores(cur)
        lines += [f"## Monitoring (v{cur['version']}, latest values)", ""]
        names = list(MONITOR_SCORES) + [k for k in latest if k not in MONITOR_SCORES]
        lines += [f"- {k}: " + (f"{_fmt(latest[k][0])} ({latest[k][1]})" if k in latest else "not recorded")
                  for k in names] + [""]
    versions = model["versions"]
    for i in range(len(versions) - 1, -1, -1):
        lines += _version_lines(versions[i], versions[i - 1] if i else None)
    lines += ["## History", ""]
    for e in model.get("history", []):
        line = f"- {e['date']} v{e['version']} {e['event']}" + (f" by {e['by']}" if e.get("by") else "")
        line += f" (to {e['to']})" if e.get("to") else ""
        line += f": {e['reason']}" if e.get("reason") else ""
        line += f" [FORCED: {'; '.join(e['forced'])}]" if e.get("forced") else ""
        lines.append(line)
    return "\n".join(lines) + "\n"


def format_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[str]) -> str:
    """A plain-text table with a header row."""
    cells = [list(columns)] + [[_fmt(r.get(c, "")) for c in columns] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(columns))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in cells)

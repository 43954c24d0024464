"""`prepare_dataset`: raw folders in, the guide's layout plus a dataset TOML and a report out.

1. List the sources; score each one (`analysis.py`), reusing the cached items of a source whose size,
   mtime and analysis settings are unchanged.
2. Decide: an item is dropped for every threshold it fails (`filters.py`); of the rest, near-duplicates
   of a better item go (`dedup.py`); then `keep_best` keeps the N highest combined scores.
3. Write the kept items that are missing or stale, delete what an earlier run wrote and is no longer
   kept (only files this tool recorded writing), seed captions from sidecars.
4. Write dataset.toml, report.json, report.html and the state file. A rerun on unchanged inputs analyses
   and writes nothing and produces the same files.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from .analysis import AnalysisSettings, analyse_source
from .dedup import find_duplicates
from .export import seed_caption, write_clips_of_source, write_image_item
from .filters import Thresholds, combined_score, failures
from .layout import (caption_path, dataset_toml, fingerprint, load_state, output_path, save_state, settings_key,
                     source_stems)
from .media import atomic_write_text, list_sources, media_kind, remove_output
from .report import summary, write_reports

logger = logging.getLogger(__name__)

VIDEO_FORMATS = ("mp4", "mkv", "png")


@dataclass(frozen=True)
class PrepConfig:
    """One preparation run. `analysis` changes scores (and the cache key); the rest only decisions/output."""

    inputs: tuple[Path, ...]
    output_dir: Path
    analysis: AnalysisSettings = field(default_factory=AnalysisSettings)
    thresholds: Thresholds = field(default_factory=Thresholds)
    disabled_filters: tuple[str, ...] = ()
    keep_best: int = 0
    color_normalize: bool = False
    video_format: str = "mp4"
    batch_size: int = 1
    caption_extension: str = ".txt"
    force: bool = False
    progress: bool = True


@dataclass
class PrepResult:
    items: list[dict]
    analysed: int = 0
    reused: int = 0
    written: int = 0
    removed: int = 0
    summary: dict = field(default_factory=dict)


def decide(items: list[dict], thresholds: Thresholds, disabled: tuple[str, ...] = (), keep_best: int = 0) -> None:
    """Set `score`, `kept` and the full `reasons` of every item, in place."""
    candidates = []
    for item in items:
        if item["kind"] == "source":
            item.update(kept=False, score=None)
            continue
        item["reasons"] = failures(item["scores"], thresholds, disabled)
        item["score"] = combined_score(item["scores"], thresholds, disabled)
        item["kept"] = not item["reasons"]
        if item["kept"]:
            candidates.append(item)
    if "duplicate" not in disabled and candidates:
        hashes = [int(c["phash"], 16) for c in candidates]
        duplicates = find_duplicates(hashes, [c["score"] for c in candidates], thresholds.max_duplicate_distance)
        for index, (original, distance) in duplicates.items():
            item = candidates[index]
            item["kept"] = False
            item["reasons"].append(f"near-duplicate: of {candidates[original]['output']} (phash distance "
                                   f"{distance} <= {thresholds.max_duplicate_distance})")
        candidates = [c for c in candidates if c["kept"]]
    if keep_best and len(candidates) > keep_best:
        ranked = sorted(candidates, key=lambda c: (-c["score"], c["output"]))
        for rank, item in enumerate(ranked[keep_best:], start=keep_best + 1):
            item["kept"] = False
            item["reasons"].append(f"keep_best: rank {rank} > {keep_best} (score {item['score']:.2f})")


def _progress(iterable, enabled: bool, desc: str):
    if not enabled:
        return iterable
    try:
        from tqdm import tqdm
    except ImportError:
        return iterable
    return tqdm(iterable, desc=desc, unit="file")


def _analyse_all(config: PrepConfig, sources, state: dict, result: PrepResult) -> dict:
    """Items per source (cached or fresh); returns the new `sources` section of the state."""
    key = settings_key(config.analysis)
    fresh: dict[str, dict] = {}
    for _, path in _progress(sources, config.progress, "analyse"):
        name = str(path.resolve())
        stamp = fingerprint(path) if path.exists() else None  # a dangling link: analysed into its reason
        cached = state["sources"].get(name)
        if not config.force and cached and cached["fingerprint"] == stamp and cached["key"] == key:
            fresh[name] = cached
            result.reused += 1
            continue
        items = analyse_source(path, media_kind(path), config.analysis)
        fresh[name] = {"fingerprint": stamp, "key": key, "items": items}
        result.analysed += 1
    return fresh


def _write_all(config: PrepConfig, kept: list[dict], state: dict, fresh: dict, result: PrepResult) -> dict:
    """Write missing or stale outputs, delete outputs no longer kept; returns the new `written` record."""
    out = config.output_dir
    output_key = settings_key((config.analysis, config.color_normalize, config.video_format))
    previous, written = state.get("written", {}), {}
    clip_jobs: dict[str, list] = defaultdict(list)
    for item in kept:
        record = {"source": item["source"], "fingerprint": fresh[item["source"]]["fingerprint"],
                  "key": output_key, "start": item.get("start")}
        written[item["output"]] = record
        if previous.get(item["output"]) == record and (out / item["output"]).exists():
            continue
        if item["kind"] == "image":
            write_image_item(item, out / item["output"], config.color_normalize)
            result.written += 1
        else:
            clip_jobs[item["source"]].append((item, out / item["output"]))
    for source, jobs in _progress(sorted(clip_jobs.items()), config.progress, "write clips"):
        result.written += write_clips_of_source(Path(source), jobs, config.analysis.target_fps, config.color_normalize)
    for stale in sorted(set(previous) - set(written)):
        remove_output(out / stale)
        result.removed += 1
    return written


def prepare_dataset(config: PrepConfig) -> PrepResult:
    """Run the whole preparation (see the module docstring); returns the decided items and counts."""
    if config.video_format not in VIDEO_FORMATS:
        raise ValueError(f"video_format {config.video_format!r}: use one of {', '.join(VIDEO_FORMATS)}")
    out = config.output_dir
    out_abs = out.resolve()
    sources = [(root, path) for root, path in list_sources(list(config.inputs)) if out_abs not in path.parents]
    if not sources:
        raise FileNotFoundError(f"no images or videos under {', '.join(map(str, config.inputs))}")
    out.mkdir(parents=True, exist_ok=True)  # only once there is something to prepare
    stems = source_stems(sources)
    state = load_state(out)
    result = PrepResult(items=[])
    fresh = _analyse_all(config, sources, state, result)
    items = [dict(item) for name in sorted(fresh) for item in fresh[name]["items"]]
    for item in items:
        if item["kind"] != "source":
            item["output"] = output_path(item, stems[item["source"]], config.video_format)
            item["caption"] = caption_path(item, stems[item["source"]], config.caption_extension)
    save_state(out, {**state, "sources": fresh})  # an interrupted write phase keeps the analysis
    decide(items, config.thresholds, config.disabled_filters, config.keep_best)
    kept = [item for item in items if item["kept"]]
    written = _write_all(config, kept, state, fresh, result)
    (out / "captions").mkdir(exist_ok=True)
    for item in kept:
        seed_caption(Path(item["source"]), out / item["caption"], config.caption_extension)
    _write_dataset_toml(config, kept)
    result.items = items
    result.summary = summary(items, len(sources))
    write_reports(out, items, result.summary, config.thresholds)
    save_state(out, {"format": state["format"], "sources": fresh, "written": written})
    logger.info("prepared %s: %s", out, result.summary)
    return result


def _write_dataset_toml(config: PrepConfig, kept: list[dict]) -> None:
    settings = config.analysis
    text = dataset_toml(config.output_dir, (settings.resolution, settings.resolution), settings.frames,
                        has_images=any(i["kind"] == "image" for i in kept),
                        has_videos=any(i["kind"] == "clip" for i in kept),
                        batch_size=config.batch_size, caption_extension=config.caption_extension,
                        square=settings.square, fps=settings.target_fps)
    atomic_write_text(config.output_dir / "dataset.toml", text)

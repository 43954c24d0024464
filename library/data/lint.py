"""Linting a dataset TOML before caching: what would be lost, degraded or unbalanced, with advice.

    report = lint_dataset("dataset.toml", task="t2v-A14B", goal="character", tokenizer="google/umt5-xxl")
    print(format_report(report)); sys.exit(report.exit_code)

The checks: missing and empty captions, captions over the text encoder's 512 tokens (exact with a umT5
tokenizer folder, estimated without), media under their bucket size (upscaled), videos shorter than the
target frames, frame rates far from the model's (repeated or unevenly dropped frames), items per bucket
(a bucket of one), duplicate files (identical bytes or a near-identical perceptual hash) and the dataset
size against the training guide's minimum for the goal, with the guide's rank and epochs for that size.

Levels: `error` means an item is lost or the config is unusable (fix it before caching); `warning` means
training runs but learns less well; `info` states facts and the guide's recommendations. Items, buckets
and skips come from `items.enumerate_dataset`, so the linter sees exactly what the cachers will see.
The sample-count tables come from `library.guide`, the one place the guide's numbers live.
"""

from __future__ import annotations

import hashlib
import logging
import math
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from library.guide import EPOCHS_BY_SIZE, MINIMUM_SAMPLES, RANK_BY_SIZE, row_for

from .buckets import bucket_step
from .dataset_config import DatasetConfigError, DatasetSpec, load_dataset_config
from .items import MediaItem, caption_candidates, captioned_sources, enumerate_dataset
from .video_io import MediaError, MediaInfo, probe, resample_indices

logger = logging.getLogger(__name__)

LEVELS = ("error", "warning", "info")
DEFAULT_TASK = "t2v-A14B"  # checked as when no task is given: 16 fps, VAE 2.1 buckets (step 16)
UPSCALE_TOLERANCE = 1.05  # media upscaled by more than this to cover their bucket are reported
FPS_TOLERANCE = 0.10  # relative difference between source and target fps that counts as "far"
CHARS_PER_TOKEN = 4  # umT5 on English text, for the estimate without a tokenizer


@dataclass(frozen=True)
class Finding:
    """One problem or fact. `dataset` is a position in `DatasetConfig.all` ([[datasets]] then
    [[validation_datasets]]), None for the whole config; `file` is the media (or config) it is about."""

    level: str
    check: str  # config, caption, source, tokens, media, size, frames, fps, bucket, duplicate, dataset_size
    message: str
    advice: str = ""
    dataset: int | None = None
    file: str = ""


@dataclass
class LintReport:
    """Findings plus the counts they are about. `exit_code` is 1 when there is an error."""

    config_path: str
    task: str
    goal: str | None
    datasets: list[str] = field(default_factory=list)  # "[[datasets]] #0: SOURCE" per position
    images: int = 0  # training images that yield an item
    clips: int = 0  # training videos that yield at least one item
    items: int = 0  # training items (images plus video windows)
    findings: list[Finding] = field(default_factory=list)

    def add(self, level: str, check: str, message: str, advice: str = "", dataset: int | None = None,
            file: str | Path = "") -> None:
        self.findings.append(Finding(level, check, message, advice, dataset, str(file)))

    def by_level(self, level: str) -> list[Finding]:
        return [f for f in self.findings if f.level == level]

    @property
    def exit_code(self) -> int:
        return 1 if self.by_level("error") else 0

    def to_dict(self) -> dict:
        counts = {level: len(self.by_level(level)) for level in LEVELS}
        return {"config": self.config_path, "task": self.task, "goal": self.goal, "datasets": self.datasets,
                "images": self.images, "clips": self.clips, "items": self.items, "counts": counts,
                "findings": [asdict(f) for f in self.findings]}


@dataclass
class _Context:
    """What every check of one run needs."""

    report: LintReport
    step: int  # bucket granularity of the task's VAE
    fps: float  # the model's frame rate
    text_len: int  # tokens the text encoder reads (EOS included)
    count_tokens: Callable[[str], int]  # caption -> tokens, EOS included
    media: list[tuple[int, Path, bool]] = field(default_factory=list)  # (dataset, path, is_image) with items


def lint_dataset(config_path, task: str | None = None, goal: str | None = None, tokenizer=None) -> LintReport:
    """Check a dataset TOML and its media; never raises for dataset problems (they become findings).
    Raises ValueError for an unknown task or goal and for a tokenizer folder that cannot be loaded."""
    from library.wan.variants import get_variant

    if goal is not None and goal not in MINIMUM_SAMPLES:
        raise ValueError(f"unknown goal {goal!r}; valid goals: {', '.join(MINIMUM_SAMPLES)}")
    variant = get_variant(task or DEFAULT_TASK)
    report = LintReport(str(config_path), variant.name, goal)
    count_tokens, exact = _token_counter(tokenizer)
    ctx = _Context(report, bucket_step(variant.vae), float(variant.fps), variant.text_len, count_tokens)
    try:
        config = load_dataset_config(config_path)
    except DatasetConfigError as exc:
        report.add("error", "config", str(exc), "fix the dataset TOML (see dataset_configs/ for examples)",
                   file=config_path)
        return report
    report.config_path = str(config.path)
    if task is None:
        report.add("info", "config", f"no task given: checked as {variant.name} ({variant.fps} fps, buckets in "
                   f"steps of {ctx.step})", "pass --task for the model you will train (ti2v-5B: 24 fps, step 32)")
    if not exact:
        report.add("info", "tokens", f"caption token counts are estimates (about {CHARS_PER_TOKEN} characters "
                   "per token)", "pass --tokenizer with a umT5 tokenizer folder for exact counts")
    for position, spec in enumerate(config.all):
        report.datasets.append(f"[[{spec.table}]] #{spec.index}: {spec.source}")
        _lint_spec(ctx, position, spec)
    _check_duplicates(ctx)
    _check_dataset_size(report, goal)
    logger.info("%s: %d errors, %d warnings", report.config_path, len(report.by_level("error")),
                len(report.by_level("warning")))
    return report


def _token_counter(tokenizer) -> tuple[Callable[[str], int], bool]:
    """(caption -> tokens including EOS, exact?): the umT5 tokenizer when given, else an estimate."""
    if tokenizer is None:
        return estimate_tokens, False
    from library.wan.text_encoder import clean_prompt, load_tokenizer

    try:
        loaded = load_tokenizer(tokenizer)
    except FileNotFoundError as exc:
        raise ValueError(str(exc)) from None
    return (lambda text: len(loaded(clean_prompt(text), add_special_tokens=True, verbose=False).input_ids)), True


def estimate_tokens(text: str) -> int:
    """A umT5 token count estimate: ASCII text at about 4 characters per token, any other character as
    one token (CJK text is close to that; accented text is over-counted), plus EOS."""
    ascii_chars = sum(1 for c in text if ord(c) < 128)
    return math.ceil(ascii_chars / CHARS_PER_TOKEN) + (len(text) - ascii_chars) + 1


def _lint_spec(ctx: _Context, position: int, spec: DatasetSpec) -> None:
    """Every check of one dataset; usable media are recorded in ctx.media for the duplicate check."""
    report = ctx.report
    try:
        sources, caption_skips = captioned_sources(spec)
        items, skips = enumerate_dataset(spec, ctx.step, ctx.fps)
    except MediaError as exc:
        report.add("error", "config", str(exc), "fix the path in the dataset TOML", position, spec.source)
        return
    except DatasetConfigError as exc:  # a resolution the task's buckets cannot honour
        report.add("error", "config", str(exc), "set `resolution` in the dataset TOML to one of those values",
                   position, spec.config_path)
        return
    for skip in caption_skips:
        _caption_finding(report, position, spec, Path(skip.path), skip.reason)
    _check_dataset_fps(ctx, position, spec)
    by_media: dict[Path, list[MediaItem]] = defaultdict(list)
    for item in items:
        by_media[item.media_path].append(item)
    for media, caption, _ in sources:
        _check_caption_length(ctx, position, media, caption)
        _check_media(ctx, position, spec, media, by_media.get(media, []))
    reported = {f.file for f in report.findings if f.dataset == position and f.level == "error"}
    for skip in skips:  # anything the pipeline drops that no check above explained
        if skip.path not in reported:
            report.add("error", "media", skip.reason, "fix or replace the file, or remove it", position, skip.path)
    _check_buckets(report, position, spec, items)
    for media, media_items in by_media.items():
        ctx.media.append((position, media, media_items[0].is_image))
    if not spec.is_val:
        report.images += sum(1 for m in by_media.values() if m[0].is_image)
        report.clips += sum(1 for m in by_media.values() if not m[0].is_image)
        report.items += len(items)


def _caption_finding(report: LintReport, position: int, spec: DatasetSpec, media: Path, reason: str) -> None:
    """A source skipped before any media decoding: missing or empty caption, or what the pipeline says."""
    candidates = [] if spec.jsonl else caption_candidates(media, spec.caption_extension)
    existing = [p for p in candidates if p.is_file()]
    if candidates and not existing and media.exists():
        guide = candidates[1] if media.parent.name in ("images", "videos") else candidates[0]
        report.add("error", "caption", "missing caption",
                   f"write {guide} (tools/caption.py can draft captions)", position, media)
    elif existing and not existing[0].read_bytes().decode("utf-8-sig", errors="replace").strip():
        report.add("error", "caption", f"empty caption file {existing[0].name}",
                   f"write a caption in {existing[0]}; empty captions for CFG come from caption_dropout_rate",
                   position, media)
    else:
        report.add("error", "source", reason, "fix the caption, the JSONL line or the file name", position, media)


def _check_caption_length(ctx: _Context, position: int, media: Path, caption: str) -> None:
    tokens = ctx.count_tokens(caption)
    if tokens > ctx.text_len:
        about = "" if ctx.count_tokens is not estimate_tokens else "about "
        ctx.report.add("warning", "tokens", f"caption has {about}{tokens} tokens, over the {ctx.text_len} the text "
                       "encoder reads: the rest is cut off", "shorten it to the content and motion that matter",
                       position, media)


def _check_media(ctx: _Context, position: int, spec: DatasetSpec, media: Path, items: list[MediaItem]) -> None:
    """Size against the bucket, and for videos length and frame rate. Unreadable media are left to the
    pipeline's own skip reason."""
    try:
        info = probe(media)
    except MediaError:
        return
    if spec.kind == "video":
        _check_video(ctx, position, spec, media, info)
    if not items:
        return
    width, height = items[0].bucket[:2]
    scale = max(width / info.width, height / info.height)
    if scale > UPSCALE_TOLERANCE:
        ctx.report.add("warning", "size", f"{info.width}x{info.height} is under its {width}x{height} bucket: "
                       f"upscaled {scale:.2f}x, which blurs it", f"use a source of at least {width}x{height}, "
                       "lower `resolution`, or set bucket_no_upscale = true", position, media)


def _check_video(ctx: _Context, position: int, spec: DatasetSpec, media: Path, info: MediaInfo) -> None:
    source_fps = spec.source_fps or info.fps
    target_fps = (spec.target_fps or ctx.fps) if source_fps else None
    length = len(resample_indices(info.frame_count, source_fps, target_fps))
    rate = f" at {target_fps:g} fps" if target_fps else ""
    shortest, longest = min(spec.target_frames), max(spec.target_frames)
    if spec.frame_extraction != "full" and length < shortest:
        ctx.report.add("error", "frames", f"{length} frames{rate}, shorter than the smallest target frame count "
                       f"{shortest}", "use a longer clip, or smaller target_frames", position, media)
    elif spec.frame_extraction != "full" and length < longest:
        used = ", ".join(str(n) for n in spec.target_frames if n <= length)
        ctx.report.add("warning", "frames", f"{length} frames{rate}, shorter than target frames {longest}: only "
                       f"{used}-frame windows are taken", "use a longer clip, or drop the longer target_frames",
                       position, media)
    if source_fps and target_fps:
        _check_fps(ctx, position, spec, media, source_fps, target_fps)


def _check_fps(ctx: _Context, position: int, spec: DatasetSpec, media: Path, source: float, target: float) -> None:
    """Resampling is by frame selection: slower sources repeat frames, non-integer ratios step unevenly."""
    ratio = source / target
    if abs(ratio - 1) <= FPS_TOLERANCE or (ratio > 1 and abs(ratio - round(ratio)) < 0.02):
        return
    label = f"model's {target:g} fps" if spec.target_fps is None else f"target_fps {target:g}"
    if ratio < 1:
        message = f"{source:g} fps is far from the {label}: frames are repeated (stutter)"
        advice = f"use clips recorded at {target:g} fps or more"
    else:
        message = f"{source:g} fps is far from the {label}: frames are taken {ratio:.2f} apart (uneven motion)"
        advice = f"re-encode at {target:g} fps (tools/prepare_dataset.py --target_fps {target:g}) or a multiple of it"
    ctx.report.add("warning", "fps", message, advice, position, media)


def _check_dataset_fps(ctx: _Context, position: int, spec: DatasetSpec) -> None:
    if spec.kind == "video" and spec.target_fps and abs(spec.target_fps / ctx.fps - 1) > FPS_TOLERANCE:
        ctx.report.add("warning", "fps", f"target_fps {spec.target_fps:g} is far from the model's {ctx.fps:g} fps: "
                       "learned motion will play too fast or too slow", "remove target_fps to use the model's rate",
                       position, spec.config_path)


def _check_buckets(report: LintReport, position: int, spec: DatasetSpec, items: list[MediaItem]) -> None:
    """Items per (W, H, F) bucket; a batch never mixes buckets, so a bucket of one is always alone."""
    counts = Counter(item.bucket for item in items)
    if not items:
        report.add("error", "bucket", "no usable item in this dataset", "see the errors above for each file",
                   position, spec.source)
        return
    listing = ", ".join(f"{w}x{h}x{f}: {n}" for (w, h, f), n in sorted(counts.items()))
    report.add("info", "bucket", f"{len(items)} items in {len(counts)} bucket(s): {listing}", "", position, spec.source)
    for item in items:
        if counts[item.bucket] == 1:
            w, h, f = item.bucket
            report.add("warning", "bucket", f"only item in bucket {w}x{h}x{f}",
                       "crop or resize it to a size other items share, or add similar items", position,
                       item.media_path)


def _perceptual_hash(media: Path, is_image: bool) -> int:
    """`quality.phash` of an image, or of a clip's middle frame."""
    import cv2

    from library.prep.quality import phash

    from .video_io import load_image, read_video_frames

    if is_image:
        frame = load_image(media)
    else:
        frame = read_video_frames(media, [probe(media).frame_count // 2])[0]
    return phash(cv2.cvtColor(frame, cv2.COLOR_RGB2GRAY))


def _file_digest(media: Path) -> str:
    """SHA-256 of a file's bytes, or of a frame folder's files in name order."""
    digest = hashlib.sha256()
    for path in sorted(media.iterdir()) if media.is_dir() else [media]:
        with open(path, "rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()


def _check_duplicates(ctx: _Context) -> None:
    """Identical files anywhere in the config, then near-duplicates (perceptual hash) among images and
    among clips, with the same distance as tools/prepare_dataset.py. The first in config order stays."""
    from library.prep.dedup import find_duplicates
    from library.prep.filters import Thresholds

    first: dict[str, Path] = {}
    distinct = []
    for position, media, is_image in ctx.media:
        original = first.setdefault(_file_digest(media), media)
        if original != media:
            ctx.report.add("warning", "duplicate", f"identical to {original}", "remove one copy", position, media)
        else:
            distinct.append((position, media, is_image))
    max_distance = Thresholds().max_duplicate_distance
    for is_image in (True, False):
        group, hashes = [], []
        for position, media, kind in distinct:
            if kind != is_image:
                continue
            try:
                hashes.append(_perceptual_hash(media, is_image))
                group.append((position, media))
            except MediaError as exc:
                logger.warning("near-duplicate check skipped for %s", exc)
        for index, (kept, distance) in sorted(find_duplicates(hashes, [0.0] * len(hashes), max_distance).items()):
            position, media = group[index]
            ctx.report.add("warning", "duplicate", f"near-duplicate of {group[kept][1]} (perceptual hash distance "
                           f"{distance} of 64)", "keep the better one, or vary the content", position, media)


def _check_dataset_size(report: LintReport, goal: str | None) -> None:
    """Training sample count against the guide's minimum for the goal, and its rank and epochs."""
    samples = report.images + report.clips
    rank_lo, rank_hi = row_for(RANK_BY_SIZE, samples)
    epochs_lo, epochs_hi = row_for(EPOCHS_BY_SIZE, samples)
    report.add("info", "dataset_size", f"{samples} samples ({report.images} images, {report.clips} clips): the guide "
               f"recommends rank {rank_lo}-{rank_hi} and {epochs_lo}-{epochs_hi} epochs for this size",
               "network_dim and max_train_epochs in the training TOML")
    if goal is None:
        return
    min_images, min_clips = MINIMUM_SAMPLES[goal]
    need = f"{min_images} images or {min_clips} clips" if min_images else f"{min_clips} clips"
    if report.clips >= min_clips or (min_images is not None and report.images >= min_images):
        report.add("info", "dataset_size", f"{goal}: meets the guide's minimum of {need}")
        return
    report.add("warning", "dataset_size", f"{goal}: the guide's minimum is {need}; this dataset has "
               f"{report.images} images and {report.clips} clips",
               "collect 2-3x the target, then filter (tools/prepare_dataset.py --keep_best)")


def format_report(report: LintReport) -> str:
    """The report as text: datasets, then findings (errors first) with their advice, then a summary."""
    lines = [f"dataset config {report.config_path} (task {report.task}"
             + (f", goal {report.goal})" if report.goal else ")")]
    lines += [f"  #{i} {label}" for i, label in enumerate(report.datasets)]
    for level in LEVELS:
        for f in report.by_level(level):
            where = (f"#{f.dataset} " if f.dataset is not None else "") + (f"{f.file}: " if f.file else "")
            lines.append(f"{level.upper():8}{where}{f.message}")
            if f.advice:
                lines.append(f"{'':8}-> {f.advice}")
    names = {"error": ("error", "errors"), "warning": ("warning", "warnings"), "info": ("note", "notes")}
    counts = ", ".join(f"{n} {names[level][n != 1]}" for level in LEVELS for n in [len(report.by_level(level))])
    lines.append(f"{report.images} images, {report.clips} clips, {report.items} items: {counts}")
    return "\n".join(lines)

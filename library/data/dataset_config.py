"""The dataset TOML (musubi-tuner schema): typed dataclasses, `[general]` inheritance and validation.

A dataset TOML has an optional `[general]` table whose keys every dataset inherits, then one or more
`[[datasets]]` tables (image or video, a directory or a JSONL file each) and optional
`[[validation_datasets]]` tables (or `is_val = true` on a `[[datasets]]` entry) for a held-out loss.
This module is the only place that reads the TOML and the only place where inheritance is resolved:
everything downstream receives frozen `DatasetSpec` objects. Unknown or misplaced keys are errors that
name the file, the table and the closest valid key.
"""

from __future__ import annotations

import dataclasses
import difflib
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from library.errors import UserError

logger = logging.getLogger(__name__)

FRAME_EXTRACTION_MODES = ("head", "chunk", "slide", "uniform", "full")
SOURCE_KEYS = ("image_directory", "image_jsonl_file", "video_directory", "video_jsonl_file")
# conditioning media, matched to each item by name (JSONL: `control_path` / `mask_path` / `reference_path`):
# control images of one-frame training, control videos of Fun-Control and VACE, VACE masks and references
CONDITION_KEYS = ("control_directory", "mask_directory", "reference_directory")
DATASET_ONLY_KEYS = (*SOURCE_KEYS, "cache_directory", "is_val", *CONDITION_KEYS)
ONE_FRAME_KEYS = ("fp_1f_clean_indices", "fp_1f_target_index", "fp_1f_no_post")  # image datasets only
TABLES = ("general", "datasets", "validation_datasets")


class DatasetConfigError(UserError, ValueError):
    """A dataset TOML that cannot be used; the message names the file, the table and the key."""


def _opt(default, help_text: str, video: bool = False):
    return field(default=default, metadata={"help": help_text, "video": video})


@dataclass(frozen=True, kw_only=True)
class DatasetOptions:
    """Keys valid in `[general]` and in each dataset; a dataset's own value overrides `[general]`."""

    resolution: tuple[int, int] = _opt((960, 544), "target size as W and H (an int means a square); buckets keep its "
                                       "area; sides are multiples of 16 (32 for the WAN 2.2 VAE)")
    caption_extension: str = _opt(".txt", "extension of caption files beside the media or in captions/")
    batch_size: int = _opt(1, "items per batch; a batch never mixes buckets")
    num_repeats: int = _opt(1, "how many times each item is seen per epoch")
    enable_bucket: bool = _opt(False, "aspect-ratio buckets at the area of `resolution` instead of one fixed size")
    bucket_no_upscale: bool = _opt(False, "never upscale: small media get a smaller bucket (or are skipped)")
    caption_dropout_rate: float = _opt(0.0, "probability of training an item with the empty caption (for CFG)")
    target_fps: float | None = _opt(None, "frame rate videos are resampled to (default: the model's, 16 or 24)", True)
    target_frames: tuple[int, ...] = _opt((1,), "frame counts to extract (1 + 4k; others are rounded down)", True)
    frame_extraction: str = _opt("head", "head, chunk, slide, uniform or full", True)
    frame_stride: int = _opt(1, "frames between window starts for `slide`", True)
    frame_sample: int = _opt(1, "number of windows for `uniform`", True)
    max_frames: int = _opt(129, "longest window for `full` (1 + 4k)", True)
    source_fps: float | None = _opt(None, "the clips' frame rate, overriding what the file says (required to resample "
                                          "frame folders)", True)
    # one-frame training (musubi-tuner's FramePack keys, used by its WAN one-frame mode; `library/data/one_frame.py`)
    fp_1f_clean_indices: tuple[int, ...] | None = _opt(None, "one-frame: RoPE frame index of each control image")
    fp_1f_target_index: int | None = _opt(None, "one-frame: RoPE frame index of the target image")
    fp_1f_no_post: bool = _opt(False, "FramePack's clean_latent_post switch; no effect for WAN (as in musubi-tuner)")


@dataclass(frozen=True, kw_only=True)
class DatasetSpec(DatasetOptions):
    """One resolved dataset: its source, its cache directory and every option after inheritance."""

    kind: str  # "image" or "video"
    source: Path  # the media directory or the JSONL file
    jsonl: bool
    cache_directory: Path
    is_val: bool = False
    # control media matched by name: one-frame control images (one_frame.py), Fun-Control (control.py) and
    # VACE (conditions.py) control videos
    control_directory: Path | None = None
    mask_directory: Path | None = None  # VACE masks (white = generate), same names as the media
    reference_directory: Path | None = None  # VACE reference images, same names as the media
    index: int = 0  # position in its TOML table
    table: str = "datasets"
    config_path: Path = Path("dataset.toml")

    def where(self) -> str:
        """How error messages name this dataset: file, table and position."""
        return f"{self.config_path}: [[{self.table}]] #{self.index} ({self.source})"


@dataclass(frozen=True)
class DatasetConfig:
    """The whole dataset TOML, validated. `train` and `validation` are what the trainer iterates."""

    path: Path
    general: DatasetOptions
    datasets: tuple[DatasetSpec, ...]
    validation_datasets: tuple[DatasetSpec, ...]

    @property
    def train(self) -> tuple[DatasetSpec, ...]:
        return tuple(d for d in self.datasets if not d.is_val)

    @property
    def validation(self) -> tuple[DatasetSpec, ...]:
        return tuple(d for d in self.datasets if d.is_val) + self.validation_datasets

    @property
    def all(self) -> tuple[DatasetSpec, ...]:
        return self.datasets + self.validation_datasets


OPTION_FIELDS = {f.name: f for f in dataclasses.fields(DatasetOptions)}
VIDEO_KEYS = tuple(name for name, f in OPTION_FIELDS.items() if f.metadata["video"])


def round_frames(count: int) -> int:
    """The largest 1 + 4k frame count not above `count` (WAN VAEs need 1 + 4k frames)."""
    return max(1, (count - 1) // 4 * 4 + 1)


def _closest(key: str, valid) -> str:
    match = difflib.get_close_matches(key, list(valid), n=1, cutoff=0.6)
    return f"; did you mean {match[0]!r}?" if match else f"; valid keys: {', '.join(sorted(valid))}"


def _coerce(name: str, value: Any, where: str):
    """Check and convert one option value to its field's type."""
    def bad(expected: str):
        return DatasetConfigError(f"{where}: {name} = {value!r} is not valid: expected {expected}")

    if name == "resolution":
        if isinstance(value, int) and not isinstance(value, bool):
            value = [value, value]
        if not (isinstance(value, (list, tuple)) and len(value) == 2
                and all(isinstance(v, int) and not isinstance(v, bool) and v >= 16 for v in value)):
            raise bad("an int >= 16 or [W, H]")
        return (int(value[0]), int(value[1]))
    if name in ONE_FRAME_KEYS[:2]:
        value = [value] if name == "fp_1f_clean_indices" and isinstance(value, int) else value
        values = value if name == "fp_1f_clean_indices" else [value]
        if not (isinstance(values, (list, tuple)) and values
                and all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in values)):
            raise bad("a list of frame indices (integers >= 0) such as [0]" if name == "fp_1f_clean_indices"
                      else "a frame index (an integer >= 0)")
        return tuple(values) if name == "fp_1f_clean_indices" else int(value)
    if name == "target_frames":
        value = [value] if isinstance(value, int) and not isinstance(value, bool) else value
        if not (isinstance(value, (list, tuple)) and value
                and all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in value)):
            raise bad("a list of positive frame counts such as [1, 21, 41]")
        rounded = sorted({round_frames(v) for v in value})
        if [v for v in value if round_frames(v) != v]:
            logger.warning("%s: target_frames %s are not all 1 + 4k; using %s", where, list(value), rounded)
        return tuple(rounded)
    kind = OPTION_FIELDS[name].type
    if kind == "bool":
        if not isinstance(value, bool):
            raise bad("true or false")
        return value
    if kind == "str":
        if not isinstance(value, str):
            raise bad("a string")
        if name == "frame_extraction" and value not in FRAME_EXTRACTION_MODES:
            raise bad(f"one of {', '.join(FRAME_EXTRACTION_MODES)}" + _closest(value, FRAME_EXTRACTION_MODES))
        return value
    if kind == "int":
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise bad("a positive integer")
        if name == "max_frames" and round_frames(value) != value:
            logger.warning("%s: max_frames %d is not 1 + 4k; using %d", where, value, round_frames(value))
            value = round_frames(value)
        return value
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise bad("a number")
    if name == "caption_dropout_rate" and not 0.0 <= value <= 1.0:
        raise bad("a number between 0 and 1")
    if name != "caption_dropout_rate" and value <= 0:
        raise bad("a positive number")
    return float(value)


def _read_options(table: dict, where: str, allowed_extra: tuple[str, ...], in_general: bool) -> dict:
    """Validate the option keys of one table; return {name: coerced value}."""
    valid = (*OPTION_FIELDS, *allowed_extra)
    options = {}
    for key, value in table.items():
        if key in allowed_extra:
            continue
        if key in DATASET_ONLY_KEYS and in_general:
            raise DatasetConfigError(f"{where}: {key!r} belongs in each [[datasets]] table, not in [general]")
        if key not in OPTION_FIELDS:
            raise DatasetConfigError(f"{where}: unknown key {key!r}" + _closest(key, valid))
        options[key] = _coerce(key, value, where)
    return options


def _resolve_path(value: Any, key: str, where: str, base: Path) -> Path:
    if not isinstance(value, str) or not value:
        raise DatasetConfigError(f"{where}: {key} must be a non-empty path string")
    path = Path(value).expanduser()
    if path.is_absolute() or path.exists():
        return path.resolve() if path.exists() else path
    return (base / path).resolve()  # relative to the TOML file when not found from the working directory


def _build_spec(table: dict, general: dict, index: int, table_name: str, config_path: Path) -> DatasetSpec:
    where = f"{config_path}: [[{table_name}]] #{index}"
    if not isinstance(table, dict):
        raise DatasetConfigError(f"{where}: expected a table of keys, got {type(table).__name__}")
    sources = [k for k in SOURCE_KEYS if k in table]
    if len(sources) != 1:
        raise DatasetConfigError(
            f"{where}: give exactly one of {', '.join(SOURCE_KEYS)}; found {sources or 'none'}")
    source_key = sources[0]
    kind = "image" if source_key.startswith("image") else "video"
    own = _read_options(table, where, DATASET_ONLY_KEYS, in_general=False)
    if kind == "image":
        misplaced = [k for k in own if k in VIDEO_KEYS and k != "target_fps"]
        if misplaced:
            raise DatasetConfigError(
                f"{where}: {misplaced[0]!r} is a video key but this is an image dataset ({source_key}); "
                "remove it or use video_directory / video_jsonl_file")
    elif any(k in ONE_FRAME_KEYS for k in own):
        raise DatasetConfigError(f"{where}: the one-frame keys fp_1f_* are for image datasets; this is a video "
                                 "dataset")
    base = config_path.parent
    source = _resolve_path(table[source_key], source_key, where, base)
    jsonl = source_key.endswith("jsonl_file")
    if "cache_directory" in table:
        cache_dir = _resolve_path(table["cache_directory"], "cache_directory", where, base)
    elif jsonl:
        raise DatasetConfigError(f"{where}: cache_directory is required for a JSONL dataset ({source_key})")
    else:
        cache_dir = source
    is_val = table.get("is_val", False)
    if not isinstance(is_val, bool):
        raise DatasetConfigError(f"{where}: is_val must be true or false")
    is_val = is_val or table_name == "validation_datasets"
    merged = {**general, **own}
    if kind == "video":
        merged = {k: v for k, v in merged.items() if k not in ONE_FRAME_KEYS}  # from [general]: images only
    if "control_directory" in table and jsonl:
        raise DatasetConfigError(f"{where}: control_directory is for directory datasets; a JSONL dataset names "
                                 "each item's control with a `control_path` field on its line")
    for key in CONDITION_KEYS:
        if key in table:
            merged[key] = _resolve_path(table[key], key, where, base)
    if kind == "image":
        merged["target_frames"] = (1,)
    return DatasetSpec(kind=kind, source=source, jsonl=jsonl, cache_directory=cache_dir, is_val=is_val,
                       index=index, table=table_name, config_path=config_path, **merged)


def parse_dataset_config(data: dict, path: Path) -> DatasetConfig:
    """Validate an already-parsed TOML document (`path` only names it in messages and anchors paths)."""
    for key in data:
        if key not in TABLES:
            hint = (f"; {key!r} is a dataset key: put it in [general] or a [[datasets]] table"
                    if key in OPTION_FIELDS or key in DATASET_ONLY_KEYS else _closest(key, TABLES))
            raise DatasetConfigError(f"{path}: unknown top-level key {key!r}{hint}")
    general_table = data.get("general", {})
    if not isinstance(general_table, dict):
        raise DatasetConfigError(f"{path}: [general] must be a table")
    general = _read_options(general_table, f"{path}: [general]", (), in_general=True)
    specs = {}
    for table_name in ("datasets", "validation_datasets"):
        tables = data.get(table_name, [])
        if not isinstance(tables, list):
            raise DatasetConfigError(f"{path}: {table_name} must be an array of tables: write [[{table_name}]]")
        specs[table_name] = tuple(_build_spec(t, general, i, table_name, path) for i, t in enumerate(tables))
    if not specs["datasets"]:
        raise DatasetConfigError(f"{path}: no [[datasets]] table; add at least one dataset")
    config = DatasetConfig(path=path, general=DatasetOptions(**general), datasets=specs["datasets"],
                           validation_datasets=specs["validation_datasets"])
    _check_cache_directories(config)
    _note_fps_resampling(config)
    return config


def _not_a_folder(spec: DatasetSpec) -> str | None:
    """Why the cache directory can never be a folder (it, or a folder above it, is a file), else None. A
    directory dataset caching into its own media folder is left to enumeration, which names the source."""
    if spec.cache_directory == spec.source:
        return None
    path = spec.cache_directory
    blocker = next((p for p in (path, *path.parents) if p.exists() or p.is_symlink()), None)
    if blocker is None or blocker.is_dir():
        return None
    what = "is" if blocker == path else f"is inside {blocker}, which is"
    return f"cache_directory {path} {what} a file, not a folder (or a broken link); point cache_directory at a folder"


def _check_cache_directories(config: DatasetConfig) -> None:
    """Each dataset has its own cache directory, and it is (or can become) a folder."""
    seen: dict[Path, DatasetSpec] = {}
    for spec in config.all:
        problem = _not_a_folder(spec)
        if problem is not None:
            raise DatasetConfigError(f"{spec.where()}: {problem}")
        other = seen.get(spec.cache_directory)
        if other is not None:
            raise DatasetConfigError(
                f"{spec.where()} and [[{other.table}]] #{other.index} share the cache directory "
                f"{spec.cache_directory}: give each dataset its own cache_directory")
        seen[spec.cache_directory] = spec


def _note_fps_resampling(config: DatasetConfig) -> None:
    """Where this trainer reads a dataset differently from musubi-tuner, say so once, at parse time: without
    `source_fps` musubi-tuner takes every frame of a clip as it is; here a clip is resampled from the frame
    rate its file states to the model's (16 fps; 24 for TI2V-5B), keeping its real speed."""
    from .video_io import resample_indices

    specs = [s for s in config.all if s.kind == "video" and s.source_fps is None and s.target_fps is None]
    frames = max((max(s.target_frames) for s in specs), default=1)
    if frames < 5:
        return
    at16, at24 = (round_frames(len(resample_indices(frames, 30.0, fps))) for fps in (16.0, 24.0))
    names = ", ".join(f"[[{s.table}]] #{s.index}" for s in specs)
    logger.warning(
        "%s: %s set no `source_fps`: musubi-tuner then takes every frame of a clip as it is, this trainer resamples "
        "each clip from the frame rate its file states to the model's (16 fps; 24 fps for TI2V-5B) so motion keeps "
        "its real speed: a %d-frame clip filmed at 30 fps gives %d frames at 16 fps (%d at 24 fps) here, all %d with "
        "musubi-tuner. To take every frame as musubi-tuner does, set `target_fps` to the clips' frame rate",
        config.path, names, frames, at16, at24, frames)


def load_dataset_config(path: str | Path) -> DatasetConfig:
    """Read and validate a dataset TOML file."""
    import toml

    path = Path(path).expanduser().resolve()
    if not path.is_file():
        what = "is a folder; give the dataset TOML file in it" if path.is_dir() else "does not exist"
        raise DatasetConfigError(f"dataset config {path} {what}")
    try:
        data = toml.loads(path.read_text(encoding="utf-8"))
    except (toml.TomlDecodeError, UnicodeDecodeError) as exc:
        raise DatasetConfigError(f"{path}: not valid TOML: {exc}") from None
    return parse_dataset_config(data, path)

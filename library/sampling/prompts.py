"""Sample prompts: one `SampleRequest` per video, read from the command line or a prompt file.

Prompt files (`sample_prompts`, `--from_file`) come in three forms:
- `.txt`, musubi-tuner's (and Kohya's) sample-prompt syntax, one prompt a line, `#` starts a comment line:
  `a prompt --w 832 --h 480 --f 81 --d 42 --s 20 --fs 5.0 --l 4.0 --n negative prompt --i image.png`
- `.toml`: `[[prompt]]` tables, or musubi's `[prompt]` table of shared values with `[[prompt.subset]]`
  entries; `.json`: a list of objects (or `{"prompts": [...]}`); keys as `FIELD_NAMES`.

The options (`OPTIONS`, case-insensitive): `--w` / `--h` size, `--f` frames (1 + 4k), `--d` seed, `--s`
steps, `--l` CFG scale (`--g` is musubi's generation spelling of it; `--l` wins when a line has both),
`--fs` flow shift, `--n` negative prompt, `--i` start image (I2V / TI2V), `--cn` control video (Fun-Control),
`--ei` end image (Fun-InP). musubi's options for models this trainer does not run (`NOT_APPLICABLE`: `--ci` /
`--cim` control images, `--of` one-frame inference) and options nobody knows leave the line rendering without them, with
one log line per option and file naming the lines. A value that breaks its rule (`--w -64`, `--f 6`,
`--s 0`, `--l nan`) is a `PromptError` for that line only: `read_prompt_file` returns the good requests
and the errors, so the other prompts still render. Nothing is dropped without a message.
"""

from __future__ import annotations

import difflib
import json
import logging
import re
from dataclasses import dataclass, field, replace
from pathlib import Path

from library.errors import UserError

from . import values as v

logger = logging.getLogger(__name__)

# option -> (SampleRequest field, parser); `g` and `l` both set the CFG scale (`l` wins)
OPTIONS = {
    "w": ("width", v.parse_size), "h": ("height", v.parse_size), "f": ("frames", v.parse_frames),
    "d": ("seed", v.parse_seed), "s": ("steps", v.parse_steps), "l": ("guidance", v.parse_scale),
    "g": ("guidance", v.parse_scale), "fs": ("flow_shift", v.parse_positive), "n": ("negative_prompt", v.parse_text),
    "i": ("image", v.parse_path), "ei": ("end_image", v.parse_path), "of": ("one_frame", v.parse_text),
    "ci": ("control_images", v.parse_path),  # repeatable: one per control image
    "cn": ("control", v.parse_path), "mk": ("mask", v.parse_path),
    "ri": ("references", v.parse_text), "vs": ("vace_scale", v.parse_scale),
}
# musubi options whose features this trainer does not have: the line renders without them (logged once)
NOT_APPLICABLE = {
    "cim": "control image masks (alpha) are not used by WAN one-frame inference (as in musubi-tuner); ignored",
}
# long names accepted in .toml / .json prompt files (ours and musubi's) -> field
FIELD_NAMES = {
    "prompt": "prompt", "negative_prompt": "negative_prompt", "width": "width", "height": "height",
    "frames": "frames", "frame_count": "frames", "num_frames": "frames", "video_length": "frames", "seed": "seed",
    "steps": "steps", "sample_steps": "steps", "infer_steps": "steps", "flow_shift": "flow_shift",
    "discrete_flow_shift": "flow_shift", "guidance": "guidance", "cfg_scale": "guidance",
    "guidance_scale": "guidance", "scale": "guidance", "guidance_high": "guidance_high",
    "guidance_scale_high_noise": "guidance_high", "image": "image", "image_path": "image",
    "end_image": "end_image", "end_image_path": "end_image", "one_frame": "one_frame",
    "one_frame_inference": "one_frame", "control_image_path": "control_images", "control_images": "control_images",
    "control_path": "control", "control_video_path": "control", "vace_video": "control", "mask_path": "mask",
    "vace_video_mask": "mask", "ref_image_path": "references", "reference_path": "references",
    "vace_reference_image": "references", "vace_scale": "vace_scale",
}
FIELD_PARSERS = {"width": v.parse_size, "height": v.parse_size, "frames": v.parse_frames, "seed": v.parse_seed,
                 "steps": v.parse_steps, "guidance": v.parse_scale, "guidance_high": v.parse_scale,
                 "flow_shift": v.parse_positive, "negative_prompt": v.parse_text, "image": v.parse_path,
                 "end_image": v.parse_path, "prompt": v.parse_text, "one_frame": v.parse_text,
                 "control_images": lambda x: tuple(v.parse_path(p) for p in ([x] if isinstance(x, str) else x)),
                 "control": v.parse_path, "mask": v.parse_path,
                 "references": lambda x: ",".join(x) if isinstance(x, list) else v.parse_text(x),
                 "vace_scale": v.parse_scale}
# musubi's prompt-file keys for features this trainer does not have, and bookkeeping keys it adds
FIELDS_NOT_APPLICABLE = {"control_image_mask_path": "cim"}
FIELDS_IGNORED = ("enum", "subset")


class PromptError(UserError, ValueError):
    """A prompt that cannot be rendered; the message names its source (file and line)."""


@dataclass(frozen=True)
class SampleRequest:
    """One video to render. `None` fields take the variant's defaults (or the command line's)."""

    prompt: str
    negative_prompt: str | None = None
    width: int | None = None
    height: int | None = None
    frames: int | None = None
    seed: int | None = None
    steps: int | None = None
    guidance: float | None = None  # CFG scale (both experts unless guidance_high is set)
    guidance_high: float | None = None  # CFG scale of the A14B high-noise expert
    flow_shift: float | None = None
    image: str | None = None  # start image for I2V / TI2V
    end_image: str | None = None  # last frame for FLF2V (`--ei`, `--end_image_path`)
    one_frame: str | None = None  # one-frame inference: `target_index=1,control_index=0` (`--of`)
    control_images: tuple[str, ...] | None = None  # one-frame control images (`--ci`, `--control_image_path`)
    control: str | None = None  # Fun-Control / VACE: control video (or a still control image)
    mask: str | None = None  # VACE: mask video or image, white = generate
    references: str | None = None  # VACE: reference image(s), comma-separated
    vace_scale: float | None = None  # VACE: hint scale (default 1)
    source: str = "prompt"  # where it came from, for messages: "prompts.txt line 3"
    extra: dict = field(default_factory=dict, compare=False)  # precomputed embeddings etc.

    def with_defaults(self, **defaults) -> "SampleRequest":
        """Fill the fields that are None from `defaults` (the command line's values)."""
        return replace(self, **{k: v for k, v in defaults.items() if v is not None and getattr(self, k) is None})


class PromptNotes:
    """Options that were read but not used, gathered per file and logged once each with the lines."""

    def __init__(self, where: str = "prompts"):
        self.where = where
        self.seen: dict[str, list[str]] = {}

    def add(self, message: str, source: str) -> None:
        self.seen.setdefault(message, []).append(source)

    def log(self) -> None:
        for message, sources in self.seen.items():
            if sources == [self.where]:  # one prompt line on its own
                logger.warning("%s: %s", self.where, message)
                continue
            lines = ", ".join(sources[:5]) + (f" and {len(sources) - 5} more" if len(sources) > 5 else "")
            logger.warning("%s: %s (%s)", self.where, message, lines)
        self.seen.clear()


def _note_for(key: str) -> str:
    if key in NOT_APPLICABLE:
        return f"--{key}: {NOT_APPLICABLE[key]}"
    known = list(OPTIONS) + list(NOT_APPLICABLE)
    close = difflib.get_close_matches(key, known, n=1, cutoff=0.5)
    hint = f"did you mean --{close[0]}? " if close else ""
    return (f"unknown option --{key} is ignored ({hint}options: {' '.join('--' + k for k in OPTIONS)}; "
            "the line renders without it)")


def parse_prompt_line(line: str, source: str = "prompt", notes: PromptNotes | None = None) -> SampleRequest:
    """`prompt --w 832 --n negative ...` -> SampleRequest. A value that breaks its option's rule is a
    PromptError; options that do not apply are noted in `notes` (logged at once when there are none)."""
    parts = re.split(r"(?:^|\s)--(?=\w)", line.strip())
    prompt = parts[0].strip()
    own = notes or PromptNotes(source)
    found: dict[str, tuple[str, object]] = {}
    controls: list[str] = []
    for part in parts[1:]:
        key, _, text = part.strip().partition(" ")
        key, text = key.strip().lower(), text.strip()
        if key not in OPTIONS:
            own.add(_note_for(key), source)
            continue
        name, parse = OPTIONS[key]
        try:
            found[key] = (name, parse(text))
        except ValueError as exc:
            raise PromptError(f"{source}: --{key} {exc}") from None
        if key == "ci":
            controls.append(found.pop(key)[1])
    if controls:
        found["ci"] = ("control_images", tuple(controls))
    if "g" in found and "l" in found and found["g"][1] != found["l"][1]:
        own.add("--g and --l both set the CFG scale; --l is used", source)
        del found["g"]
    if not prompt:
        raise PromptError(f"{source}: the line has options but no prompt text")
    if notes is None:
        own.log()
    return SampleRequest(prompt=prompt, source=source, **dict(found.values()))


def _from_mapping(item: dict, source: str, notes: PromptNotes) -> SampleRequest:
    values = {}
    for key, value in item.items():
        name = FIELD_NAMES.get(key)
        if key in FIELDS_NOT_APPLICABLE:
            notes.add(f"{key!r}: {NOT_APPLICABLE[FIELDS_NOT_APPLICABLE[key]]}", source)
        elif name is None and key not in FIELDS_IGNORED:
            close = difflib.get_close_matches(key, list(FIELD_NAMES), n=1, cutoff=0.6)
            notes.add(f"unknown key {key!r} is ignored" + (f" (did you mean {close[0]!r}?)" if close else ""), source)
        elif name is not None and value is not None:
            try:
                parsed = FIELD_PARSERS[name](value)
            except ValueError as exc:
                raise PromptError(f"{source}: {key} {exc}") from None
            if name == "guidance" and "guidance" in values and key != "cfg_scale":
                continue  # musubi's cfg_scale is the CFG scale; guidance_scale only when it is absent
            values[name] = parsed
    if not str(values.get("prompt", "")).strip():
        raise PromptError(f"{source}: no `prompt`")
    return SampleRequest(source=source, **values)


def _structured_items(path: Path) -> list:
    text = path.read_text(encoding="utf-8")
    if path.suffix.lower() == ".json":
        data = json.loads(text)
        return data.get("prompts", data.get("prompt", [])) if isinstance(data, dict) else data
    import toml

    data = toml.loads(text)
    items = data.get("prompt", data.get("prompts", []))
    if isinstance(items, dict) and isinstance(items.get("subset"), list):  # musubi: shared values + subsets
        shared = {k: val for k, val in items.items() if k != "subset"}
        return [{**shared, **subset} for subset in items["subset"]]
    return [items] if isinstance(items, dict) else items


def _read_structured(path: Path, notes: PromptNotes) -> tuple[list[SampleRequest], list[PromptError]]:
    try:
        items = _structured_items(path)
    except Exception as exc:  # noqa: BLE001  json / toml parse errors: one error for the whole file
        raise PromptError(f"{path}: cannot read prompts ({exc})") from None
    requests, errors = [], []
    for i, item in enumerate(items, 1):
        source = f"{path.name} entry {i}"
        try:
            if isinstance(item, str):  # musubi's JSON allows plain prompt lines
                requests.append(parse_prompt_line(item, source, notes))
            else:
                requests.append(_from_mapping(dict(item), source, notes))
        except (PromptError, TypeError, ValueError) as exc:
            errors.append(exc if isinstance(exc, PromptError) else PromptError(f"{source}: {exc}"))
    return requests, errors


def read_prompt_file(path: str | Path) -> tuple[list[SampleRequest], list[PromptError]]:
    """All requests of a prompt file, and one error per line (or entry) that could not be read. Options
    that do not apply are logged once per option, naming the lines."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"prompt file {path} does not exist")
    notes = PromptNotes(path.name)
    if path.suffix.lower() in (".toml", ".json"):
        requests, errors = _read_structured(path, notes)
    else:
        requests, errors = [], []
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip() or line.lstrip().startswith("#"):
                continue
            try:
                requests.append(parse_prompt_line(line, f"{path.name} line {number}", notes))
            except PromptError as exc:
                errors.append(exc)
    notes.log()
    return [_image_beside(r, path.parent) for r in requests], errors


def _image_beside(request: SampleRequest, folder: Path) -> SampleRequest:
    """A relative image (or end image, control image / video, mask) path that is not found from the working
    directory is looked up beside the file."""
    def beside(path: str | None) -> str | None:
        if path and not Path(path).expanduser().exists() and (folder / path).exists():
            return str(folder / path)
        return path

    controls = tuple(beside(p) for p in request.control_images) if request.control_images else request.control_images
    refs = request.references and ",".join(beside(p.strip()) for p in request.references.split(","))
    return replace(request, image=beside(request.image), end_image=beside(request.end_image), control_images=controls,
                   control=beside(request.control), mask=beside(request.mask), references=refs)


def request_problems(request: SampleRequest, variant) -> list[str]:
    """What keeps a request from rendering on `variant` (sizes off the variant's grid, a missing start
    image), each naming the request's source."""
    multiple = variant.vae_stride[1] * variant.patch_size[1]
    problems = []
    for what in ("width", "height"):
        value = getattr(request, what)
        problem = None if value is None else v.check_multiple(value, multiple, what, variant.name)
        if problem:
            problems.append(f"{request.source}: {problem}")
    if variant.is_i2v and not request.image:
        problems.append(f"{request.source}: {variant.name} is an image-to-video model and needs a start image; "
                        "add `--i image.png` to the prompt line or pass --image")
    if getattr(variant, "end_frame", False) and not request.end_image:
        problems.append(f"{request.source}: {variant.name} is a first-last-frame model and needs an end image; "
                        "add `--ei last.png` to the prompt line or pass --end_image_path")
    if getattr(variant, "images_only", False) and request.frames not in (None, 1):
        problems.append(f"{request.source}: {variant.name} is text-to-image: it renders single images (frames 1, "
                        f"not {request.frames}); use t2v-14B for videos")
    if request.one_frame is not None:
        from .one_frame import problems as one_frame_problems

        problems += [f"{request.source}: {p}" for p in one_frame_problems(variant, request.one_frame,
                                                                          len(request.control_images or ()))]
    if getattr(variant, "inpaint", False) and request.end_image and request.frames == 1:
        problems.append(f"{request.source}: an end image (--ei) keeps the last frame of a video; with --f 1 the start "
                        "image is the only frame: render more frames or drop the end image")
    if getattr(variant, "control", False) and not request.control:
        problems.append(f"{request.source}: {variant.name} is a Fun-Control model and needs a control video; add "
                        "`--cn control.mp4` to the prompt line or pass --control_path")
    return problems


def check_requests(requests: list[SampleRequest], variant,
                   where: str = "prompts") -> tuple[list[SampleRequest], list[PromptError]]:
    """Split requests into those `variant` can render and one PromptError per one it cannot (before any
    model loads). A start image on a text-to-video model is noted once and ignored."""
    good, errors, notes = [], [], PromptNotes(where)
    for request in requests:
        problems = request_problems(request, variant)
        if problems:
            errors.append(PromptError("; ".join(problems)))
            continue
        if request.image and variant.model_type not in ("i2v", "ti2v"):
            notes.add(f"start images (--i) are ignored by the text-to-video model {variant.name}", request.source)
        if request.end_image and not (getattr(variant, "end_frame", False) or getattr(variant, "inpaint", False)):
            notes.add(f"end images (--ei) are for the first-last-frame (flf2v-14B) and Fun-InP models; ignored by "
                      f"{variant.name}", request.source)
        if request.control and not (variant.is_vace or getattr(variant, "control", False)):
            notes.add(f"control videos (--cn) are for the Fun-Control and VACE models; ignored by {variant.name}",
                      request.source)
        if (request.mask or (request.references and not getattr(variant, "control", False))) and not variant.is_vace:
            notes.add(f"masks (--mk) are for VACE models and reference images (--ri) for VACE and Fun-Control "
                      f"models; ignored by {variant.name}", request.source)
        good.append(request)
    notes.log()
    return good, errors

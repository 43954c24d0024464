"""Sample prompts: one `SampleRequest` per video, read from the command line or a prompt file.

Prompt files (`sample_prompts`) come in three forms:
- `.txt`, the Kohya sample-prompt syntax, one prompt a line, `#` starts a comment line:
  `a prompt --w 832 --h 480 --f 81 --d 42 --s 20 --fs 5.0 --l 4.0 --n negative prompt --i image.png`
- `.toml`: `[[prompt]]` tables; `.json`: a list of objects (or `{"prompts": [...]}`), keys as `FIELD_NAMES`.
A bad line (unknown option, a value that is not a number) becomes a `PromptError` for that line only:
`read_prompt_file` returns the good requests and the errors, so the other prompts still render.
"""

from __future__ import annotations

import difflib
import json
import re
from dataclasses import dataclass, field, replace
from pathlib import Path

# Kohya option -> (field, type)
OPTIONS = {
    "w": ("width", int), "h": ("height", int), "f": ("frames", int), "d": ("seed", int), "s": ("steps", int),
    "fs": ("flow_shift", float), "l": ("guidance", float), "n": ("negative_prompt", str), "i": ("image", str),
}
# long names accepted in .toml / .json prompt files (and their Kohya aliases)
FIELD_NAMES = {
    "prompt": "prompt", "negative_prompt": "negative_prompt", "width": "width", "height": "height",
    "frames": "frames", "frame_count": "frames", "num_frames": "frames", "seed": "seed", "steps": "steps",
    "sample_steps": "steps", "flow_shift": "flow_shift", "discrete_flow_shift": "flow_shift",
    "guidance": "guidance", "guidance_scale": "guidance", "scale": "guidance", "cfg_scale": "guidance",
    "guidance_high": "guidance_high", "guidance_scale_high_noise": "guidance_high", "image": "image",
    "image_path": "image",
}


class PromptError(ValueError):
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
    source: str = "prompt"  # where it came from, for messages: "prompts.txt line 3"
    extra: dict = field(default_factory=dict, compare=False)  # precomputed embeddings etc.

    def with_defaults(self, **defaults) -> "SampleRequest":
        """Fill the fields that are None from `defaults` (the command line's values)."""
        return replace(self, **{k: v for k, v in defaults.items() if v is not None and getattr(self, k) is None})


def parse_prompt_line(line: str, source: str = "prompt") -> SampleRequest:
    """`prompt --w 832 --n negative ...` -> SampleRequest; unknown options and bad numbers are PromptErrors."""
    parts = re.split(r"(?:^|\s)--(?=\w)", line.strip())
    prompt = parts[0].strip()
    values: dict = {}
    for part in parts[1:]:
        key, _, value = part.strip().partition(" ")
        key, value = key.strip(), value.strip()
        if key not in OPTIONS:
            close = difflib.get_close_matches(key, list(OPTIONS), n=1, cutoff=0.5)
            hint = f" (did you mean --{close[0]}?)" if close else ""
            valid = " ".join(f"--{k}" for k in OPTIONS)
            raise PromptError(f"{source}: unknown option --{key}{hint}; valid options: {valid}")
        name, kind = OPTIONS[key]
        try:
            values[name] = kind(value)
        except ValueError:
            raise PromptError(f"{source}: --{key} needs {'an integer' if kind is int else 'a number'}, "
                              f"got {value!r}") from None
    if not prompt:
        raise PromptError(f"{source}: the line has options but no prompt text")
    return SampleRequest(prompt=prompt, source=source, **values)


def _from_mapping(item: dict, source: str) -> SampleRequest:
    values = {}
    for key, value in item.items():
        name = FIELD_NAMES.get(key)
        if name is None:
            close = difflib.get_close_matches(key, list(FIELD_NAMES), n=1, cutoff=0.6)
            raise PromptError(f"{source}: unknown key {key!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
        values[name] = value
    if not str(values.get("prompt", "")).strip():
        raise PromptError(f"{source}: no `prompt`")
    try:
        for name in ("width", "height", "frames", "seed", "steps"):
            if values.get(name) is not None:
                values[name] = int(values[name])
        for name in ("guidance", "guidance_high", "flow_shift"):
            if values.get(name) is not None:
                values[name] = float(values[name])
    except (TypeError, ValueError) as exc:
        raise PromptError(f"{source}: {exc}") from None
    return SampleRequest(source=source, **values)


def _structured_items(path: Path) -> list:
    text = path.read_text(encoding="utf-8")
    if path.suffix.lower() == ".json":
        data = json.loads(text)
        return data.get("prompts", data.get("prompt", [])) if isinstance(data, dict) else data
    import toml

    data = toml.loads(text)
    items = data.get("prompt", data.get("prompts", []))
    return [items] if isinstance(items, dict) else items


def read_prompt_file(path: str | Path) -> tuple[list[SampleRequest], list[PromptError]]:
    """All requests of a prompt file, and one error per line (or entry) that could not be read."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"prompt file {path} does not exist")
    requests, errors = [], []
    if path.suffix.lower() in (".toml", ".json"):
        try:
            items = _structured_items(path)
        except Exception as exc:  # a broken file is one error for the whole file
            raise PromptError(f"{path}: cannot read prompts ({exc})") from None
        for i, item in enumerate(items, 1):
            try:
                requests.append(_from_mapping(dict(item), f"{path.name} entry {i}"))
            except (PromptError, TypeError, ValueError) as exc:
                errors.append(exc if isinstance(exc, PromptError) else PromptError(f"{path.name} entry {i}: {exc}"))
        return [_image_beside(r, path.parent) for r in requests], errors
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        try:
            requests.append(parse_prompt_line(line, f"{path.name} line {number}"))
        except PromptError as exc:
            errors.append(exc)
    return [_image_beside(r, path.parent) for r in requests], errors


def _image_beside(request: SampleRequest, folder: Path) -> SampleRequest:
    """A relative image path that is not found from the working directory is looked up beside the file."""
    if request.image and not Path(request.image).expanduser().exists() and (folder / request.image).exists():
        return replace(request, image=str(folder / request.image))
    return request

"""What a generate run writes for each video (`--output_type`, musubi-tuner's choices) and the latent files
it writes and reads back.

    video          {stem}.mp4, {stem}.png (contact sheet), {stem}.json (sidecar)    (+ frames with --save_frames)
    images         {stem}/{stem}_0000.png ... (every frame), {stem}.json
    latent         {stem}_latent.safetensors, {stem}.json                           (no VAE decode)
    both           latent + video
    latent_images  latent + images

A latent file is musubi-tuner's: one tensor `latent` [C, F, h, w] (fp32) with string metadata `seeds`,
`prompt`, `height`, `width`, `video_length`, `infer_steps`, `guidance_scale` (+ `negative_prompt`) and ours
(`task`, `flow_shift`, ...). `read_latent` reads those and musubi's own (`.safetensors`, or a `.pt` /
`.pth` tensor read with weights_only). `--no_metadata` writes neither the sidecar nor latent metadata.
"""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path

import torch

from library.errors import UserError

from .generate import Sample
from .media import atomic_target, to_frames, write_frames, write_json
from .save import save_sample, versions

OUTPUT_TYPES = ("video", "images", "latent", "both", "latent_images")
DECODED = ("video", "images", "both", "latent_images")  # output types that need the VAE decode
LATENT_KEY = "latent"


class LatentFileError(UserError, ValueError):
    """A latent file that cannot be decoded; the message names the file."""


def latent_metadata(settings: dict) -> dict[str, str]:
    """musubi-tuner's latent metadata keys (and ours) from a sample's settings, as strings."""
    meta = {"seeds": settings.get("seed"), "prompt": settings.get("prompt"), "height": settings.get("height"),
            "width": settings.get("width"), "video_length": settings.get("frames"),
            "infer_steps": settings.get("steps"), "guidance_scale": settings.get("guidance_low_noise"),
            "negative_prompt": settings.get("negative_prompt"), "task": settings.get("task"),
            "flow_shift": settings.get("flow_shift"), "fps": settings.get("fps")}
    return {k: str(v) for k, v in meta.items() if v is not None}


def write_latent(latents: torch.Tensor, path: Path, metadata: dict[str, str] | None) -> Path:
    """[1, C, F, h, w] or [C, F, h, w] -> musubi's latent file (atomic)."""
    from safetensors.torch import save_file

    latent = latents[0] if latents.dim() == 5 else latents
    tmp = atomic_target(path)
    save_file({LATENT_KEY: latent.detach().float().cpu().contiguous()}, str(tmp), metadata=metadata)
    os.replace(tmp, path)
    return path


def read_latent(path: str | Path) -> tuple[torch.Tensor, dict[str, str]]:
    """A latent file -> ([1, C, F, h, w] fp32, metadata)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise LatentFileError(f"latent file {path} does not exist")
    try:
        if path.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(path), framework="pt") as fh:
                keys, meta = list(fh.keys()), dict(fh.metadata() or {})
                if LATENT_KEY not in keys:
                    raise LatentFileError(f"{path}: no `latent` tensor (keys: {', '.join(keys[:5])}); "
                                          "is this a latent file written with --output_type latent?")
                latent = fh.get_tensor(LATENT_KEY)
        else:
            data, meta = torch.load(path, map_location="cpu", weights_only=True), {}
            latent = data[LATENT_KEY] if isinstance(data, dict) else data
    except LatentFileError:
        raise
    except Exception as exc:  # noqa: BLE001  safetensors and torch.load raise many types for broken files
        raise LatentFileError(f"{path}: not a readable latent file ({type(exc).__name__}: {exc})") from None
    if not isinstance(latent, torch.Tensor) or latent.dim() not in (4, 5) or (latent.dim() == 5 and len(latent) != 1):
        shape = list(latent.shape) if isinstance(latent, torch.Tensor) else type(latent).__name__
        raise LatentFileError(f"{path}: the latent must be [C, F, h, w] (or [1, C, F, h, w]), got {shape}")
    return (latent[None] if latent.dim() == 4 else latent).float(), meta


def _trimmed(sample: Sample, trim: int) -> Sample:
    if not trim or sample.video is None:
        return sample
    frames = sample.video.shape[1]
    if trim >= frames:
        raise ValueError(f"--trim_tail_frames {trim} would remove every one of the {frames} frames")
    settings = {**sample.settings, "trim_tail_frames": trim}
    return replace(sample, video=sample.video[:, : frames - trim], settings=settings)


def _images(sample: Sample, folder: Path, stem: str, extra: dict | None, sidecar: bool) -> dict[str, Path]:
    paths = {"frames": folder / stem}
    write_frames(to_frames(sample.video), folder / stem, stem)
    if sidecar:
        data = {"settings": sample.settings, **(extra or {}), "versions": versions(), "files": {"frames": stem}}
        paths["sidecar"] = write_json(data, folder / f"{stem}.json")
    return paths


def save_outputs(sample: Sample, folder: str | Path, stem: str, output_type: str = "video", *,
                 save_frames: bool = False, trim: int = 0, metadata: bool = True, extra: dict | None = None,
                 fps: float | None = None) -> dict[str, Path]:
    """Write what `output_type` asks for; returns the paths written."""
    if output_type not in OUTPUT_TYPES:
        raise ValueError(f"unknown output_type {output_type!r}; choose one of {', '.join(OUTPUT_TYPES)}")
    folder = Path(folder)
    sample = _trimmed(sample, trim)
    paths: dict[str, Path] = {}
    if output_type in ("latent", "both", "latent_images"):
        folder.mkdir(parents=True, exist_ok=True)
        meta = latent_metadata(sample.settings) if metadata else None
        paths["latent"] = write_latent(sample.latents, folder / f"{stem}_latent.safetensors", meta)
    if output_type in ("video", "both"):
        paths.update(save_sample(sample, folder, stem, save_frames=save_frames, extra=extra, fps=fps, sidecar=metadata))
    elif output_type in ("images", "latent_images"):
        paths.update(_images(sample, folder, stem, extra, metadata))
    elif metadata:  # latent only: the sidecar still says how it was made
        data = {"settings": sample.settings, **(extra or {}), "versions": versions(),
                "files": {"latent": paths["latent"].name}}
        paths["sidecar"] = write_json(data, folder / f"{stem}.json")
    return paths

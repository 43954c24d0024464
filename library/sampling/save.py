"""Saving samples: one video's files, and the samples the training loop asks for.

    save_sample(sample, folder, stem)  ->  {stem}.mp4, {stem}.png (contact sheet), {stem}.json (sidecar),
                                           {stem}_frames/{stem}_0000.png ... with save_frames
    sample_during_training(models, requests, output_dir, step=...)  ->  OUTPUT_DIR/sample/
        {output_name}_step{step:08d}_{index:02d}.mp4 / .png / .json   (one set per prompt)
"""

from __future__ import annotations

import logging
import platform
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .generate import Sample, SamplingModels, generate
from .media import contact_sheet, to_frames, write_frames, write_json, write_mp4, write_png
from .prompts import SampleRequest

logger = logging.getLogger(__name__)


def versions() -> dict:
    """Library versions recorded in every sidecar."""
    return {"python": platform.python_version(), "torch": torch.__version__}


def save_sample(sample: Sample, folder: str | Path, stem: str, *, save_frames: bool = False,
                extra: dict | None = None, fps: float | None = None, sidecar: bool = True) -> dict[str, Path]:
    """Write the MP4, the contact sheet, the JSON sidecar (unless `sidecar` is False) and the PNG frames
    (with `save_frames`) of one sample."""
    folder = Path(folder)
    frames = to_frames(sample.video)
    fps = fps or sample.settings["fps"]
    paths = {"video": write_mp4(frames, folder / f"{stem}.mp4", fps)}
    label = f"seed {sample.settings['seed']}: {sample.settings['prompt']}"
    paths["contact_sheet"] = write_png(contact_sheet([(label, frames)]), folder / f"{stem}.png")
    if save_frames:
        write_frames(frames, folder / f"{stem}_frames", stem)
        paths["frames"] = folder / f"{stem}_frames"
    if sidecar:
        data = {"settings": sample.settings, **(extra or {}), "versions": versions(),
                "files": {k: Path(v).name for k, v in paths.items()}}
        paths["sidecar"] = write_json(data, folder / f"{stem}.json")
    return paths


@dataclass
class TrainingSample:
    """What `sample_during_training` made for one prompt (`error` set instead when it failed)."""

    index: int
    request: SampleRequest
    paths: dict = field(default_factory=dict)
    contact_sheet: np.ndarray | None = None  # uint8 [H, W, 3], for TensorBoard `add_image(..., dataformats="HWC")`
    error: str | None = None


def sample_during_training(models: SamplingModels, requests: list[SampleRequest], output_dir: str | Path, *,
                           step: int, epoch: int | None = None, output_name: str | None = None,
                           sampler: str = "unipc", extra: dict | None = None) -> list[TrainingSample]:
    """Render every request with the models as they are now (both experts with their current LoRAs) into
    OUTPUT_DIR/sample/. The global random state and the train / eval modes are left as they were; a prompt
    that fails is logged and reported, the others still render."""
    folder = Path(output_dir) / "sample"
    prefix = f"{output_name}_" if output_name else ""
    results = []
    for index, request in enumerate(requests):
        stem = f"{prefix}step{step:08d}_{index:02d}"
        try:
            sample = generate(models, request, sampler=sampler)
            info = {"training": {"step": step, "epoch": epoch}, **(extra or {})}
            paths = save_sample(sample, folder, stem, extra=info)
            sheet = contact_sheet([(f"step {step}: {request.prompt}", to_frames(sample.video))])
            results.append(TrainingSample(index, request, paths, sheet))
        except (ValueError, OSError) as exc:  # a bad prompt or image must not stop training
            logger.error("sample %d at step %d failed: %s", index, step, exc)
            results.append(TrainingSample(index, request, error=str(exc)))
    return results

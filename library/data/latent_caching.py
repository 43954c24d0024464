"""Caching VAE latents: every item of every dataset, one safetensors file each, resumable.

`cache_latents(config, vae_path, ...)` is what `tools/cache_latents.py` runs; `run_latent_caching`
takes an already-loaded VAE (tests and scripts). Fresh caches are reused, stale ones rebuilt; a file
that cannot be used is skipped with its reason and everything else is still cached (`strict=True`
turns the first skip into a failure). WAN 2.1 I2V tasks also need the CLIP vision encoder (`clip_path`
/ `clip`): each item's first frame is encoded into `clip_fea` [257, width], and the CLIP file's
fingerprint is recorded so that a changed CLIP file marks the cache stale. With several processes,
process `rank` takes the items with index % world_size == rank. Media decoding runs in `num_workers`
threads ahead of the VAE.
"""

from __future__ import annotations

import logging
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from library.errors import UserError

from . import cache, one_frame
from .conditions import load_conditions
from .fun_reference import REFERENCE_KEY, encode_reference, reference_file
from .control import CONTROL_KEY, control_cache_problem, control_metadata, load_control_pixels, require_controls
from .dataset_config import DatasetConfig, DatasetSpec
from .datasets import TaskInfo, latent_settings, task_info
from .items import MediaItem, Skip, enumerate_dataset
from .video_io import MediaError, load_image, read_video_frames, resize_and_crop

logger = logging.getLogger(__name__)


UNKNOWN_TASK = "<TASK>"  # caching without --task


class CachingError(UserError, RuntimeError):
    """Caching stopped: a skip under `strict`, or a setting that cannot work."""


_NEEDS_CLIP = ("task {task} (WAN 2.1 I2V) also caches the CLIP image tokens of each item's first frame: pass the "
               "CLIP vision file with --clip (models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth or "
               "clip_vision_h.safetensors)")


@dataclass
class CacheSummary:
    """What a caching run did; `report()` is the text printed at the end."""

    what: str
    cached: int = 0
    reused: int = 0
    skipped: list[Skip] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    corrupt: list[str] = field(default_factory=list)  # "PATH: reason" of cache files found corrupt (rebuilt)
    unverified: int = 0  # cache files from before content checksums (rebuilt once)

    @property
    def ok(self) -> bool:
        return not self.errors

    def note_rebuild(self, path: Path, problem: str) -> None:
        """Record why an existing cache file is rebuilt: corrupt files are listed in the report, files from
        before checksums counted, stale ones (settings or source changed) only logged."""
        if problem.startswith(("corrupt", "unreadable")):
            self.corrupt.append(f"{path}: {problem}")
        elif problem == cache.UNVERIFIED:
            self.unverified += 1
        else:
            logger.info("rebuilding %s: %s", path.name, problem)

    def report(self) -> str:
        lines = [f"{self.what}: {self.cached} cached, {self.reused} reused (fresh), {len(self.skipped)} skipped"]
        lines += [f"  skipped {skip}" for skip in self.skipped]
        lines += [f"  rebuilt {corrupt}" for corrupt in self.corrupt]
        if self.unverified:
            lines.append(f"  rebuilt {self.unverified} cache file(s) {cache.UNVERIFIED} (once, so that they can be "
                         "verified from now on)")
        lines += [f"  ERROR {error}" for error in self.errors]
        return "\n".join(lines)


def split_for_rank(entries: list, rank: int, world_size: int) -> list:
    """This process's share: entries i with i % world_size == rank."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside world size {world_size}")
    return [entry for i, entry in enumerate(entries) if i % world_size == rank]


def scan_datasets(config: DatasetConfig, summary: CacheSummary, strict: bool, scan):
    """Yield (spec, found) for every dataset (training and validation) where `scan(spec)` returns
    (found, skips): skips and empty datasets are recorded in `summary`, a missing source folder or JSONL
    is an error there, and `strict` turns the first skip into a failure. Shared by both caching tools."""
    for spec in config.all:
        try:
            found, skips = scan(spec)
        except MediaError as exc:  # the dataset's directory or JSONL file is missing
            summary.errors.append(str(exc))
            continue
        summary.skipped.extend(skips)
        if strict and skips:
            raise CachingError(f"--strict: {spec.where()}: skipped {skips[0]}")
        if not found:
            summary.errors.append(f"{spec.where()}: no usable item (see the skips above)")
        yield spec, found


def collect_items(config: DatasetConfig, info: TaskInfo, summary: CacheSummary,
                  strict: bool) -> list[tuple[DatasetSpec, MediaItem]]:
    """Every item of every dataset (training and validation), skips and empty datasets recorded."""
    def scan(spec):
        items, skips = enumerate_dataset(spec, info.step, info.fps)
        if info.needs_control:  # Fun-Control: every dataset names its control videos
            require_controls(spec, items, info.task)
        return items, skips

    return [(spec, item) for spec, items in scan_datasets(config, summary, strict, scan) for item in items]


def load_pixels(item: MediaItem) -> torch.Tensor:
    """Decode, resize and centre-crop one item -> [3, F, H, W] float32 in [-1, 1]."""
    width, height, _ = item.bucket
    if item.is_image:
        frames = resize_and_crop(load_image(item.media_path), (width, height))[None]
    else:
        frames = read_video_frames(item.media_path, list(item.frames), (width, height))
    if frames.shape[0] != item.bucket[2]:
        raise MediaError(f"{item.media_path}: decoded {frames.shape[0]} frames, expected {item.bucket[2]}")
    video = torch.from_numpy(np.ascontiguousarray(frames)).permute(3, 0, 1, 2)  # [3, F, H, W] uint8
    return video.float().div_(127.5).sub_(1.0)


def wants_control(info: TaskInfo, item: MediaItem) -> bool:
    """Whether the item's control latents are cached: for Fun-Control tasks, and (as musubi-tuner does)
    whenever the dataset names controls and no --task says otherwise."""
    return item.control_path is not None and (info.needs_control or info.task == UNKNOWN_TASK)


def _decode(item: MediaItem, spec: DatasetSpec | None = None, control: bool = False):
    """(pixels, VACE conditioning pixels or None, Fun-Control pixels or None) of one item, or the exception
    that makes it a skip (one-frame items: their target and control images as the pixels)."""
    try:
        if spec is not None and one_frame.is_one_frame(spec):
            return one_frame.load_frames(spec, item), None, None
        return (load_pixels(item), load_conditions(item) if item.conditions else None,
                load_control_pixels(item) if control else None)
    except (MediaError, OSError) as exc:
        return exc


def _batches(todo: list[tuple[DatasetSpec, MediaItem]], batch_size: int):
    """Consecutive runs of at most batch_size entries of one bucket (todo is sorted by bucket)."""
    batch = []
    for entry in todo:
        if batch and (len(batch) == batch_size or batch[-1][1].bucket != entry[1].bucket):
            yield batch
            batch = []
        batch.append(entry)
    if batch:
        yield batch


@torch.no_grad()
def encode_batch(vae, videos: torch.Tensor, is_i2v: bool,
                 end_frame: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """[B, 3, F, H, W] -> latents [B, z, T, h, w] and, for I2V, the latents of (first frame, zeros) (FLF2V:
    (first frame, zeros, last frame))."""
    latents = vae.encode(videos)
    if not is_i2v:
        return latents, None
    condition = torch.zeros_like(videos)
    condition[:, :, :1] = videos[:, :, :1]  # the official I2V conditioning video: frame 0, then black
    if end_frame:
        condition[:, :, -1:] = videos[:, :, -1:]  # FLF2V: ... and the last frame
    return latents, vae.encode(condition)


def encode_clip(clip, videos: torch.Tensor, end_frame: bool) -> torch.Tensor:
    """CLIP tokens of the first frames [B, 257, width], or for FLF2V of the first and last [B, 2, 257, width]."""
    if not end_frame:
        return clip.encode(videos[:, :, 0])
    b = videos.shape[0]
    pair = clip.encode(torch.cat([videos[:, :, 0], videos[:, :, -1]]))  # [2B, 257, width]
    return torch.stack([pair[:b], pair[b:]], dim=1)


def _write_item(spec: DatasetSpec, item: MediaItem, latents, image_latents, info: TaskInfo, vae_hash: str,
                clip_fea=None, clip_hash: str | None = None, extra: dict | None = None, control_latents=None,
                vae=None) -> None:
    tensors = {"latents": latents.to(cache.STORE_DTYPE), **(extra or {})}  # one-frame masks / VACE context
    if image_latents is not None:
        tensors["image_latents"] = image_latents.to(cache.STORE_DTYPE)
    if clip_fea is not None:
        tensors["clip_fea"] = clip_fea.to(cache.STORE_DTYPE)  # [257, width] (FLF2V: [2, 257, width])
    settings = latent_settings(item, info.vae_kind, info.end_frame, spec, vace=info.is_vace,
                               fun_reference=info.needs_control)
    meta = cache.latent_metadata(item, settings, vae_hash,
                                 cache.source_fingerprint(item.media_path), clip_hash)
    if control_latents is not None:  # Fun-Control: [z, T, h, w] of the item's control video
        tensors[CONTROL_KEY] = control_latents.to(cache.STORE_DTYPE)
        meta.update(control_metadata(item))
        if info.needs_control and reference_file(item) is not None:  # `ref_conv`: the reference latent [z, h, w]
            width, height, _ = item.bucket
            tensors[REFERENCE_KEY] = encode_reference(vae, reference_file(item), width, height).to(cache.STORE_DTYPE)
    path = cache.latent_cache_path(spec.cache_directory, item.key, info.vae_kind)
    cache.write_safetensors_atomic(tensors, path, meta)


def _encode_and_write(good: list, vae, clip, info: TaskInfo, hashes: tuple[str, str | None],
                      summary: CacheSummary) -> None:
    """Encode decoded items of one bucket together and write one cache file each."""
    single = [g for g in good if one_frame.is_one_frame(g[0])]
    for spec, item, (frames, _, _) in single:  # one-frame items: each image encoded on its own
        tensors = one_frame.encode(vae, clip, frames, spec)
        _write_item(spec, item, tensors.pop("latents"), tensors.pop("image_latents"), info, hashes[0],
                    tensors.pop("clip_fea", None), hashes[1], extra=tensors)
        summary.cached += 1
    good = [g for g in good if not one_frame.is_one_frame(g[0])]
    if not good:
        return
    device, dtype = next(vae.parameters()).device, next(vae.parameters()).dtype
    pairs = [j for j, g in enumerate(good) if g[2][2] is not None]  # items cached with their Fun-Control
    control: list = [None] * len(good)
    if pairs:
        encoded = vae.encode(torch.stack([good[j][2][2] for j in pairs]).to(device=device, dtype=dtype))
        for k, j in enumerate(pairs):
            control[j] = encoded[k]  # [z, T, h, w]
    videos = torch.stack([g[2][0] for g in good]).to(device=device, dtype=dtype)  # [B, 3, F, H, W]
    latents, image_latents = encode_batch(vae, videos, info.is_i2v, info.end_frame)
    clip_fea = encode_clip(clip, videos, info.end_frame) if clip is not None else None  # [B, (2,) 257, width]
    for j, (spec, item, (_, conditions, _)) in enumerate(good):
        extra = {k: v.to(cache.STORE_DTYPE) for k, v in vace_tensors(vae, conditions, videos.shape[2:]).items()} \
            if info.is_vace else None  # VACE context, references
        _write_item(spec, item, latents[j], None if image_latents is None else image_latents[j], info, hashes[0],
                    None if clip_fea is None else clip_fea[j], hashes[1], extra, control[j], vae)
        summary.cached += 1


@torch.no_grad()
def vace_tensors(vae, inputs: dict | None, shape) -> dict[str, torch.Tensor]:
    """VACE tasks: an item's `vace_context` [96, R + T, h, w] (and `reference_latents` [16, R, h, w]) from its
    control video, mask and reference image (`conditions.load_conditions`; absent ones take the defaults of
    `library.wan.vace_context`)."""
    from library.wan.vace_context import vace_context

    device, dtype = next(vae.parameters()).device, next(vae.parameters()).dtype
    inputs = inputs or {"control": None, "mask": None, "references": []}
    context, refs = vace_context(vae.encode, inputs["control"], inputs["mask"], inputs["references"],
                                 frames=shape[0], size=tuple(shape[1:]), dtype=dtype, device=device)
    return {"vace_context": context} | ({} if refs is None else {"reference_latents": refs})


def _find_todo(entries, info: TaskInfo, vae_hash: str, summary: CacheSummary, clip_hash: str | None = None):
    todo = []
    for spec, item in entries:
        path = cache.latent_cache_path(spec.cache_directory, item.key, info.vae_kind)
        settings = latent_settings(item, info.vae_kind, info.end_frame, spec, vace=info.is_vace,
                               fun_reference=info.needs_control)
        problem = cache.latent_cache_problem(path, item, settings,
                                             need_image_latents=info.is_i2v, vae_hash=vae_hash,
                                             need_clip_fea=info.needs_clip, clip_hash=clip_hash,
                                             verify_content=True)
        if problem is None and wants_control(info, item):
            problem = control_cache_problem(path, item)
        if problem is None:
            summary.reused += 1
            continue
        if problem != "missing":
            summary.note_rebuild(path, problem)
        todo.append((spec, item))
    return sorted(todo, key=lambda e: e[1].bucket)


def run_latent_caching(config: DatasetConfig, vae, vae_hash: str, info: TaskInfo, *, batch_size: int = 1,
                       num_workers: int = 2, strict: bool = False, rank: int = 0, world_size: int = 1,
                       progress: bool = True, clip=None, clip_hash: str | None = None) -> CacheSummary:
    """Cache the latents of this process's share of all items with a loaded VAE (and, for WAN 2.1 I2V,
    a loaded CLIP vision encoder `clip` with its file fingerprint `clip_hash`)."""
    from tqdm import tqdm

    if info.needs_clip and clip is None:
        raise CachingError(_NEEDS_CLIP.format(task=info.task))
    problems = one_frame.task_problems(config.all, info.task, info.needs_clip, info.end_frame)
    if problems:
        raise CachingError("; ".join(problems))
    summary = CacheSummary("latents")
    if not info.is_vace:
        for spec in config.all:
            keys = [k for k in ("mask_directory", "reference_directory") if getattr(spec, k) is not None
                    and not (k == "reference_directory" and info.needs_control)]  # Fun-Control: `ref_conv`
            if keys:
                logger.warning("%s: %s are VACE inputs, not used for task %s (cache with --task vace-1.3B, vace-14B "
                               "or vace-A14B)", spec.where(), " and ".join(keys), info.task)
    entries = split_for_rank(collect_items(config, info, summary, strict), rank, world_size)
    todo = _find_todo(entries, info, vae_hash, summary, clip_hash if info.needs_clip else None)
    failed: dict[Path, dict] = {spec.cache_directory: {} for spec in config.all}
    clip = clip if info.needs_clip else None
    with ThreadPoolExecutor(max(1, num_workers)) as pool, \
            tqdm(total=len(todo), desc=f"latents (rank {rank})", disable=not progress) as bar:
        pending = deque()
        queue = iter(todo)
        for batch in _batches(todo, batch_size):
            while len(pending) < len(batch) + 2 * max(1, num_workers):
                entry = next(queue, None)
                if entry is None:
                    break
                pending.append(pool.submit(_decode, entry[1], entry[0], wants_control(info, entry[1])))
            decoded = [pending.popleft().result() for _ in batch]
            good = []
            for (spec, item), pixels in zip(batch, decoded):
                if isinstance(pixels, Exception):
                    reason = str(pixels).removeprefix(f"{item.media_path}: ")
                    skip = Skip(str(item.media_path), reason, spec.where(), item.key)
                    if strict:
                        raise CachingError(f"--strict: {spec.where()}: skipped {skip}")
                    summary.skipped.append(skip)
                    failed[spec.cache_directory][item.key] = {
                        "source": str(item.media_path), "reason": reason,
                        "fingerprint": cache.source_fingerprint(item.media_path)}
                else:
                    good.append((spec, item, pixels))
            if good:
                _encode_and_write(good, vae, clip, info, (vae_hash, clip_hash), summary)
            bar.update(len(batch))
    _write_skip_lists(failed, info, rank)
    return summary


def _write_skip_lists(failed: dict[Path, dict], info: TaskInfo, rank: int) -> None:
    for cache_dir, entries in failed.items():
        path = cache.skip_list_path(cache_dir, info.vae_kind, rank)
        if entries or path.exists():
            cache.write_json_atomic(entries, path)


def resolve_task(vae_kind: str, task: str | None, i2v: bool, clip: bool = False) -> TaskInfo:
    """TaskInfo from --task, or from the VAE kind (2.1: 16 fps, 2.2: 24 fps), --i2v and --clip (a CLIP file
    without a task means WAN 2.1 I2V, the only model that uses one)."""
    if task is None:
        if clip and vae_kind != "2.1":
            raise CachingError("--clip is only for WAN 2.1 I2V, which uses the WAN 2.1 VAE; this VAE is WAN 2.2")
        return TaskInfo(task=UNKNOWN_TASK, vae_kind=vae_kind, fps=16.0 if vae_kind == "2.1" else 24.0,
                        is_i2v=i2v or clip, needs_clip=clip)
    try:
        info = task_info(task)
    except ValueError as exc:  # an unknown task name
        raise CachingError(f"--task: {exc}") from None
    if info.vae_kind != vae_kind:
        raise CachingError(f"task {task} uses the WAN {info.vae_kind} VAE but the VAE file is a WAN {vae_kind} "
                           "VAE; pass the matching VAE")
    if i2v and not info.is_i2v:
        raise CachingError(f"--i2v was given but task {task} is not an I2V task")
    return info


def cache_latents(config: DatasetConfig, vae_path: str | Path, *, task: str | None = None, i2v: bool = False,
                  device: str = "cpu", vae_dtype: torch.dtype = torch.float32, clip_path: str | Path | None = None,
                  clip_dtype: torch.dtype | None = None, vae_cache_cpu: bool = False, vae_tile_size: int | None = None,
                  **kwargs) -> CacheSummary:
    """Load the VAE (and the CLIP vision encoder for WAN 2.1 I2V), work out the task settings, and cache
    every item's latents. `clip_dtype` defaults to float16 on CUDA (as WAN runs it), float32 elsewhere.
    `vae_tile_size` (pixels): frames larger than a tile are encoded tile by tile (`--vae_tiling`)."""
    from library.wan.loading import load_clip_vision, load_vae

    vae = load_vae(vae_path, device=device, dtype=vae_dtype, cache_cpu=vae_cache_cpu)
    vae.tile_sample_min_size = vae_tile_size
    info = resolve_task("2.1" if vae.spatial_stride == 8 else "2.2", task, i2v, clip=clip_path is not None)
    if info.needs_clip and clip_path is None:
        raise CachingError(_NEEDS_CLIP.format(task=info.task))
    clip = clip_hash = None
    if clip_path is not None and not info.needs_clip:
        logger.warning("--clip is only used by WAN 2.1 I2V (i2v-14B); ignored for %s", info.task)
    elif clip_path is not None:
        dtype = clip_dtype or (torch.float16 if str(device).startswith("cuda") else torch.float32)
        clip = load_clip_vision(clip_path, device=device, dtype=dtype)
        clip_hash = cache.weights_fingerprint(Path(clip_path))
    return run_latent_caching(config, vae, cache.file_head_sha256(Path(vae_path)), info, clip=clip,
                              clip_hash=clip_hash, **kwargs)

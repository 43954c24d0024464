"""Training-side datasets: read caches only, check them, and serve bucket-pure batches.

    datasets = build_train_datasets(load_dataset_config(path), task)   # one CachedDataset per dataset
    for ds in datasets: ds.check_caches()                              # clear error + command to run
    loader = batch_loader(datasets, seed, epoch, num_workers=2)         # or make_batches + collate

`make_batches` groups item indices by (W, H, F) bucket per dataset, applies `num_repeats`, and shuffles
deterministically from (seed, epoch); `collate` stacks one batch. Caption dropout is decided per
(seed, epoch, item key), so a run and its resume see the same empty captions; build a new loader (or
call `set_epoch`) each epoch. Conditioning: I2V tasks get `image_latents` (the VAE latents of the
first frame followed by black frames, as the official I2V sampler builds them); WAN 2.1 I2V also gets
`clip_fea` (the CLIP vision tokens of the first frame); TI2V needs no extra tensor because its
first-frame latent is `latents[:, :, :1]` (the VAE is causal).
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import torch

from library.errors import UserError

from . import cache
from .buckets import bucket_step
from .conditions import condition_fingerprint
from .fun_reference import REFERENCE_KEY, reference_settings
from .control import CONTROL_KEY, control_cache_problem, require_controls
from .dataset_config import DatasetConfig, DatasetSpec
from .items import MediaItem, Skip, enumerate_dataset
from .video_io import MediaError

logger = logging.getLogger(__name__)


class CacheError(UserError, RuntimeError):
    """Caches missing, stale or corrupt for training; the message lists them and the command that fixes them."""

    def __init__(self, message: str = "") -> None:
        # Raised in a DataLoader worker, it is rebuilt in the main process from "Caught CacheError in DataLoader
        # worker process N.\nOriginal Traceback (...)\n...\nlibrary.data.datasets.CacheError: MESSAGE": the
        # user gets MESSAGE, not a traceback of ours
        if message.startswith("Caught CacheError") and "CacheError: " in message:
            message = message.partition("CacheError: ")[2]
        super().__init__(message)


class DatasetError(UserError, ValueError):
    """A dataset that cannot be trained on (for example no usable item)."""


@dataclass(frozen=True)
class TaskInfo:
    """What the data pipeline needs from a WAN task: VAE kind, bucket step, fps, I2V conditioning."""

    task: str
    vae_kind: str
    fps: float
    is_i2v: bool
    needs_clip: bool = False  # WAN 2.1 I2V: CLIP image tokens of the first frame (`clip_fea`)
    end_frame: bool = False  # WAN 2.1 FLF2V: the last frame conditions too (image latents and clip_fea)
    is_vace: bool = False  # VACE: the VACE context (`vace_context`) and reference latents, see conditions.py
    needs_control: bool = False  # Fun-Control: latents of each item's control video (`control_latents`)

    @property
    def step(self) -> int:
        return bucket_step(self.vae_kind)


def task_info(task: str) -> TaskInfo:
    from library.wan.variants import get_variant

    variant = get_variant(task)
    return TaskInfo(task=variant.name, vae_kind=variant.vae, fps=float(variant.fps), is_i2v=variant.is_i2v,
                    needs_clip=variant.image_embedding and variant.is_i2v,  # t2v Fun-Control: zero CLIP tokens
                    end_frame=variant.end_frame, is_vace=variant.is_vace, needs_control=variant.control)


def latent_settings(item: MediaItem, vae_kind: str, end_frame: bool = False, spec=None, *,
                    vace: bool = False, fun_reference: bool = False) -> dict:
    """Everything that decides an item's latents besides the source file and the VAE weights (FLF2V caches
    are marked: their image latents and CLIP tokens also hold the last frame; one-frame caches hold their
    indices and control files; VACE caches their conditioning files)."""
    from .one_frame import is_one_frame, settings as one_frame_settings

    settings = {"vae_kind": vae_kind, "bucket": list(item.bucket), "frames": list(item.frames), "fps": item.fps}
    if spec is not None and is_one_frame(spec):
        settings["one_frame"] = one_frame_settings(spec, item.media_path)
    if vace:
        settings["vace"] = condition_fingerprint(item)
    if fun_reference:  # Fun-Control: the reference image of `ref_conv` (fun_reference.py)
        settings |= reference_settings(item)
    return settings | ({"conditioning": "first_last_frame"} if end_frame else {})


def read_skip_lists(cache_dir: Path, vae_kind: str) -> dict[str, dict]:
    """Items the latent cacher skipped (all ranks): {item key: {source, reason, fingerprint}}."""
    merged: dict[str, dict] = {}
    for path in sorted(Path(cache_dir).glob(f"skipped_{cache.vae_tag(vae_kind)}_r*.json")):
        try:
            entries = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            entries = None
        if not (isinstance(entries, dict) and all(isinstance(e, dict) for e in entries.values())):
            logger.warning("ignoring unreadable skip list %s (the latent cacher rewrites it)", path)
            continue
        merged.update(entries)
    return merged


def cache_commands(config_path: Path, task: str, needs_clip: bool = False) -> str:
    clip = " --clip <CLIP>" if needs_clip else ""
    return (f"python tools/cache_latents.py --dataset_config {config_path} --vae <VAE> --task {task}{clip}\n"
            f"python tools/cache_text_encoder_outputs.py --dataset_config {config_path} --t5 <T5>")


class CachedDataset(torch.utils.data.Dataset):
    """The items of one dataset, served from the latent and text caches (never from media)."""

    def __init__(self, spec: DatasetSpec, info: TaskInfo, seed: int = 0):
        self.spec, self.info, self.seed, self.epoch = spec, info, seed, 0
        self._memo = cache.TensorMemo()  # small datasets are read from disk once
        self.batch_size, self.num_repeats = spec.batch_size, spec.num_repeats
        self.caption_dropout_rate = spec.caption_dropout_rate
        try:
            items, self.skips = enumerate_dataset(spec, info.step, info.fps)
        except MediaError as exc:
            raise DatasetError(str(exc)) from None
        if info.needs_control:
            require_controls(spec, items, info.task)
        self.items = self._drop_known_skips(items)
        for skip in self.skips:
            logger.warning("%s: skipped %s", spec.where(), skip)
        if not self.items:
            raise DatasetError(f"{spec.where()}: no usable item ({len(self.skips)} skipped); "
                               "see the warnings above for each file and reason")

    def _drop_known_skips(self, items: list[MediaItem]) -> list[MediaItem]:
        """Items the cacher already reported as unusable (source unchanged since) are left out."""
        known = read_skip_lists(self.spec.cache_directory, self.info.vae_kind)
        kept = []
        for item in items:
            entry = known.get(item.key)
            fingerprint = entry.get("fingerprint") if entry else None
            if isinstance(fingerprint, dict) and cache.source_matches(fingerprint, item.media_path) and not \
                    cache.latent_cache_path(self.spec.cache_directory, item.key, self.info.vae_kind).exists():
                self.skips.append(Skip(str(item.media_path), str(entry.get("reason", "skipped when caching")),
                                       self.spec.where(), item.key))
                continue
            kept.append(item)
        return kept

    def __len__(self) -> int:
        return len(self.items)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def latent_path(self, item: MediaItem) -> Path:
        return cache.latent_cache_path(self.spec.cache_directory, item.key, self.info.vae_kind)

    def captions_needed(self) -> list[str]:
        captions = sorted({item.caption for item in self.items})
        return captions + [""] if self.caption_dropout_rate > 0 else captions

    def cache_problems(self) -> list[str]:
        """Every missing or stale cache of this dataset ("latents PATH: why" / "text PATH ...: why")."""
        problems, vae_hashes, clip_hashes, encoders = [], set(), set(), set()
        for item in self.items:
            path = self.latent_path(item)
            settings = latent_settings(item, self.info.vae_kind, self.info.end_frame, self.spec,
                                       vace=self.info.is_vace, fun_reference=self.info.needs_control)
            problem = cache.latent_cache_problem(path, item, settings,
                                                 need_image_latents=self.info.is_i2v,
                                                 need_clip_fea=self.info.needs_clip)
            if problem is None and self.info.needs_control:
                problem = control_cache_problem(path, item)
            if problem:
                problems.append(f"latents {path}: {problem}")
            else:
                meta = cache.read_metadata(path)
                vae_hashes.add(meta.get("vae_sha256_1mb"))
                clip_hashes.add(meta.get("clip_sha256_1mb"))
        for caption in self.captions_needed():
            path = cache.text_cache_path(self.spec.cache_directory, caption)
            problem = cache.text_cache_problem(path, caption)
            if problem:
                problems.append(f"text {path} (caption {caption[:40]!r}): {problem}")
            else:
                encoders.add(cache.read_metadata(path).get("encoder_fingerprint"))
        if len(vae_hashes) > 1:
            problems.append(f"latents in {self.spec.cache_directory} come from {len(vae_hashes)} different VAE files")
        if self.info.needs_clip and len(clip_hashes) > 1:
            problems.append(f"clip_fea in {self.spec.cache_directory} come from {len(clip_hashes)} different "
                            "CLIP files")
        if len(encoders) > 1:
            problems.append(f"text caches in {self.spec.cache_directory} come from {len(encoders)} different encoders")
        return problems

    def check_caches(self) -> None:
        """Raise CacheError naming every missing or stale cache, and the commands that rebuild them."""
        problems = self.cache_problems()
        if problems:
            more = f"\n  ... and {len(problems) - 10} more" if len(problems) > 10 else ""
            shown = "\n  ".join(problems[:10]) + more
            raise CacheError(f"{self.spec.where()}: {len(problems)} cache problem(s):\n  {shown}\n"
                             f"Run:\n{cache_commands(self.spec.config_path, self.info.task, self.info.needs_clip)}")

    def drop_caption(self, item: MediaItem, epoch: int) -> bool:
        """Deterministic per (seed, epoch, item) caption dropout."""
        if self.caption_dropout_rate <= 0:
            return False
        digest = hashlib.sha256(f"{self.seed}:{epoch}:{item.key}".encode()).digest()
        return int.from_bytes(digest[:8], "little") / 2**64 < self.caption_dropout_rate

    def _load(self, path: Path) -> dict[str, torch.Tensor]:
        """A cache file's tensors, verified at its first read; a corrupt one is a CacheError naming it and the
        commands that rebuild it (they rebuild only what is stale or corrupt)."""
        try:
            return self._memo.load(path)
        except cache.CacheCorruptError as exc:
            raise CacheError(f"{self.spec.where()}: {exc}. Nothing was trained on it; rebuild it (the caching tools "
                             f"rebuild only what is stale or corrupt):\n"
                             f"{cache_commands(self.spec.config_path, self.info.task, self.info.needs_clip)}") from None

    def get(self, index: int, epoch: int) -> dict:
        item = self.items[index]
        tensors = self._load(self.latent_path(item))
        caption = "" if self.drop_caption(item, epoch) else item.caption
        context = self._load(cache.text_cache_path(self.spec.cache_directory, caption))["t5"]
        latents = tensors["latents"]  # [z, T, h, w] bf16 as stored
        if self.info.is_vace and "reference_latents" in tensors:  # VACE: reference frames lead the clip
            latents = torch.cat([tensors["reference_latents"], latents], dim=1)
        return {
            "latents": latents,
            "vace_context": tensors.get("vace_context") if self.info.is_vace else None,  # [96, R + T, h, w]
            "image_latents": tensors.get("image_latents") if self.info.is_i2v else None,
            "clip_fea": tensors.get("clip_fea") if self.info.needs_clip else None,  # [257, width] or None
            "frame_mask": tensors.get("frame_mask"), "frame_positions": tensors.get("frame_positions"),  # one-frame
            "control_latents": tensors.get(CONTROL_KEY) if self.info.needs_control else None,  # [z, T, h, w]
            "fun_reference": tensors.get(REFERENCE_KEY) if self.info.needs_control else None,  # [z, h, w]
            "context": context,  # [L, d]
            "key": item.key, "caption": caption, "is_image": item.is_image, "bucket": item.bucket,
        }

    def __getitem__(self, index: int) -> dict:
        return self.get(index, self.epoch)


def build_train_datasets(dataset_config: DatasetConfig, task: str, *, validation: bool = False,
                         seed: int = 0) -> list[CachedDataset]:
    """One CachedDataset per training dataset (or per validation dataset with `validation=True`)."""
    info = task_info(task)
    specs = dataset_config.validation if validation else dataset_config.train
    return [CachedDataset(spec, info, seed=seed) for spec in specs]


def make_batches(datasets, seed: int, epoch: int) -> list[list[tuple[int, int]]]:
    """Bucket-pure batches of (dataset index, item index), num_repeats applied, shuffled by seed+epoch."""
    rng = random.Random(f"wan-batches:{seed}:{epoch}")
    batches = []
    for d, dataset in enumerate(datasets):
        groups: dict[tuple, list[int]] = defaultdict(list)
        for i, item in enumerate(dataset.items):
            groups[item.bucket].extend([i] * dataset.num_repeats)
        for bucket in sorted(groups):
            indices = groups[bucket]
            rng.shuffle(indices)
            size = dataset.batch_size
            batches.extend([[(d, i) for i in indices[s:s + size]] for s in range(0, len(indices), size)])
    rng.shuffle(batches)
    return batches


def collate(items: list[dict]) -> dict:
    """Stack one bucket-pure batch: latents [B, z, T, h, w] float32, contexts kept at their lengths;
    image_latents / clip_fea [B, 257, width] are None unless every item has them."""
    buckets = {tuple(item["bucket"]) for item in items}
    if len(buckets) != 1:
        raise ValueError(f"a batch must hold one bucket, got {sorted(buckets)}")
    image = [item["image_latents"] for item in items]
    clip = [item.get("clip_fea") for item in items]
    vace = [item.get("vace_context") for item in items]
    control = [item.get("control_latents") for item in items]
    reference = [item.get("fun_reference") for item in items]
    return {
        "latents": torch.stack([item["latents"] for item in items]).float(),  # [B, z, T, h, w]
        "image_latents": None if any(x is None for x in image) else torch.stack(image).float(),
        "clip_fea": None if any(x is None for x in clip) else torch.stack(clip).float(),  # [B, 257, width]
        **{k: torch.stack([item[k] for item in items]) for k in ("frame_mask", "frame_positions")
           if all(item.get(k) is not None for item in items)},  # one-frame: [B, T] each
        "vace_context": None if any(x is None for x in vace) else torch.stack(vace).float(),  # [B, 96, T', h, w]
        "control_latents": None if any(x is None for x in control) else torch.stack(control).float(),
        "fun_reference": None if any(x is None for x in reference) else torch.stack(reference).float(),  # [B, z, h, w]
        "context": [item["context"].float() for item in items],  # B x [L_i, d]
        "keys": [item["key"] for item in items],
        "captions": [item["caption"] for item in items],
        "is_image": [item["is_image"] for item in items],
        "bucket": buckets.pop(),
    }


class CollatedBatches(torch.utils.data.Dataset):
    """Batch b of `batches` (lists of (dataset, item) pairs), read and collated: the one batch view of the
    training loop and `batch_loader`, in-process or in DataLoader workers (batch_size=None)."""

    def __init__(self, datasets, batches: list[list[tuple[int, int]]], epoch: int):
        self.datasets, self.batches, self.epoch = datasets, batches, epoch

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, b: int) -> dict:
        return collate([self.datasets[d].get(i, self.epoch) for d, i in self.batches[b]])


def batch_loader(datasets, seed: int, epoch: int, num_workers: int = 0, **kwargs) -> torch.utils.data.DataLoader:
    """A DataLoader yielding collated batches for one epoch (workers read caches in parallel)."""
    view = CollatedBatches(datasets, make_batches(datasets, seed, epoch), epoch)
    return torch.utils.data.DataLoader(view, batch_size=None, shuffle=False, num_workers=num_workers, **kwargs)

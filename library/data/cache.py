"""Cache files: names, fingerprints, atomic safetensors / JSON writes and staleness checks.

Layout inside a dataset's `cache_directory`:
  `{item_key}_{wan21|wan22}.safetensors`   latents [z, T, h, w] bf16 (+ image_latents for I2V tasks,
                                            + clip_fea [257, width] for WAN 2.1 I2V)
  `t5/{caption_hash}_t5.safetensors`        t5 [L, d] bf16 at the true token length
  `skipped_{wan21|wan22}_r{rank}.json`      items the latent cacher skipped, with reasons
Every safetensors file carries string metadata (see `latent_metadata` / `text_metadata`) that records
the fingerprints of its source and settings; a cache whose fingerprints do not match the current
source and config is stale and is rebuilt (caching) or refused (training), never silently used.

Every file also records a CRC-32 of its tensors (`content_crc32`, written by `write_safetensors_atomic`),
checked when the file is first read (`load_verified`): corrupt or overwritten data is rebuilt by the
caching tools and named with the command to rebuild it in training, never trained on. Files from before
the checksum are read unverified but must look like a model's output (finite, not all zero, |x| < 1e4),
and the caching tools rebuild them once.
"""

from __future__ import annotations

import errno
import functools
import hashlib
import json
import logging
import os
import tempfile
import zlib
from pathlib import Path

import torch

from library.errors import UserError

logger = logging.getLogger(__name__)

LATENT_FORMAT = "wan-trainer-latents/1"
TEXT_FORMAT = "wan-trainer-t5/1"
STORE_DTYPE = torch.bfloat16  # halves disk and read time; training upcasts to float32 in `collate`
HEAD_BYTES = 1 << 20
CHECKSUM_KEY = "content_crc32"  # CRC-32 of the tensors: names, dtypes, shapes and bytes, in name order
PLAUSIBLE_MAX = 1e4  # no VAE latent, CLIP token or umT5 output comes near this; random bytes do at once
UNVERIFIED = "written before cache files had content checksums"


class NonFiniteOutputError(UserError, ValueError):
    """An encoder gave NaN or infinity for an item (a float16 overflow, a damaged model): nothing is cached."""


class CacheCorruptError(RuntimeError):
    """A cache file whose content does not match its checksum (or, without one, cannot be model output)."""


def vae_tag(vae_kind: str) -> str:
    return {"2.1": "wan21", "2.2": "wan22"}[vae_kind]


def latent_cache_path(cache_dir: Path, item_key: str, vae_kind: str) -> Path:
    return Path(cache_dir) / f"{item_key}_{vae_tag(vae_kind)}.safetensors"


def clean_caption(caption: str) -> str:
    """The text the encoder really sees (the official WAN prompt cleaning)."""
    from library.wan.prompt_text import clean_prompt  # not text_encoder: no transformers import

    return clean_prompt(caption)


@functools.lru_cache(maxsize=1 << 16)
def caption_hash(caption: str) -> str:
    """Hash of the cleaned caption: the text-cache file name, shared by identical captions. Memoised:
    the training loader asks for it once per item per epoch, and the cleaning (ftfy) is not free."""
    return hashlib.sha256(clean_caption(caption).encode("utf-8")).hexdigest()[:32]


def text_cache_path(cache_dir: Path, caption: str) -> Path:
    return Path(cache_dir) / "t5" / f"{caption_hash(caption)}_t5.safetensors"


def skip_list_path(cache_dir: Path, vae_kind: str, rank: int) -> Path:
    return Path(cache_dir) / f"skipped_{vae_tag(vae_kind)}_r{rank}.json"


# ---- fingerprints ---------------------------------------------------------------------------------


def file_head_sha256(path: Path, nbytes: int = HEAD_BYTES) -> str:
    with open(path, "rb") as handle:
        return hashlib.sha256(handle.read(nbytes)).hexdigest()


def weights_fingerprint(path: Path) -> str:
    """`file_head_sha256` of a model file; for a folder (HF layout), over its weight files' heads."""
    path = Path(path)
    if not path.is_dir():
        return file_head_sha256(path)
    files = sorted(p for p in path.iterdir() if p.suffix in (".safetensors", ".bin", ".pth"))
    return hashlib.sha256("".join(f.name + file_head_sha256(f) for f in files).encode()).hexdigest()


def source_fingerprint(path: Path) -> dict:
    """size, mtime and a hash of the first MB; a frame folder is summarised over its files."""
    path = Path(path)
    if path.is_dir():
        from .video_io import frame_files

        files = frame_files(path)
        stats = [f.stat() for f in files]
        digest = hashlib.sha256("\n".join(f.name for f in files).encode())
        if files:
            digest.update(file_head_sha256(files[0]).encode())
        return {"size": sum(s.st_size for s in stats), "mtime_ns": max((s.st_mtime_ns for s in stats), default=0),
                "sha256_1mb": digest.hexdigest()}
    stat = path.stat()
    return {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "sha256_1mb": file_head_sha256(path)}


def source_matches(recorded: dict, path: Path) -> bool:
    """Same size and (same mtime, or the same first-MB hash when only the mtime moved)."""
    try:
        path = Path(path)
        if path.is_dir():
            return source_fingerprint(path) == recorded
        stat = path.stat()
    except OSError:
        return False
    if stat.st_size != recorded.get("size"):
        return False
    return stat.st_mtime_ns == recorded.get("mtime_ns") or file_head_sha256(path) == recorded.get("sha256_1mb")


def settings_json(settings: dict) -> str:
    return json.dumps(settings, sort_keys=True, separators=(",", ":"))


# ---- atomic writes and reads ----------------------------------------------------------------------


def _atomic(path: Path, write) -> None:
    if path.parent.is_file():  # mkdir would say "File exists", naming neither the problem nor the folder
        raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), str(path.parent))
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def content_checksum(tensors: dict[str, torch.Tensor]) -> str:
    """CRC-32 (hex) of the tensors' names, dtypes, shapes and bytes, in name order: 0.8-1.6 ms for the
    4.2 MB bf16 latent of an 832x480x81 clip with the WAN 2.1 VAE (2.5-5 GB/s on one CPU core; BLAKE2b
    takes 3-4.5 ms). A CRC finds damage and overwritten data; it is no defence against forgery, and needs
    none: whoever can rewrite the cache can rewrite its metadata too."""
    crc = 0
    for name in sorted(tensors):
        tensor = tensors[name].detach().to("cpu").contiguous()
        crc = zlib.crc32(f"{name}|{tensor.dtype}|{tuple(tensor.shape)};".encode(), crc)
        crc = zlib.crc32(tensor.reshape(-1).view(torch.uint8).numpy(), crc)
    return f"{crc:08x}"


def write_safetensors_atomic(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str]) -> None:
    """Write to a temporary file in the same folder, then rename: a killed run never leaves half a file.
    The metadata gains the content checksum (`CHECKSUM_KEY`) of exactly these tensors."""
    from safetensors.torch import save_file

    tensors = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    for name, tensor in sorted(tensors.items()):  # one sum each: never a NaN cache that training reads as valid
        if tensor.is_floating_point() and not torch.isfinite(tensor.float().sum()):
            raise NonFiniteOutputError(
                f"{path}: the encoder's output {name!r} holds {int(tensor.isnan().sum())} NaN and "
                f"{int(tensor.isinf().sum())} infinite values (of {tensor.numel()}), so it was not cached: with "
                "--vae_dtype float16 encode in bfloat16 or float32 instead; otherwise the model file is damaged: "
                "use another copy of the model")
    metadata = {k: v for k, v in metadata.items() if k != "__keys__"} | {CHECKSUM_KEY: content_checksum(tensors)}
    _atomic(Path(path), lambda tmp: save_file(tensors, tmp, metadata=metadata))


def write_text_atomic(path: Path, text: str) -> None:
    _atomic(Path(path), lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def write_json_atomic(data, path: Path) -> None:
    write_text_atomic(path, json.dumps(data, indent=1, sort_keys=True))


def read_metadata(path: Path) -> dict | None:
    """The safetensors metadata, or None when the file is missing or unreadable."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            meta = dict(handle.metadata() or {})
            meta["__keys__"] = ",".join(sorted(handle.keys()))
            return meta
    except Exception:  # noqa: BLE001 - any unreadable file is simply not a usable cache
        return None


def load_tensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path))


def _implausible(tensors: dict[str, torch.Tensor]) -> str | None:
    """Why tensors without a checksum cannot be a model's output (non-finite, all zero, huge), else None."""
    for name, tensor in sorted(tensors.items()):
        if not tensor.is_floating_point() or tensor.numel() == 0:
            continue
        values = tensor.float()
        if not torch.isfinite(values).all():
            return f"{name} holds NaN or infinite values"
        if not values.any():
            return f"{name} is all zeros"
        if values.abs().max() > PLAUSIBLE_MAX:
            return f"{name} holds values beyond {PLAUSIBLE_MAX:g}"
    return None


def load_verified(path: Path) -> tuple[dict[str, torch.Tensor], bool]:
    """(tensors, verified): the file's tensors after checking them against its content checksum; a file
    from before checksums is checked for plausibility only (verified False). Raises CacheCorruptError."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            expected = (handle.metadata() or {}).get(CHECKSUM_KEY)
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    except FileNotFoundError:
        raise
    except Exception as exc:  # noqa: BLE001 - safetensors raises its own error types for damaged files
        raise CacheCorruptError(f"{path}: unreadable cache file ({exc})") from None
    if expected is None:
        problem = _implausible(tensors)
        if problem is not None:
            raise CacheCorruptError(f"{path}: corrupt cache file ({problem}; it has no content checksum)")
        return tensors, False
    if content_checksum(tensors) != expected:
        raise CacheCorruptError(f"{path}: corrupt cache file (its content does not match the checksum written with "
                                "it: damaged or overwritten after caching)")
    return tensors, True


class TensorMemo:
    """Cache files kept in memory after their first read, most recently used first, within a byte budget
    (`WAN_CACHE_MEMORY_MB`, default 1024; 0 turns it off). Keyed by path, size and mtime, so a rebuilt
    cache file is read again. Every read from disk is verified (`load_verified`). The returned tensors are
    shared: callers must not modify them in place."""

    def __init__(self, budget_bytes: int | None = None):
        from collections import OrderedDict

        if budget_bytes is None:
            budget_bytes = int(float(os.environ.get("WAN_CACHE_MEMORY_MB", "1024")) * 2**20)
        self.budget, self.used, self.warned = budget_bytes, 0, False
        self._items: OrderedDict = OrderedDict()

    def _read(self, path: Path) -> dict[str, torch.Tensor]:
        """A verified read (CacheCorruptError when corrupt); the first unverified one is reported once."""
        tensors, verified = load_verified(path)
        if not verified and not self.warned:
            self.warned = True
            logger.warning("%s was written before cache files had content checksums: it and any like it are read "
                           "unverified (checked only for NaN, all-zero or huge values); run the caching tools once to "
                           "rebuild them with checksums", path)
        return tensors

    def load(self, path: Path) -> dict[str, torch.Tensor]:
        if self.budget <= 0:
            return self._read(path)
        st = os.stat(path)
        key = (str(path), st.st_size, st.st_mtime_ns)
        if key in self._items:
            self._items.move_to_end(key)
            return self._items[key][0]
        tensors = self._read(path)
        size = sum(t.numel() * t.element_size() for t in tensors.values())
        if size <= self.budget:
            self._items[key] = (tensors, size)
            self.used += size
            while self.used > self.budget:
                _, (_, old) = self._items.popitem(last=False)
                self.used -= old
        return tensors


# ---- latent caches --------------------------------------------------------------------------------


def latent_metadata(item, settings: dict, vae_hash: str, source_fp: dict,
                    clip_hash: str | None = None) -> dict[str, str]:
    meta = {
        "format": LATENT_FORMAT, "item_key": item.key, "source_path": str(item.media_path),
        "source_fingerprint": json.dumps(source_fp, sort_keys=True), "caption_source": item.caption_source,
        "settings": settings_json(settings),
        "settings_hash": hashlib.sha256(settings_json(settings).encode()).hexdigest()[:16],
        "vae_sha256_1mb": vae_hash, "dtype": str(STORE_DTYPE).replace("torch.", ""),
    }
    if clip_hash is not None:
        meta["clip_sha256_1mb"] = clip_hash
    return meta


def content_problem(path: Path, meta: dict) -> str | None:
    """Why a cache file whose metadata is fresh must still be rebuilt: no content checksum yet (written by an
    older version: rebuilt once rather than certified, since a checksum taken now would bless whatever the
    bytes became), or content that does not match it. Reads the whole file."""
    if CHECKSUM_KEY not in meta:
        return UNVERIFIED
    try:
        load_verified(path)
    except CacheCorruptError as exc:
        return str(exc).removeprefix(f"{path}: ")
    return None


def latent_cache_problem(path: Path, item, settings: dict, *, need_image_latents: bool,
                         vae_hash: str | None = None, need_clip_fea: bool = False,
                         clip_hash: str | None = None, verify_content: bool = False) -> str | None:
    """None when the cache at `path` is fresh for `item`, else why it cannot be used (a `vae_hash` /
    `clip_hash` given must match the files the cache was made with; `verify_content` also reads the data
    and checks its checksum, as the caching tools do; training checks it at the first read instead)."""
    meta = read_metadata(path)
    if meta is None:
        return "missing" if not Path(path).exists() else "unreadable (corrupt or partial file)"
    if meta.get("format") != LATENT_FORMAT:
        return f"written by another tool or format ({meta.get('format')!r})"
    if meta.get("settings") != settings_json(settings):
        return f"settings changed (cached {meta.get('settings')}, now {settings_json(settings)})"
    if not source_matches(json.loads(meta.get("source_fingerprint", "{}")), item.media_path):
        return f"source {item.media_path} changed since it was cached"
    if vae_hash is not None and meta.get("vae_sha256_1mb") != vae_hash:
        return "cached with a different VAE file"
    if need_image_latents and "image_latents" not in meta["__keys__"].split(","):
        return "has no image_latents (cached for a non-I2V task)"
    if need_clip_fea and "clip_fea" not in meta["__keys__"].split(","):
        return "has no clip_fea (cached without --clip, which WAN 2.1 I2V needs)"
    if need_clip_fea and clip_hash is not None and meta.get("clip_sha256_1mb") != clip_hash:
        return "cached with a different CLIP file"
    return content_problem(path, meta) if verify_content else None


# ---- text caches ----------------------------------------------------------------------------------


def text_metadata(caption: str, encoder_fp: str, length: int) -> dict[str, str]:
    return {"format": TEXT_FORMAT, "caption": clean_caption(caption), "caption_hash": caption_hash(caption),
            "encoder_fingerprint": encoder_fp, "length": str(length)}


def text_cache_problem(path: Path, caption: str, encoder_fp: str | None = None,
                       verify_content: bool = False) -> str | None:
    """None when the text cache is fresh for `caption` (and `encoder_fp` when given; its data checked
    against its checksum with `verify_content`)."""
    meta = read_metadata(path)
    if meta is None:
        return "missing" if not Path(path).exists() else "unreadable (corrupt or partial file)"
    if meta.get("format") != TEXT_FORMAT or meta.get("caption") != clean_caption(caption):
        return "holds another caption or format"
    if encoder_fp is not None and meta.get("encoder_fingerprint") != encoder_fp:
        return "encoded with a different text encoder or tokenizer"
    return content_problem(path, meta) if verify_content else None

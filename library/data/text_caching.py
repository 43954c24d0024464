"""Caching umT5 outputs: one safetensors file per unique caption (and the empty caption when any
dataset uses caption dropout), at the true token length, resumable.

`cache_text_encoder_outputs(config, t5_path, ...)` is what `tools/cache_text_encoder_outputs.py` runs;
`run_text_caching` takes a loaded encoder (or a loader callable, so nothing is loaded when every cache
is fresh). A caption is encoded once however many items or datasets share it. Files are keyed by the
hash of the cleaned caption; the encoder fingerprint (weights, tokenizer and whether the weights ran in
fp8) is in the metadata and a cache from another encoder, or made with the other `fp8_t5` setting, is
rebuilt.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

import torch

from . import cache
from .dataset_config import DatasetConfig
from .items import captioned_sources
from .latent_caching import CacheSummary, CachingError, scan_datasets, split_for_rank

logger = logging.getLogger(__name__)

TEXT_LEN = 512


def find_tokenizer(t5_path: Path, tokenizer: str | Path | None) -> Path:
    """The tokenizer folder: given, or the one beside the weights (`library.wan.loading.find_tokenizer`)."""
    from library.wan.loading import find_tokenizer as find_beside

    if tokenizer:
        path = Path(tokenizer).expanduser()
        if not path.exists():
            raise CachingError(f"tokenizer {path} does not exist")
        return path
    return find_beside(t5_path)


def encoder_fingerprint(t5_path: Path, tokenizer_path: Path, fp8_t5: bool = False) -> str:
    """Hash of the weights' first MB, of the tokenizer files and of the fp8 choice: fp8 weights change the
    embeddings slightly, so caches made with and without `fp8_t5` must not be mixed. (Without fp8 the
    hash is what it was before the flag existed, so existing caches stay fresh.)"""
    digest = hashlib.sha256()
    if fp8_t5:
        digest.update(b"fp8_t5: block Linear weights float8_e4m3fn, per-channel scales\n")
    weights = sorted(t5_path.glob("*.safetensors")) if t5_path.is_dir() else [t5_path]
    for path in weights:
        digest.update(cache.file_head_sha256(path).encode())
    files = sorted(p for p in tokenizer_path.rglob("*") if p.is_file()) if tokenizer_path.is_dir() else [tokenizer_path]
    for path in files:
        digest.update(path.name.encode() + cache.file_head_sha256(path).encode())
    return digest.hexdigest()[:32]


def collect_captions(config: DatasetConfig, summary: CacheSummary, strict: bool) -> dict[str, dict]:
    """{cleaned caption: {"dirs": [cache dirs], "source": a caption file}} over all datasets, with ""
    when a dataset uses caption dropout."""
    captions: dict[str, dict] = {}
    for spec, sources in scan_datasets(config, summary, strict, captioned_sources):
        texts = [(caption, source) for _, caption, source in sources]
        if spec.caption_dropout_rate > 0:
            texts.append(("", "caption_dropout_rate"))
        for caption, source in texts:
            caption = cache.clean_caption(caption)  # captions that clean to the same text share one cache
            entry = captions.setdefault(caption, {"dirs": [], "source": source})
            if spec.cache_directory not in entry["dirs"]:
                entry["dirs"].append(spec.cache_directory)
    return captions


def warn_long_captions(captions: dict[str, dict], tokenizer) -> None:
    for caption, entry in captions.items():
        count = len(tokenizer(cache.clean_caption(caption), add_special_tokens=True).input_ids)
        if count > TEXT_LEN:
            logger.warning("%s: caption has %d tokens; it will be truncated to %d", entry["source"], count, TEXT_LEN)


def run_text_caching(config: DatasetConfig, get_encoder, encoder_fp: str, tokenizer, *, batch_size: int = 16,
                     strict: bool = False, rank: int = 0, world_size: int = 1, progress: bool = True) -> CacheSummary:
    """Encode this process's share of the unique captions whose caches are missing or stale."""
    from tqdm import tqdm

    summary = CacheSummary("text encoder outputs")
    captions = collect_captions(config, summary, strict)
    warn_long_captions(captions, tokenizer)
    todo = []
    for caption in split_for_rank(sorted(captions), rank, world_size):
        stale = []
        for cache_dir in captions[caption]["dirs"]:
            path = cache.text_cache_path(cache_dir, caption)
            problem = cache.text_cache_problem(path, caption, encoder_fp, verify_content=True)
            if problem:
                stale.append(cache_dir)
                if problem != "missing":
                    summary.note_rebuild(path, problem)
        if stale:
            todo.append((caption, stale))
        else:
            summary.reused += 1
    encoder = get_encoder() if todo else None
    with tqdm(total=len(todo), desc=f"text (rank {rank})", disable=not progress) as bar:
        for start in range(0, len(todo), batch_size):
            batch = todo[start:start + batch_size]
            with torch.no_grad():
                outputs = encoder.encode([caption for caption, _ in batch])  # each [L_i, d]
            for (caption, dirs), context in zip(batch, outputs):
                meta = cache.text_metadata(caption, encoder_fp, context.shape[0])
                for cache_dir in dirs:
                    cache.write_safetensors_atomic({"t5": context.to(cache.STORE_DTYPE)},
                                                   cache.text_cache_path(cache_dir, caption), meta)
                summary.cached += 1
            bar.update(len(batch))
    return summary


def cache_text_encoder_outputs(config: DatasetConfig, t5_path: str | Path, *, tokenizer: str | Path | None = None,
                               device: str = "cpu", dtype: torch.dtype = torch.bfloat16, fp8_t5: bool = False,
                               **kwargs) -> CacheSummary:
    """Resolve the tokenizer, fingerprint the encoder, and cache every caption's umT5 output (with
    `fp8_t5`, from fp8 block weights: about 4.6 GB less memory for umT5-XXL)."""
    from library.wan.loading import load_text_encoder
    from library.wan.text_encoder import load_tokenizer

    t5_path = Path(t5_path).expanduser()
    if not t5_path.exists():
        raise CachingError(f"text encoder {t5_path} does not exist")
    tokenizer_path = find_tokenizer(t5_path, tokenizer)

    def get_encoder():  # fp8_t5: the block Linear weights in fp8, computed in `dtype`
        return load_text_encoder(t5_path, tokenizer_path, device=device, dtype=dtype, fp8=fp8_t5)

    return run_text_caching(config, get_encoder, encoder_fingerprint(t5_path, tokenizer_path, fp8_t5),
                            load_tokenizer(tokenizer_path), **kwargs)
